"""Every stage's settings: one dataclass per stage, defaults that reproduce the chosen reading of the paper,
method presets as data. Field docs become --help; presets, config files and flags override fields, in that
order. Every value is checked against its field's type and choices however it arrives.

This module imports neither torch nor numpy, so `nrrdd --help` and errors about settings answer at once."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any, NamedTuple, get_args, get_origin, get_type_hints

from nrrdd import NrrddError


# The names of the label modes relabel.MODES implements (a test holds the two equal), here so that --help and
# settings checks need no torch.
LABEL_MODES = ("sl-online", "sl-stored", "dbr", "onehot", "compact")


def help_field(default, help: str, choices: tuple | None = None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(cls, name: str) -> type:
    typ = get_type_hints(cls)[name]
    if get_origin(typ) is not None:  # Optional[...] / X | None
        typ = next(a for a in get_args(typ) if a is not type(None))
    return typ


_EXPECTED = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def check_fields(cfg) -> None:
    """Type- and choice-check every field in place (an int where a float is due becomes a float): a JSON "no"
    must not pass as a true bool, nor 3.7 as an image count."""
    for f in dataclasses.fields(cfg):
        v, typ, choices = getattr(cfg, f.name), _field_type(type(cfg), f.name), f.metadata.get("choices")
        ok = (isinstance(v, bool) if typ is bool else
              isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) if typ is float else
              isinstance(v, int) and not isinstance(v, bool) if typ is int else isinstance(v, typ))
        if not ok:
            raise NrrddError(f"setting {f.name} ({_flag(f.name)}) = {json.dumps(v, default=repr)}: expected "
                             f"{_EXPECTED.get(typ, typ.__name__)}")
        if typ is float:
            object.__setattr__(cfg, f.name, float(v))
        if choices and v not in choices:
            raise NrrddError(f"setting {f.name} ({_flag(f.name)}) = {json.dumps(v)}: choose one of "
                             f"{', '.join(choices)}")


def at_least_one(cfg, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise NrrddError(f"setting {name} ({_flag(name)}) = {getattr(cfg, name)}: must be at least 1")


def add_config_args(parser: argparse.ArgumentParser, cls, title: str | None = None, only=None) -> None:
    """Add --field-name for every field of dataclass `cls` (or those in `only`); defaults stay None so presets
    are not masked."""
    group = parser.add_argument_group(title or cls.__name__, cls.__doc__ if only is None else None)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        typ, choices = _field_type(cls, f.name), f.metadata.get("choices")
        desc = f.metadata.get("help", "") + (f" (default: {f.default})" if f.default != "" else "")
        kw = {"action": argparse.BooleanOptionalAction} if typ is bool else {"type": typ, "choices": choices}
        group.add_argument(_flag(f.name), dest=f.name, default=None, help=desc, **kw)


def build_config(cls, *layers: dict | argparse.Namespace | None):
    """Instantiate `cls` from its defaults overlaid by each layer in turn (preset, config file, CLI flags)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        if isinstance(layer, argparse.Namespace):  # other stages' flags share the namespace
            items = [(k, v) for k, v in vars(layer).items() if k in names]
        elif isinstance(layer, dict):
            items = list(layer.items())
        else:
            raise NrrddError(f"settings must be a JSON object of field names and values, not {type(layer).__name__}")
        for k, v in items:
            if v is None:
                continue
            if k not in names:
                raise NrrddError(f"unknown {cls.__name__} field '{k}'; known: {', '.join(sorted(names))}")
            values[k] = v
    return cls(**values)


def load_config_file(path) -> dict:
    from nrrdd.files import read_json
    return read_json(path)


