"""Label plans and label modes (Sec. 3.4).

A label plan fixes, for every epoch of student training, which images form each batch, each image's crop
and flip, and each batch's mix (CutMix box or MixUp weight, and the pairing). The teacher labels the
mixed samples of the plan once (stored modes) or on the fly (sl-online); the student replays the same plan,
so it sees exactly the pixels the teacher labelled."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nrrdd import NrrddError
from nrrdd.augment import crop_resize, cutmix_boxes, mixup, paste_boxes, random_square_boxes, unstitch
from nrrdd.config import RELABEL_FIELDS, StudentConfig, auto_batch_size, images_per_class, to_dict
from nrrdd.data import normalize
from nrrdd.files import load_tensors, read_json, read_tensor_meta, save_tensors, sha256_bytes, sha256_file, write_json
from nrrdd.losses import dbr_match_loss, hinge_distance_loss, logit_mse, soft_cross_entropy, soft_kl
from nrrdd.runtime import barrier, init_from_env, is_main, mine, pick_device, provenance


@dataclass(frozen=True)
class PlanSpec:
    num_images: int
    epochs: int
    batch_size: int
    image_size: int
    mix: str  # cutmix | mixup | none
    mix_alpha: float  # lambda ~ Beta(alpha, alpha)
    crop_min: float  # random-resized-crop scale floor; 1: no crop
    flip: bool
    seed: int


def make_plan(spec: PlanSpec) -> dict[str, torch.Tensor]:
    """Draw the whole plan from `spec.seed`: tensors indexed by [epoch, position] or [epoch, batch]."""
    if spec.mix not in ("cutmix", "mixup", "none"):
        raise NrrddError(f"mix={spec.mix!r}: choose cutmix, mixup or none")
    g = torch.Generator().manual_seed(spec.seed)
    n, e, s = spec.num_images, spec.epochs, spec.image_size
    nb = math.ceil(n / spec.batch_size)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(e)])  # (E, N)
    boxes = random_square_boxes(e * n, s, s, (spec.crop_min, 1.0), g).view(e, n, 4)
    flip = (torch.rand(e, n, generator=g) < 0.5) if spec.flip else torch.zeros(e, n, dtype=torch.bool)
    # One pairing, lambda and CutMix box per batch, as RDED and SRe2L draw them.
    pair = torch.stack([torch.cat([torch.randperm(min(spec.batch_size, n - b * spec.batch_size), generator=g)
                                   for b in range(nb)]) for _ in range(e)])  # (E, N) position within the batch
    lam = _beta(g, spec.mix_alpha, (e, nb)) if spec.mix != "none" else torch.ones(e, nb)
    cut = cutmix_boxes(e * nb, s, s, lam.flatten(), g).view(e, nb, 4)
    return {"order": order.int(), "boxes": boxes.to(torch.uint8 if s < 256 else torch.int16), "flip": flip,
            "pair": pair.int(), "lam": lam, "cut": cut.to(torch.uint8 if s < 256 else torch.int16)}


def _beta(g: torch.Generator, alpha: float, shape) -> torch.Tensor:
    """Beta(alpha, alpha) drawn deterministically from `g` (torch's Beta sampler takes no generator)."""
    if alpha == 1.0:  # the uniform distribution: RDED's CutMix default
        return torch.rand(shape, generator=g)
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))
    return torch.from_numpy(rng.beta(alpha, alpha, size=shape)).float()


