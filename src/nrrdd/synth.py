"""Synthesis (Sec. 3.2-3.3, Algorithm 1): initial images (CIDD patches, RDED patches, noise or random real
images), then refinement of all, none, or only the non-critical pixels, optionally with label refinement.

Every method is a preset of `SynthConfig`; the code below has one path for all of them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nrrdd import NrrddError
from nrrdd.augment import box_mass, crop_resize, paste_boxes, cutmix_boxes, random_square_boxes, stitch
from nrrdd.cam import class_activation_maps
from nrrdd.config import help_field
from nrrdd.data import Split, normalize, denormalize
from nrrdd.dist import barrier, mine, world
from nrrdd.io import check_finite, load_tensors, save_tensors
from nrrdd.losses import BNStats, bn_stat_loss, hinge_distance_loss, noncritical_mask
from nrrdd.models import Net


@dataclass
class SynthConfig:
    """Synthesis settings. A preset fills these; any field can be overridden by flag or config file."""
    ipc: int = help_field(10, "images per class to synthesise")
    init: str = help_field("patches", "initial images: patches (CIDD/RDED selection), noise (SRe2L), random (real images)")
    pool_per_class: int = help_field(300, "real images per class drawn into the candidate pool (RDED's mipc)")
    crops_per_image: int = help_field(5, "random square crops drawn per pooled image (k)")
    crop_scale_min: float = help_field(0.08, "smallest crop area as a share of the image (largest: 1)")
    crop_score: str = help_field("cam_ratio", "crop ranking: cam_ratio (share of CAM mass in the crop), cam_mean "
                                 "(mean CAM in the crop), ce (teacher cross-entropy of the crop, RDED)")
    top_t: int = help_field(1, "crops kept per pooled image (t)")
    select: str = help_field("highest", "keep the patches of highest (Algorithm 1, RDED) or lowest (Sec. 3.2 text) "
                             "teacher confidence")
    beta: int = help_field(1, "patches stitched per image: 1, 4 or 9")
    refine: str = help_field("masked", "refinement: none, masked (NRR: non-critical pixels only, Eq. 4-5), all (SRe2L)")
    epsilon: float = help_field(0.5, "CAM threshold of the mask M = max(0, epsilon - CAM) (Eq. 4)")
    iterations: int = help_field(300, "refinement steps per batch")
    lr: float = help_field(0.003, "Adam step size eta (Eq. 5), cosine-decayed to 0")
    adam_beta1: float = help_field(0.5, "Adam beta1 (SRe2L: 0.5)")
    adam_beta2: float = help_field(0.9, "Adam beta2 (SRe2L: 0.9)")
    alpha_bn: float = help_field(0.0, "weight of the BatchNorm statistics loss L_bn (Eq. 2)")
    first_bn_weight: float = help_field(10.0, "extra weight of the first BN layer in L_bn (SRe2L)")
    refine_crop_min: float = help_field(0.5, "random-resized-crop scale floor applied at every refinement step (1: off)")
    refine_flip: bool = help_field(True, "random horizontal flip at every refinement step")
    refine_batch: int = help_field(100, "images refined together (batches mix classes, as BN statistics do)")
    alpha_lr: float = help_field(0.0, "weight of label refinement L_lr on CutMix pairs (Eq. 11-12); 0: off")
    lr_threshold: float = help_field(0.3, "hinge threshold r of L_lr (log 2 = 0.69 is the CE of a 50/50 mix)")
    seed: int = help_field(0, "seed of every random draw in synthesis")

    def __post_init__(self):
        choices = {"init": ("patches", "noise", "random"), "crop_score": ("cam_ratio", "cam_mean", "ce"),
                   "select": ("highest", "lowest"), "refine": ("none", "masked", "all")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise NrrddError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if math.isqrt(self.beta) ** 2 != self.beta:
            raise NrrddError(f"beta={self.beta}: must be a square number of patches (1, 4, 9)")
        if self.ipc < 1:
            raise NrrddError(f"ipc={self.ipc}: must be at least 1")


PRESETS: dict[str, dict] = {
    # CIDD + NRR. The SynthConfig defaults are the values the validation search chose on CIFAR-10 IPC 10
    # (benchmarks/results/cifar10_convnet_nols15/chosen.json): highest confidence, CAM ratio, epsilon 0.5,
    # 300 steps, crop 0.5-1 + flip at each step, alpha_bn 0, no label refinement (all with the label-smoothing
    # teacher), and lr 0.003 (with the default teacher; 0.01 / 0.03 scored 0.6 / 1.8 points lower).
    "nrrdd": {},
    "nrrdd-lr": {"alpha_lr": 0.1},  # the search preferred alpha_lr = 0; 0.1 was the least harmful non-zero value
    "cidd": {"refine": "none"},
    "rded": {"crop_score": "ce", "select": "highest", "refine": "none"},
    "sre2l": {"init": "noise", "refine": "all", "lr": 0.25, "iterations": 1000, "alpha_bn": 0.01,
              "refine_crop_min": 1.0, "refine_flip": True},
    "random": {"init": "random", "refine": "none"},
}


def preset_config(name: str, *overrides) -> SynthConfig:
    from nrrdd.config import build_config
    if name not in PRESETS:
        raise NrrddError(f"unknown preset '{name}'; presets: {', '.join(PRESETS)}")
    return build_config(SynthConfig, PRESETS[name], *overrides)


def class_generator(seed: int, c: int, stream: int = 0) -> torch.Generator:
    """Independent stream per (seed, class): classes can run in any order or on any rank with the same result."""
    return torch.Generator().manual_seed(seed * 1_000_003 + c * 7919 + stream)


# ---------------------------------------------------------------- initial images

@torch.no_grad()
def teacher_ce(teacher: Net, x: torch.Tensor, c: int, batch_size: int = 500) -> torch.Tensor:
    out = [F.cross_entropy(teacher(x[i:i + batch_size]), torch.full((len(x[i:i + batch_size]),), c, device=x.device),
                           reduction="none") for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def select_patches(teacher: Net, images: torch.Tensor, c: int, cfg: SynthConfig, mean, std, device) -> tuple[torch.Tensor, dict]:
    """CIDD / RDED for one class: (beta * ipc, C, H, W) normalised patches at full size, and what was chosen."""
    need = cfg.ipc * cfg.beta
    if cfg.init == "random":
        if len(images) < need:
            raise NrrddError(f"class {c}: ipc x beta = {need} but only {len(images)} training images")
        idx = torch.randperm(len(images), generator=class_generator(cfg.seed, c))[:need]
        return normalize(images[idx].to(device), mean, std), {"source_index": idx.tolist()}
    gen = class_generator(cfg.seed, c)
    pool_idx = torch.randperm(len(images), generator=gen)[:cfg.pool_per_class]
    x = normalize(images[pool_idx].to(device), mean, std)  # (n, C, H, W)
    n, h, w, k = len(x), x.shape[-2], x.shape[-1], cfg.crops_per_image
    boxes = random_square_boxes(n * k, h, w, (cfg.crop_scale_min, 1.0), gen)
    owner = torch.arange(n).repeat_interleave(k)
    if cfg.crop_score == "ce":
        score = -teacher_ce(teacher, crop_resize(x, boxes, h, owner), c).cpu()
    else:
        cam = class_activation_maps(teacher, x, torch.full((n,), c)).cpu()
        mass = box_mass(cam, boxes, owner)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        score = mass / cam.sum((1, 2))[owner].clamp_min(1e-12) if cfg.crop_score == "cam_ratio" else mass / area
    top = score.view(n, k).topk(min(cfg.top_t, k), dim=1).indices  # (n, t)
    keep = (top + torch.arange(n)[:, None] * k).flatten()
    patches = crop_resize(x, boxes[keep], h, owner[keep])
    conf = torch.exp(-teacher_ce(teacher, patches, c)).cpu()  # softmax probability of class c
    if len(patches) < need:
        raise NrrddError(f"class {c}: ipc x beta = {need} patches needed but the pool holds {len(patches)}; "
                         "raise --pool-per-class or --top-t, or lower --ipc")
    order = torch.argsort(conf, descending=cfg.select == "highest", stable=True)[:need]
    return patches[order.to(patches.device)], {
        "source_index": pool_idx[owner[keep][order]].tolist(), "boxes": boxes[keep][order].tolist(),
        "confidence": [round(v, 5) for v in conf[order].tolist()]}


def initial_images(teacher: Net, train: Split, num_classes: int, cfg: SynthConfig, mean, std, device,
                   progress: bool = True, classes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Initial synthetic set, class-major: (ipc * C', C, H, W) normalised, labels, per-class selection records."""
    xs, ys, records = [], [], []
    c_in, h, w = train.images.shape[1:]
    for c in tqdm(classes if classes is not None else range(num_classes), desc="select", disable=not progress,
                  leave=False):
        if cfg.init == "noise":
            x = torch.randn(cfg.ipc, c_in, h, w, generator=class_generator(cfg.seed, c)).to(device)
            rec = {}
        else:
            patches, rec = select_patches(teacher, train.of_class(c), c, cfg, mean, std, device)
            g = math.isqrt(cfg.beta)
            if g > 1:
                patches = F.interpolate(patches, size=(h // g, w // g), mode="bilinear", antialias=True,
                                        align_corners=False)
            x = stitch(patches, cfg.beta)
            if x.shape[-1] != w:  # sides not divisible by g: stretch the grid back to the input size
                x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        xs.append(x)
        ys.append(torch.full((cfg.ipc,), c))
        records.append({"class": c, **rec})
    return torch.cat(xs), torch.cat(ys), records


# ---------------------------------------------------------------- refinement

def refine_batch(teacher: Net, x0: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, cfg: SynthConfig,
                 lo: torch.Tensor, hi: torch.Tensor, gen: torch.Generator, progress: bool = False) -> torch.Tensor:
    """Optimise x (normalised) for CE + alpha_bn L_bn (+ alpha_lr L_lr); each Adam update is multiplied by the
    mask (Eq. 5), so pixels with mask 0 keep their initial value exactly."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.iterations)))
    n, _, h, w = x.shape
    bn = BNStats(teacher)
    for step in tqdm(range(cfg.iterations), desc="refine", disable=not progress, leave=False):
        xin = x
        if cfg.refine_crop_min < 1:
            xin = crop_resize(xin, random_square_boxes(n, h, w, (cfg.refine_crop_min, 1.0), gen), h)
        if cfg.refine_flip:
            flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
            xin = torch.where(flip[:, None, None, None], xin.flip(3), xin)
        with bn:
            logits = teacher(xin)
        loss = F.cross_entropy(logits, y)
        if cfg.alpha_bn:
            loss = loss + cfg.alpha_bn * bn_stat_loss(bn.pop(), bn.running(), cfg.first_bn_weight)
        bn.pop()
        if cfg.alpha_lr:
            perm = torch.randperm(n, generator=gen).to(x.device)
            lam = torch.rand(n, generator=gen)  # Beta(1, 1), as CutMix draws it
            mixed, _ = paste_boxes(xin, xin[perm], cutmix_boxes(n, h, w, lam, gen))
            logits_mix = teacher(mixed)
            d_org = F.cross_entropy(logits_mix, y, reduction="none")
            d_aug = F.cross_entropy(logits_mix, y[perm], reduction="none")
            loss = loss + cfg.alpha_lr * hinge_distance_loss(d_org, d_aug, cfg.lr_threshold)
        check_finite(loss, f"refinement step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before = x.detach().clone()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(before + mask * (x - before), hi), lo))
    with torch.no_grad():
        return torch.where(mask > 0, x, x0)


def refinement_mask(cam: torch.Tensor, cfg: SynthConfig) -> torch.Tensor:
    """(N, 1, H, W) update weights from the initial images' CAM: Eq. 4 for NRR, all ones for SRe2L, zeros when
    nothing is refined."""
    if cfg.refine == "masked":
        return noncritical_mask(cam, cfg.epsilon)[:, None]
    return (torch.ones_like if cfg.refine == "all" else torch.zeros_like)(cam)[:, None]


def batch_order(labels: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Indices in batches that interleave classes (image i of every class, then i+1...), as SRe2L batches do."""
    ipc_rank = torch.zeros_like(labels)
    for c in labels.unique():
        m = labels == c
        ipc_rank[m] = torch.arange(int(m.sum()))
    order = torch.argsort(ipc_rank * (labels.max() + 1) + labels, stable=True)
    return list(order.split(batch))


def refine_images(teacher: Net, x0: torch.Tensor, y: torch.Tensor, cfg: SynthConfig, mean, std,
                  work_dir: Path | None = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine the whole synthetic set batch by batch; each finished batch is saved in `work_dir` so a killed
    run resumes at the next batch with the same result. Returns (refined, cam of the initial images)."""
    device = x0.device
    teacher.eval().requires_grad_(False)
    cam = class_activation_maps(teacher, x0, y)
    mask = refinement_mask(cam, cfg)
    if cfg.refine == "none" or cfg.iterations == 0:
        return x0.clone(), cam
    lo = normalize(torch.zeros(1, x0.shape[1], 1, 1, device=device), mean, std)
    hi = normalize(torch.ones(1, x0.shape[1], 1, 1, device=device), mean, std)
    out = x0.clone()
    batches = batch_order(y.cpu(), cfg.refine_batch)
    files = [work_dir / f"refined_{b:05d}.safetensors" if work_dir else None for b in range(len(batches))]
    if world() > 1 and work_dir is None:
        raise ValueError("multi-process refinement needs a work folder to exchange batches")
    for b in tqdm(mine(range(len(batches))), desc="refine batches", disable=not progress or len(batches) == 1):
        if files[b] is not None and files[b].exists():
            continue
        idx = batches[b].to(device)
        out[idx] = refine_batch(teacher, x0[idx], y[idx], mask[idx], cfg, lo, hi,
                                class_generator(cfg.seed, b, stream=1), progress=progress)
        if files[b] is not None:
            save_tensors(files[b], {"x": out[idx].detach().cpu()})
    barrier()
    if work_dir is not None:  # every batch, whichever rank or earlier run refined it
        for b, idx in enumerate(batches):
            out[idx.to(device)] = load_tensors(files[b])["x"].to(device)
    return out, cam


def to_uint8(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (denormalize(x, mean, std).clamp(0, 1) * 255).round().to(torch.uint8)