def to_dict(cfg) -> dict:
    """The config as it reads back from JSON, so saved and live settings compare equal."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _model_kwargs(arch: str, width: int, norm: str) -> dict:
    return {"width": width, "norm": norm} if arch.startswith("convnet") else {}


NORMS = ("batch", "instance", "none")


# ---------------------------------------------------------------- teacher

@dataclasses.dataclass
class TeacherConfig:
    """Teacher recipe. Defaults: the committed teacher teachers/cifar10_convnet3_nols15.safetensors (SGD
    nesterov, one-cycle, crop + flip, no label smoothing)."""
    data: str = help_field("cifar10", "data set: digits, cifar10, cifar100, or a folder with train/ and test/")
    image_size: int = help_field(32, "side of the square input in pixels")
    arch: str = help_field("convnet3", "model name from the registry (nrrdd models lists them)")
    width: int = help_field(128, "ConvNet width (ignored by other architectures)")
    norm: str = help_field("batch", "ConvNet norm (batch is needed for L_bn)", NORMS)
    epochs: int = help_field(15, "training epochs")
    batch_size: int = help_field(256, "images per step")
    lr: float = help_field(0.05, "peak learning rate of the one-cycle schedule")
    warmup: float = help_field(0.15, "fraction of steps spent warming up linearly to lr")
    momentum: float = help_field(0.9, "SGD nesterov momentum")
    weight_decay: float = help_field(5e-4, "weight decay (not on biases or norm weights)")
    label_smoothing: float = help_field(0.0, "cross-entropy label smoothing (smoothing flattens the soft labels "
                                        "students learn from; see the README's teacher table)")
    crop_pad: int = help_field(4, "random-crop padding in pixels (0: no crop)")
    val_fraction: float = help_field(0.1, "share of each class held out from training for validation")
    split_seed: int = help_field(0, "seed of the validation split")
    seed: int = help_field(0, "seed of initialisation, order and augmentation")

    def __post_init__(self):
        check_fields(self)

    def model_kwargs(self) -> dict:
        return _model_kwargs(self.arch, self.width, self.norm)


# ---------------------------------------------------------------- synthesis (select + refine)

@dataclasses.dataclass
class SynthConfig:
    """Synthesis settings. A preset fills these; any field can be overridden by flag or config file."""
    ipc: int = help_field(10, "images per class to synthesise")
    init: str = help_field("patches", "initial images: patches (CIDD/RDED selection), noise (SRe2L), random "
                           "(real images)", ("patches", "noise", "random"))
    pool_per_class: int = help_field(300, "real images per class drawn into the candidate pool (RDED's mipc)")
    crops_per_image: int = help_field(5, "random square crops drawn per pooled image (k)")
    crop_scale_min: float = help_field(0.08, "smallest crop area as a share of the image (largest: 1)")
    crop_score: str = help_field("cam_ratio", "crop ranking: cam_ratio (share of CAM mass in the crop), cam_mean "
                                 "(mean CAM in the crop), ce (teacher cross-entropy of the crop, RDED)",
                                 ("cam_ratio", "cam_mean", "ce"))
    top_t: int = help_field(1, "crops kept per pooled image (t)")
    select: str = help_field("highest", "keep the patches of highest (Algorithm 1, RDED) or lowest (Sec. 3.2 text) "
                             "teacher confidence, or those ranked around its median; diverse: the most confident "
                             "of each of ipc x beta k-means clusters of the teacher's features; herding: greedily, "
                             "the patch whose features bring the chosen set's mean nearest the class's mean",
                             ("highest", "lowest", "median", "diverse", "herding"))
    beta: int = help_field(1, "patches stitched per image: 1, 4 or 9")
    refine: str = help_field("masked", "refinement: none, masked (NRR: non-critical pixels only, Eq. 4-5), all "
                             "(SRe2L)", ("none", "masked", "all"))
    epsilon: float = help_field(0.5, "CAM threshold of the mask M = max(0, epsilon - CAM) (Eq. 4)")
    iterations: int = help_field(300, "refinement steps per batch")
    lr: float = help_field(0.003, "Adam step size eta (Eq. 5), cosine-decayed to 0")
    adam_beta1: float = help_field(0.5, "Adam beta1 (SRe2L: 0.5)")
    adam_beta2: float = help_field(0.9, "Adam beta2 (SRe2L: 0.9)")
    alpha_bn: float = help_field(0.0, "weight of the BatchNorm statistics loss L_bn (Eq. 2)")
    first_bn_weight: float = help_field(10.0, "extra weight of the first BN layer in L_bn (SRe2L)")
    refine_crop_min: float = help_field(0.5, "random-resized-crop scale floor applied at every refinement step "
                                        "(1: off)")
    refine_flip: bool = help_field(True, "random horizontal flip at every refinement step")
    refine_batch: int = help_field(100, "images refined together (batches mix classes, as BN statistics do)")
    alpha_lr: float = help_field(0.0, "weight of label refinement L_lr on CutMix pairs (Eq. 11-12); 0: off")
    lr_threshold: float = help_field(0.3, "hinge threshold r of L_lr (log 2 = 0.69 is the CE of a 50/50 mix)")
    seed: int = help_field(0, "seed of every random draw in synthesis")

    def __post_init__(self):
        check_fields(self)
        if math.isqrt(max(self.beta, 0)) ** 2 != self.beta or self.beta < 1:
            raise NrrddError(f"setting beta = {self.beta}: must be a square number of patches (1, 4, 9)")
        at_least_one(self, "ipc", "pool_per_class", "crops_per_image", "top_t", "refine_batch")


SELECTION_FIELDS = ("pool_per_class", "crops_per_image", "crop_scale_min", "crop_score", "top_t", "select")
REFINE_FIELDS = ("epsilon", "iterations", "lr", "adam_beta1", "adam_beta2", "alpha_bn", "first_bn_weight",
                 "refine_crop_min", "refine_flip", "refine_batch", "alpha_lr", "lr_threshold")


def effective_settings(cfg: dict) -> dict:
    """The synthesis settings that shape the images: patch selection only matters for init=patches, the
    refinement's only when something is refined (two sets that differ elsewhere are the same set)."""
    inert = (SELECTION_FIELDS if cfg.get("init") != "patches" else ()) + \
        (REFINE_FIELDS if cfg.get("refine") == "none" or cfg.get("iterations") == 0 else ())
    return {k: v for k, v in cfg.items() if k not in inert}