def mixed_batch(images: torch.Tensor, labels: torch.Tensor, plan: dict, spec: PlanSpec, epoch: int, b: int,
                mean, std) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rebuild batch b of `epoch` exactly: (mixed normalised images, y_org, y_aug, lam = share of x_org)."""
    dev = images.device
    sl = slice(b * spec.batch_size, (b + 1) * spec.batch_size)
    idx = plan["order"][epoch, sl].long().to(dev)
    x = normalize(images[idx], mean, std)
    s = x.shape[-1]
    if spec.crop_min < 1:
        x = crop_resize(x, plan["boxes"][epoch, sl].float(), s)
    x = torch.where(plan["flip"][epoch, sl].to(dev)[:, None, None, None], x.flip(3), x)
    y = labels[idx]
    perm = plan["pair"][epoch, sl].long().to(dev)
    if spec.mix == "none":
        return x, y, y, torch.ones(len(y), device=dev)
    if spec.mix == "cutmix":
        mixed, lam = paste_boxes(x, x[perm], plan["cut"][epoch, b].float().expand(len(y), 4))
    else:
        lam = plan["lam"][epoch, b].expand(len(y)).to(dev)
        mixed = mixup(x, x[perm], lam)
    return mixed, y, y[perm], lam.to(dev)


# ---------------------------------------------------------------- label modes: a registry

@dataclass(frozen=True)
class LabelMode:
    """How one label mode labels a mixed sample and how a student learns from that label. `store` (teacher
    logits, y_org, y_aug, recipe -> tensors per sample) is what relabel keeps; None: nothing is stored."""
    loss: Callable  # (student logits, y_org, y_aug, lam, label, recipe, num_classes) -> scalar
    store: Callable | None = None
    teacher_online: bool = False  # the teacher labels every batch during student training


MODES: dict[str, LabelMode] = {}


def register_mode(name: str, store: Callable | None = None, teacher_online: bool = False):
    def add(loss: Callable) -> Callable:
        MODES[name] = LabelMode(loss, store, teacher_online)
        return loss
    return add


def label_mode(name: str) -> LabelMode:
    if name not in MODES:
        raise NrrddError(f"unknown label mode '{name}'; modes: {', '.join(MODES)}")
    return MODES[name]


def stored_modes() -> list[str]:
    return [k for k, m in MODES.items() if m.store is not None]


def _onehot_loss(logits, y_org, y_aug, lam, label, cfg, num_classes):  # the mix of the two hard labels
    lam = lam[:, None]
    target = lam * F.one_hot(y_org, num_classes) + (1 - lam) * F.one_hot(y_aug, num_classes)
    return soft_cross_entropy(logits, target)


def _soft_label_loss(logits, y_org, y_aug, lam, label, cfg, num_classes):
    teacher = label["logits"].float()
    if cfg.soft_loss == "mse":
        loss = logit_mse(logits, teacher)
    else:
        loss = soft_kl(logits, F.softmax(teacher / cfg.temperature, 1), cfg.temperature)
    if cfg.hard_ce:
        loss = loss + cfg.hard_ce * _onehot_loss(logits, y_org, y_aug, lam, label, cfg, num_classes)
    return loss


register_mode("sl-online", teacher_online=True)(_soft_label_loss)
# C fp16 teacher logits per mixed sample
register_mode("sl-stored", store=lambda logits, y_org, y_aug, cfg: {"logits": logits.half()})(_soft_label_loss)


def _distances(logits, y_org, y_aug, cfg):  # Eq. 8: two fp16 floats per mixed sample
    return {"d_org": F.cross_entropy(logits, y_org, reduction="none").half(),
            "d_aug": F.cross_entropy(logits, y_aug, reduction="none").half()}


@register_mode("dbr", store=_distances)
def _dbr_loss(logits, y_org, y_aug, lam, label, cfg, num_classes):  # Eq. 9-10
    d_org = F.cross_entropy(logits, y_org, reduction="none")
    d_aug = F.cross_entropy(logits, y_aug, reduction="none")
    return hinge_distance_loss(d_org, d_aug, cfg.r) + cfg.alpha_dbr * dbr_match_loss(
        d_org, d_aug, label["d_org"].float(), label["d_aug"].float())


register_mode("onehot")(_onehot_loss)


def _top_k(logits, y_org, y_aug, cfg):
    # Top-k of the teacher's own (T = 1) belief: at T = 20 the top two entries are nearly equal and the
    # renormalised pair loses which class the teacher actually saw.
    v, i = F.softmax(logits, 1).topk(cfg.topk, dim=1)
    return {"topk_values": v.half(), "topk_index": i.short()}


@register_mode("compact", store=_top_k)
def _compact_loss(logits, y_org, y_aug, lam, label, cfg, num_classes):
    target = torch.zeros_like(logits).scatter_(1, label["topk_index"].long(), label["topk_values"].float())
    return soft_cross_entropy(logits, target / target.sum(1, keepdim=True))


def teacher_payload(mode: str, logits: torch.Tensor, y_org, y_aug, cfg: StudentConfig) -> dict:
    """What a stored mode keeps per mixed sample: C soft-label floats, 2 distances (Eq. 8), or top-k entries."""
    store = label_mode(mode).store
    if store is None:
        raise NrrddError(f"label mode '{mode}' stores nothing; stored modes: {', '.join(stored_modes())}")
    return store(logits, y_org, y_aug, cfg)


def student_loss(mode: str, logits: torch.Tensor, y_org, y_aug, lam, label: dict, cfg: StudentConfig,
                 num_classes: int) -> torch.Tensor:
    """Student loss for a batch given the mode's label (teacher logits for sl-*, distances for dbr...)."""
    return label_mode(mode).loss(logits, y_org, y_aug, lam, label, cfg, num_classes)


