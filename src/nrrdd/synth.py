"""Synthesis (Sec. 3.2-3.3, Algorithm 1): initial images (CIDD patches, RDED patches, noise or random real
images), then refinement of all, none, or only the non-critical pixels, optionally with label refinement.

Every method is a preset of `SynthConfig`; the code below has one path for all of them."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nrrdd import NrrddError
from nrrdd.augment import box_mass, crop_resize, paste_boxes, cutmix_boxes, random_square_boxes, stitch
from nrrdd.cam import class_activation_maps
from nrrdd.config import SynthConfig
from nrrdd.data import Split, normalize, denormalize
from nrrdd.dist import barrier, mine, world
from nrrdd.files import check_finite, load_tensors, save_tensors
from nrrdd.losses import BNStats, bn_stat_loss, hinge_distance_loss, noncritical_mask
from nrrdd.models import Net


def check_enough_images(counts: list[int], classes: list[str], cfg: SynthConfig) -> None:
    """Refuse, before any work, an IPC that some class cannot fill: ipc x beta real images (random) or
    candidate patches (pool_per_class x top_t crops) per class."""
    need = cfg.ipc * cfg.beta
    for name, n in zip(classes, counts):
        have = {"random": n, "patches": min(n, cfg.pool_per_class) * min(cfg.top_t, cfg.crops_per_image)}.get(cfg.init)
        if have is not None and have < need:
            what = "real images" if cfg.init == "random" else (
                f"patches (pool {min(n, cfg.pool_per_class)} images x top_t {min(cfg.top_t, cfg.crops_per_image)})")
            raise NrrddError(f"--ipc {cfg.ipc}: class '{name}' has {n} training images, {have} {what}, but ipc x "
                             f"beta = {need} are needed; lower --ipc" + ("" if cfg.init == "random" else
                                                                          " or raise --pool-per-class / --top-t"))


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