PRESETS: dict[str, dict] = {
    # CIDD + NRR. The SynthConfig defaults are the values the validation search chose on CIFAR-10 IPC 10
    # (benchmarks/results/cifar10_convnet_nols15/chosen.json).
    "nrrdd": {},
    "nrrdd-lr": {"alpha_lr": 0.1},  # the least harmful non-zero label-refinement weight on validation
    "cidd": {"refine": "none"},
    # Beyond the paper: under a student that crops (crop-2000) the selection need not zoom, so keep the teacher's
    # most confident pool images whole. The best validated at CIFAR-10 IPC 10 under crop-2000 (+0.9 over random
    # real images, 3 seeds; benchmarks/results/screen_cifar10_ipc10.md); level with cidd at CIFAR-100 IPC 1.
    "cidd-whole": {"refine": "none", "crop_scale_min": 1.0, "crops_per_image": 1},
    "rded": {"crop_score": "ce", "select": "highest", "refine": "none"},
    "sre2l": {"init": "noise", "refine": "all", "lr": 0.25, "iterations": 1000, "alpha_bn": 0.01,
              "refine_crop_min": 1.0, "refine_flip": True},
    "random": {"init": "random", "refine": "none"},
}


def preset_config(name: str, *overrides) -> SynthConfig:
    if name not in PRESETS:
        raise NrrddError(f"unknown preset '{name}'; presets: {', '.join(PRESETS)}")
    return build_config(SynthConfig, PRESETS[name], *overrides)


# ---------------------------------------------------------------- students (relabel + evaluate)