# ---------------------------------------------------------------- relabel: store the teacher's labels

@torch.no_grad()
def label_epochs(teacher, images: torch.Tensor, labels: torch.Tensor, plan: dict, spec: PlanSpec,
                 cfg: StudentConfig, epochs: range) -> dict[str, torch.Tensor]:
    """Teacher labels for every mixed sample of the plan's `epochs`, as (len(epochs), N, ...) CPU tensors of
    the mode's payload."""
    teacher.eval()
    out: dict[str, list] = {}
    for e in epochs:
        chunks: dict[str, list] = {}
        for b in range(plan["lam"].shape[1]):
            x, y_org, y_aug, _ = mixed_batch(images, labels, plan, spec, e, b, teacher.mean, teacher.std)
            for k, v in teacher_payload(cfg.label_mode, teacher(x).float(), y_org, y_aug, cfg).items():
                chunks.setdefault(k, []).append(v.cpu())
        for k, v in chunks.items():
            out.setdefault(k, []).append(torch.cat(v))
    return {k: torch.stack(v) for k, v in out.items()}


def sample_bytes(mode: str, num_classes: int, cfg: StudentConfig) -> int:
    """Payload bytes a stored mode keeps per mixed sample (what teacher_payload returns for one)."""
    y = torch.zeros(1, dtype=torch.long)
    return sum(v.element_size() * v.numel()
               for v in teacher_payload(mode, torch.zeros(1, num_classes), y, y, cfg).values())


