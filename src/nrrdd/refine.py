"""Stage 3: refinement (Sec. 3.3): of all pixels (SRe2L), none, or only the non-critical ones (NRR: each
update multiplied by the mask of Eq. 4-5), with optional BatchNorm-statistics and label-refinement terms."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nrrdd.augment import crop_resize, cutmix_boxes, paste_boxes, random_square_boxes
from nrrdd.cam import class_activation_maps
from nrrdd.config import SynthConfig
from nrrdd.data import denormalize
from nrrdd.files import load_tensors, save_tensors
from nrrdd.losses import BNStats, bn_stat_loss, hinge_distance_loss, noncritical_mask
from nrrdd.models import Net
from nrrdd.runtime import barrier, class_generator, mine, world
from nrrdd.training import check_finite, cosine


def refine_batch(teacher: Net, x0: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, cfg: SynthConfig,
                 lo: torch.Tensor, hi: torch.Tensor, gen: torch.Generator, progress: bool = False) -> torch.Tensor:
    """Optimise x (normalised) for CE + alpha_bn L_bn (+ alpha_lr L_lr); each Adam update is multiplied by the
    mask (Eq. 5), so pixels with mask 0 keep their initial value exactly."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, cfg.iterations))
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


def refine_images(teacher: Net, x0: torch.Tensor, y: torch.Tensor, cfg: SynthConfig,
                  work_dir: Path | None = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine the whole synthetic set batch by batch; each finished batch is saved in `work_dir` so a killed
    run resumes at the next batch with the same result. Returns (refined, cam of the initial images)."""
    device = x0.device
    teacher.eval().requires_grad_(False)
    cam = class_activation_maps(teacher, x0, y)
    if cfg.refine == "none" or cfg.iterations == 0:
        return x0.clone(), cam
    lo = teacher.normalize(torch.zeros(1, x0.shape[1], 1, 1, device=device))
    hi = teacher.normalize(torch.ones(1, x0.shape[1], 1, 1, device=device))
    out = x0.clone()
    batches = batch_order(y.cpu(), cfg.refine_batch)
    files = [work_dir / f"refined_{b:05d}.safetensors" if work_dir else None for b in range(len(batches))]
    if world() > 1 and work_dir is None:
        raise ValueError("multi-process refinement needs a work folder to exchange batches")
    for b in tqdm(mine(range(len(batches))), desc="refine batches", disable=not progress or len(batches) == 1):
        if files[b] is not None and files[b].exists():
            continue
        idx = batches[b].to(device)
        out[idx] = refine_batch(teacher, x0[idx], y[idx], refinement_mask(cam[idx], cfg), cfg, lo, hi,
                                class_generator(cfg.seed, b, stream=1), progress=progress)
        if files[b] is not None:
            save_tensors(files[b], {"x": out[idx].detach().cpu()})
    barrier()
    if work_dir is not None:  # every batch, whichever rank or earlier run refined it
        for b, idx in enumerate(batches):
            out[idx.to(device)] = load_tensors(files[b])["x"].to(device)
    return out, cam


@torch.no_grad()
def refinement_effect(teacher: Net, x0: torch.Tensor, x: torch.Tensor, y: torch.Tensor, cam: torch.Tensor,
                      cfg: SynthConfig) -> dict:
    """What refinement changed, batch by batch as it refined: the stored pixels' |change| (0-255) inside the
    mask (pixels it may update) and outside it (critical pixels, which NRR keeps exactly), and what the
    teacher sees before and after (see `teacher_view`)."""
    batches = batch_order(y.cpu(), cfg.refine_batch)
    change = {"inside": [0.0, 0, 0.0], "outside": [0.0, 0, 0.0]}  # sum, count, max
    for idx in batches:
        idx = idx.to(x.device)
        d = (to_uint8(x[idx], teacher.mean, teacher.std).float() -
             to_uint8(x0[idx], teacher.mean, teacher.std).float()).abs()
        inside = (refinement_mask(cam[idx], cfg) > 0).expand_as(d)
        for part, v in (("inside", d[inside]), ("outside", d[~inside])):
            if v.numel():
                c = change[part]
                c[0], c[1], c[2] = c[0] + v.sum().item(), c[1] + v.numel(), max(c[2], v.max().item())
    pixels = sum(c[1] for c in change.values())
    return {"pixels_255": {k: {"mean": round(s / max(n, 1), 4), "max": m} for k, (s, n, m) in change.items()},
            "inside_fraction": round(change["inside"][1] / pixels, 4),
            "teacher_before": teacher_view(teacher, x0, y, batches, cfg.first_bn_weight),
            "teacher_after": teacher_view(teacher, x, y, batches, cfg.first_bn_weight)}


@torch.no_grad()
def teacher_view(teacher: Net, x: torch.Tensor, y: torch.Tensor, batches: list[torch.Tensor],
                 first_bn_weight: float) -> dict:
    """The teacher's top-1 accuracy (%) on x, its mean probability of the labelled class, and the mean over
    batches of the BN-statistic distance to its running statistics (Eq. 3, the term refinement can lower)."""
    bn, correct, prob, dist = BNStats(teacher), 0, 0.0, 0.0
    for idx in batches:
        idx = idx.to(x.device)
        with bn:
            p = teacher(x[idx]).softmax(1)
        correct += int((p.argmax(1) == y[idx]).sum())
        prob += p.gather(1, y[idx, None]).sum().item()
        dist += bn_stat_loss(bn.pop(), bn.running(), first_bn_weight).item()
    return {"acc": round(100 * correct / len(y), 2), "label_prob": round(prob / len(y), 4),
            "bn_distance": round(dist / len(batches), 4)}


def to_uint8(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (denormalize(x, mean, std).clamp(0, 1) * 255).round().to(torch.uint8)