@dataclasses.dataclass
class StudentConfig:
    """Student recipe. Defaults follow RDED's evaluation (AdamW 1e-3, 300 epochs, flip + CutMix, T = 20)."""
    data: str = help_field("", "data set for validation/test (default: the one recorded in the distilled set)")
    student: str = help_field("convnet3", "student architecture (registry name)")
    width: int = help_field(128, "ConvNet width")
    norm: str = help_field("batch", "ConvNet norm", NORMS)
    label_mode: str = help_field("sl-online", "labels", LABEL_MODES)
    epochs: int = help_field(300, "training epochs")
    batch_size: int = help_field(0, "batch size; 0: RDED's rule (10/50/100 for IPC 1/10/50, x2 at 100+ classes)")
    lr: float = help_field(1e-3, "AdamW learning rate")
    weight_decay: float = help_field(0.01, "AdamW weight decay (not on biases and norm weights)")
    cosine_span: float = help_field(2.0, "lr factor 0.5(1 + cos(pi e / (span E))): 2 ends at 0.5 (RDED), 1 at 0 "
                                    "(SRe2L)")
    temperature: float = help_field(20.0, "soft-label temperature T (KL at T, no T^2 factor)")
    soft_loss: str = help_field("kl", "soft-label loss: KL at T (RDED) or MSE on the logits (EDC; T unused)",
                                ("kl", "mse"))
    hard_ce: float = help_field(0.0, "weight of a cross-entropy on the (mixed) hard labels added to the soft-label "
                                "loss (EDC: 0.025)")
    mix: str = help_field("cutmix", "batch mix", ("cutmix", "mixup", "none"))
    mix_alpha: float = help_field(1.0, "mix weight lambda ~ Beta(alpha, alpha)")
    crop_min: float = help_field(1.0, "random-resized-crop scale floor per image (1: off, as RDED at factor 1)")
    flip: bool = help_field(True, "random horizontal flip")
    unstitch: bool = help_field(False, "multi-formation: train on the beta tiles distill stitched into each image "
                                "(its recorded beta), each resized to full size; off: the mosaics as stored (RDED)")
    r: float = help_field(0.3, "DBR hinge threshold r (Eq. 10)")
    alpha_dbr: float = help_field(1.0, "DBR weight alpha_dbr of the distance-matching term (Eq. 9)")
    topk: int = help_field(2, "entries kept per sample by compact labels")
    shard_mb: float = help_field(256.0, "stored labels are written as files of at most this many MB of payload (an "
                                 "epoch range each; under torchrun each rank writes its own) and students read one "
                                 "at a time, so memory stays flat however many epochs x images are labelled")
    ema: float = help_field(0.0, "decay per step of an exponential moving average of the student's weights, which "
                            "is then evaluated instead of the final weights (0: off)")
    baseline: str = help_field("none", "random: also train the same students, with the same labels and plan, on "
                               "random real training images (ipc x beta per class, drawn as the random preset "
                               "draws them from the set's seed) and report the improvement over random, IOR = "
                               "accuracy minus the baseline's", ("none", "random"))
    plan_seed: int = help_field(0, "seed of the label plan (batches, crops, flips, mixes), shared by all modes")
    seeds: int = help_field(3, "number of student seeds (0, 1, ...)")
    first_seed: int = help_field(0, "first student seed")
    checkpoint_every: int = help_field(25, "epochs between resumable checkpoints")
    ddp: bool = help_field(False, "under torchrun, train each student with DistributedDataParallel, every rank a "
                           "share of each batch (for large distilled sets; differs from one process's run by float "
                           "rounding, and by per-rank BatchNorm statistics on CPU). Off: ranks train whole seeds, "
                           "bit for bit as one process would")

    def __post_init__(self):
        check_fields(self)
        at_least_one(self, "epochs", "seeds", "checkpoint_every", "topk")
        if self.shard_mb <= 0:
            raise NrrddError(f"setting shard_mb (--shard-mb) = {self.shard_mb}: must be positive")
        if self.hard_ce < 0:
            raise NrrddError(f"setting hard_ce (--hard-ce) = {self.hard_ce}: a weight, at least 0")
        if not 0 <= self.ema < 1:
            raise NrrddError(f"setting ema (--ema) = {self.ema}: a decay in [0, 1) (0: off)")

    def model_kwargs(self) -> dict:
        return _model_kwargs(self.student, self.width, self.norm)