def shard_ranges(spec: PlanSpec, per_sample: int, shard_bytes: int) -> list[tuple[int, int]]:
    """Epoch ranges [a, b) of at most `shard_bytes` of payload each (at least one epoch)."""
    k = max(1, shard_bytes // max(1, spec.num_images * per_sample))
    return [(a, min(a + k, spec.epochs)) for a in range(0, spec.epochs, k)]


def shard_name(mode: str, a: int, b: int, epochs: int) -> str:
    """One shard keeps the plain name; several carry their epoch range."""
    return f"labels_{mode}.safetensors" if (a, b) == (0, epochs) else f"labels_{mode}.e{a:05d}-{b:05d}.safetensors"


class StoredLabels:
    """A stored mode's payload, read one shard (epoch range) at a time: memory holds one shard, not every
    epoch's labels."""

    def __init__(self, shards: list[tuple[int, int, Path]]):
        self.shards = sorted(shards)
        self._held: tuple[int, int, dict] | None = None

    def epoch(self, e: int) -> dict[str, torch.Tensor]:
        if self._held is None or not self._held[0] <= e < self._held[1]:
            a, b, f = next(s for s in self.shards if s[0] <= e < s[1])
            self._held = (a, b, load_tensors(f))
        return {k: v[e - self._held[0]] for k, v in self._held[2].items()}

    def batch(self, e: int, rows: slice, device) -> dict[str, torch.Tensor]:
        return {k: v[rows].to(device) for k, v in self.epoch(e).items()}


# ---------------------------------------------------------------- stored labels on disk

def images_digest(images: torch.Tensor) -> str:
    return sha256_bytes(images.contiguous().numpy().tobytes())


def plan_spec(cfg: StudentConfig, n: int, num_classes: int, image_size: int,
              recorded_ipc: int | None = None) -> PlanSpec:
    """The label plan of a student recipe on n images; relabel and evaluate both derive it here, so the batch
    size of stored labels always matches the student's."""
    bs = cfg.batch_size or auto_batch_size(images_per_class(n, num_classes, recorded_ipc), num_classes, n)
    return PlanSpec(n, cfg.epochs, bs, image_size, cfg.mix, cfg.mix_alpha, cfg.crop_min, cfg.flip, cfg.plan_seed)


def student_set(split, num_classes: int, record: dict, cfg: StudentConfig):
    """(images, labels, plan spec) a student trains on: the distilled images, or with `unstitch` the tiles of
    each stitched image. Relabel and evaluate both start here, so stored labels fit the student's samples."""
    beta = record.get("config", {}).get("beta", 1) if cfg.unstitch else 1
    images, labels = split.images, split.labels
    if beta > 1:
        images, labels = unstitch(images, beta), labels.repeat_interleave(beta)
    ipc = record.get("ipc") and record["ipc"] * beta
    return images, labels, plan_spec(cfg, len(labels), num_classes, images.shape[-1], ipc)



def store_labels(out_dir, teacher, images, labels, spec: PlanSpec, cfg: StudentConfig, progress=True) -> dict:
    """Relabel the plan once: plan.safetensors (bookkeeping) and the payload as labels_<mode>[.e<a>-<b>]
    .safetensors, epoch ranges of at most cfg.shard_mb each. Under torchrun every rank labels and writes its
    own shards (nothing is gathered); a shard already on disk (a killed run) is kept."""
    out_dir = Path(out_dir)
    plan = make_plan(spec)
    num_classes = int(labels.max()) + 1
    per_sample = sample_bytes(cfg.label_mode, num_classes, cfg)
    meta = {"plan": json.dumps(asdict(spec)), "images_sha256": images_digest(images.cpu()),
            "mode": cfg.label_mode, "topk": str(cfg.topk)}
    ranges = shard_ranges(spec, per_sample, int(cfg.shard_mb * (1 << 20)))
    for a, b in tqdm(mine(ranges), desc=f"relabel {cfg.label_mode}", disable=not progress or len(ranges) == 1,
                     leave=False):
        f = out_dir / shard_name(cfg.label_mode, a, b, spec.epochs)
        if not f.exists():
            save_tensors(f, label_epochs(teacher, images, labels, plan, spec, cfg, range(a, b)),
                         {**meta, "epochs": [a, b]})
    barrier()
    if not is_main():
        return {}
    plan_bytes = save_tensors(out_dir / "plan.safetensors", plan)
    return label_accounting(out_dir, cfg.label_mode, plan_bytes, spec, num_classes, per_sample)


def label_files(label_dir, mode: str) -> list[Path]:
    return sorted(Path(label_dir).glob(f"labels_{mode}.safetensors")) + \
        sorted(Path(label_dir).glob(f"labels_{mode}.e[0-9]*-[0-9]*.safetensors"))


def label_accounting(label_dir, mode: str, plan_bytes: int, spec: PlanSpec, num_classes: int,
                     per_sample: int) -> dict:
    files = label_files(label_dir, mode)
    payload_bytes = spec.epochs * spec.num_images * per_sample
    sl_bytes = spec.epochs * spec.num_images * num_classes * 2  # fp16 logits, C per mixed sample
    return {"label_file": files[0].name if len(files) == 1 else f"labels_{mode}.e*.safetensors",
            "label_shards": len(files), "label_file_bytes": sum(f.stat().st_size for f in files),
            "payload_bytes": payload_bytes, "bookkeeping_bytes": plan_bytes,
            "mixed_samples": spec.epochs * spec.num_images, "sl_payload_bytes": sl_bytes,
            "ratio_vs_sl": round(sl_bytes / payload_bytes, 3)}


def load_labels(label_dir, mode: str, spec: PlanSpec, images: torch.Tensor) -> tuple[StoredLabels, dict]:
    """Stored labels that belong to exactly this distilled set and plan, their shards covering every epoch
    once, else a clear error. Reads only the shards' headers."""
    files = label_files(label_dir, mode)
    if not files:
        raise NrrddError(f"{Path(label_dir) / f'labels_{mode}.safetensors'}: no stored '{mode}' labels here; run "
                         f"nrrdd relabel --label-mode {mode} first")
    digest, shards = images_digest(images.cpu()), []
    for f in files:
        meta = read_tensor_meta(f)
        if meta.get("images_sha256") != digest:
            raise NrrddError(f"{f}: labels were made for other images than this distilled set; relabel it")
        if json.loads(meta.get("plan", "{}")) != asdict(spec):
            raise NrrddError(f"{f}: labels follow another plan ({meta.get('plan')}); the student recipe must match "
                             "the one used by relabel (epochs, batch size, mix, crop, flip, plan seed)")
        a, b = meta.get("epochs", [0, spec.epochs])  # files from before shards cover every epoch
        shards.append((a, b, f))
    covered = sorted((a, b) for a, b, _ in shards)
    if [a for a, _ in covered] != [0] + [b for _, b in covered[:-1]] or covered[-1][1] != spec.epochs:
        raise NrrddError(f"{label_dir}: the '{mode}' label shards {covered} do not cover epochs 0-{spec.epochs} "
                         "exactly once; relabel into an empty folder")
    return StoredLabels(shards), meta


def relabel_set(distilled, teacher_path, cfg: StudentConfig, out_dir, device: str = "auto", resume: bool = False,
                overwrite: bool = False, progress: bool = True, verify: bool = True) -> dict:
    """`nrrdd relabel`: store the teacher's labels of a distilled set's label plan in their own folder."""
    from nrrdd.checkpoint import load_model
    from nrrdd.data import load_distilled
    from nrrdd.outdir import check_out, finish_out, open_out
    if label_mode(cfg.label_mode).store is None:
        raise NrrddError(f"--label-mode {cfg.label_mode}: relabel stores {', '.join(stored_modes())}")
    split, classes, record = load_distilled(distilled, verify)
    teacher_path = teacher_path or record.get("teacher", {}).get("path")
    if not teacher_path:
        raise NrrddError(f"{distilled}: no distill.json names the teacher; pass --teacher")
    out = Path(out_dir)
    settings = {"config": {k: v for k, v in to_dict(cfg).items() if k in RELABEL_FIELDS},
                "images_sha256": images_digest(split.images), "teacher_sha256": sha256_file(teacher_path)}
    state = check_out(out, "relabel", settings, overwrite, resume, inputs=[distilled, teacher_path])
    if state == "finished":
        return read_json(out / "labels.json")
    dev = pick_device(device)
    init_from_env(dev)
    teacher, meta = load_model(teacher_path, classes=classes, device=dev)
    barrier()
    if is_main():
        open_out(out, "relabel", settings, state)
    barrier()
    images, labels, spec = student_set(split, len(classes), record, cfg)
    info = store_labels(out, teacher, images.to(dev), labels.to(dev), spec, cfg, progress=progress and is_main())
    if not is_main():
        return {}
    info = {"kind": "labels", "distilled": str(distilled), "teacher": str(teacher_path), "config": to_dict(cfg),
            **info, **provenance()}
    write_json(out / "labels.json", info)
    finish_out(out, "relabel", settings, {"kind": "labels", "mode": cfg.label_mode})
    return info