# Named student recipes, so every figure can say which one it used. rded-300 is the protocol of the paper and
# RDED (the StudentConfig defaults), kept for like-for-like rows. Longer schedules, CIFAR-10 validation, 3 seeds
# (benchmarks/results/screen_cifar10_ipc10.md, screen_cifar10_ipc1.md, screen_cifar10_ensemble_ipc1.md):
# - rded-1000 / rded-2000 at IPC 10: cidd 58.3 -> 67.8 -> 73.1, random 53.0 -> 65.9 -> 72.2.
# - mf-*: the same on the decoded tiles of a set distilled with --beta 4 (multi-formation; a no-op on a beta 1
#   set). At IPC 1, mf-1000: cidd 36.5, random 30.7 (29.5 and 26.0 on whole images); mf-2000 (NCFM's
#   schedule): cidd 41.7, random 40.1; mf-4000 with the two-teacher ensemble: rded 50.8, random 48.8 (chosen;
#   at IPC 1 an epoch is a single step). At IPC 10 multi-formation costs cidd 9.3 points at 300 epochs (seed 0).
# - crop-*: random-resized crops in the student (crop_min 0.5). At IPC 10, rded-1000 -> crop-1000, 3 seeds: random
#   65.9 -> 68.1, cidd 67.8 -> 68.7: crops lift random real images more than the selected patches. rded-2000 ->
#   crop-2000: random 72.2 -> 73.7, cidd 73.1 -> 73.9 (chosen at IPC 10; cidd over random +0.3). CIFAR-100 IPC 1,
#   rded-1000 -> crop-1000: random 39.6 -> 43.4, cidd 41.8 -> 43.4 (chosen there; cidd over random 0.0).
# A recipe fixes how students train, not which images or labels.
class Recipe(NamedTuple):
    fields: dict  # the StudentConfig fields it sets; the rest keep their defaults
    about: str    # one line for --help


RECIPES: dict[str, Recipe] = {
    "rded-300": Recipe({}, "the paper's and RDED's protocol (300 epochs, AdamW, flip + CutMix, KL at T 20)"),
    "rded-1000": Recipe({"epochs": 1000}, "rded-300 for 1,000 epochs"),
    "rded-2000": Recipe({"epochs": 2000}, "rded-300 for 2,000 epochs"),
    "mf-1000": Recipe({"epochs": 1000, "unstitch": True}, "rded-1000 on the tiles of a set distilled with --beta 4, "
                      "each resized to full size (multi-formation)"),
    "mf-2000": Recipe({"epochs": 2000, "unstitch": True}, "mf-1000 for 2,000 epochs (NCFM's schedule)"),
    "mf-4000": Recipe({"epochs": 4000, "unstitch": True}, "mf-1000 for 4,000 epochs, the best validated at IPC 1"),
    "crop-1000": Recipe({"epochs": 1000, "crop_min": 0.5}, "rded-1000 on random-resized square crops of at least "
                        "half of each image, every view labelled by the teacher; the best validated at "
                        "CIFAR-100 IPC 1"),
    "crop-2000": Recipe({"epochs": 2000, "crop_min": 0.5}, "crop-1000 for 2,000 epochs, the best validated at "
                        "IPC 10"),
}
TRAINING_FIELDS = ("student", "width", "norm", "epochs", "batch_size", "lr", "weight_decay", "cosine_span",
                   "temperature", "soft_loss", "hard_ce", "mix", "mix_alpha", "crop_min", "flip", "ema", "unstitch")


def recipe_fields(name: str) -> dict:
    """The StudentConfig fields a named recipe sets (the rest keep StudentConfig's defaults)."""
    if name not in RECIPES:
        raise NrrddError(f"unknown student recipe '{name}'; recipes: {', '.join(RECIPES)}")
    return RECIPES[name].fields


def recipe_config(name: str, *overrides) -> StudentConfig:
    return build_config(StudentConfig, recipe_fields(name), *overrides)


def recipe_name(cfg: dict) -> str:
    """The named recipe a student config trains by (its training fields equal the recipe's), else 'custom'."""
    for name in RECIPES:
        ref = to_dict(recipe_config(name))
        if all(cfg.get(k, ref[k]) == ref[k] for k in TRAINING_FIELDS):
            return name
    return "custom"


# What relabel reads of a student recipe: the label plan and what each mode stores, nothing of training.
RELABEL_FIELDS = ("label_mode", "epochs", "batch_size", "mix", "mix_alpha", "crop_min", "flip", "unstitch", "plan_seed",
                  "topk", "shard_mb")


def images_per_class(num_images: int, num_classes: int, recorded: int | None = None) -> int:
    """IPC of a distilled set: what distill recorded, else the largest class share (a plain ImageFolder)."""
    return recorded or math.ceil(num_images / num_classes)


def auto_batch_size(ipc: int, num_classes: int, n: int) -> int:
    b = 10 if ipc <= 1 else 50 if ipc <= 10 else 100
    return min(n, b * (2 if num_classes >= 100 else 1))
