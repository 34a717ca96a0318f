"""Stage 2: initial images (Sec. 3.2, Algorithm 1): CIDD patches (CAM-ranked crops, highest-confidence
patches), RDED patches (lowest-CE crops), Gaussian noise (SRe2L) or random real images, stitched beta to an
image. Every method is a preset of `SynthConfig`; one code path serves all of them."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nrrdd import NrrddError
from nrrdd.augment import box_mass, crop_resize, random_square_boxes, stitch
from nrrdd.cam import class_activation_maps
from nrrdd.config import SynthConfig
from nrrdd.data import Split
from nrrdd.models import Net, batch_size_for
from nrrdd.runtime import class_generator


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


def cluster_pick(features: torch.Tensor, score: torch.Tensor, k: int, generator: torch.Generator,
                 iterations: int = 20) -> torch.Tensor:
    """Indices of k items that cover `features` (n, d): spherical k-means from k random items into k
    clusters, then the best-scoring item of each, ordered by score. Picking by score alone takes k near-copies
    of the class's easiest view; random real images cover the class but waste slots on poor views."""
    n = len(features)
    if k >= n:
        return torch.argsort(score, descending=True, stable=True)
    f = F.normalize(features.float(), dim=1)
    centres = f[torch.randperm(n, generator=generator)[:k]]
    for _ in range(iterations):
        assign = (f @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, f)
        filled = torch.bincount(assign, minlength=k) > 0
        centres = torch.where(filled[:, None], F.normalize(sums, dim=1), centres)
    assign = (f @ centres.T).argmax(1).tolist()
    ranked = torch.argsort(score, descending=True, stable=True).tolist()
    picked, seen = [], set()
    for i in ranked:  # first seen = best of its cluster
        if assign[i] not in seen:
            seen.add(assign[i])
            picked.append(i)
    taken = set(picked)
    picked += [i for i in ranked if i not in taken][:k - len(picked)]  # an empty cluster's slot: next best item
    picked = torch.tensor(picked, dtype=torch.long)
    return picked[torch.argsort(score[picked], descending=True, stable=True)]


def herding_pick(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of k items, in the order picked, whose running mean of unit features stays nearest the mean of
    all (herding, Welling 2009; iCaRL's exemplars): each pick is the item that adds most to what is already
    chosen, so the set stands for the whole class instead of repeating its most confident view."""
    f = F.normalize(features.float(), dim=1)
    target, total = f.mean(0), torch.zeros(f.shape[1])
    free = torch.ones(len(f), dtype=torch.bool)
    picked = []
    for t in range(1, min(k, len(f)) + 1):
        gap = ((target - (total + f) / t) ** 2).sum(1).masked_fill(~free, math.inf)
        i = int(gap.argmin())
        picked.append(i)
        free[i] = False
        total += f[i]
    return torch.tensor(picked, dtype=torch.long)


def confidence_pick(conf: torch.Tensor, k: int, rule: str) -> torch.Tensor:
    """Indices of k items by the teacher's confidence: the most confident first (highest), the least confident
    first (lowest), or the k ranked around the median (median), most confident first. median tests whether,
    with soft labels, views the teacher is less sure of teach more: at CIFAR-10 IPC 10 they teach less
    (docs/findings.md), so highest stays the default."""
    if rule == "lowest":
        return torch.argsort(conf, stable=True)[:k]
    ranked = torch.argsort(conf, descending=True, stable=True)
    start = max(len(conf) - k, 0) // 2 if rule == "median" else 0
    return ranked[start:start + k]


# The selection rules that read the teacher's features of the candidate patches: (features, confidence in the
# class, k, generator) -> the indices kept, in order. The others rank by confidence alone.
FEATURE_PICKS = {"diverse": cluster_pick, "herding": lambda feats, conf, k, gen: herding_pick(feats, k)}


def log_odds(logits: torch.Tensor, c: int) -> torch.Tensor:
    """log(p / (1 - p)) of class c under softmax(logits): its logit minus the logsumexp of the others. It ranks
    as p and -CE do, but near p = 1 float32 holds p (and CE near 0) only in steps of about 1e-7, so confident
    items tie there, and which of them comes first turned on the last bit of the teacher's output on one CPU or
    another; log-odds still tells them apart."""
    others = torch.cat([logits[:, :c], logits[:, c + 1:]], 1)
    return logits[:, c] - torch.logsumexp(others, 1)


@torch.no_grad()
def teacher_log_odds(teacher: Net, x: torch.Tensor, c: int) -> torch.Tensor:
    batch_size = batch_size_for(x, 500)
    return torch.cat([log_odds(teacher(x[i:i + batch_size]), c) for i in range(0, len(x), batch_size)])


def select_patches(teacher: Net, images: torch.Tensor, c: int, cfg: SynthConfig, device) -> tuple[torch.Tensor, dict]:
    """CIDD / RDED for one class: (beta * ipc, C, H, W) normalised patches at full size, and what was chosen."""
    need = cfg.ipc * cfg.beta
    if cfg.init == "random":
        idx = torch.randperm(len(images), generator=class_generator(cfg.seed, c))[:need]
        return teacher.normalize(images[idx].to(device)), {"source_index": idx.tolist()}
    gen = class_generator(cfg.seed, c)
    pool_idx = torch.randperm(len(images), generator=gen)[:cfg.pool_per_class]
    x = teacher.normalize(images[pool_idx].to(device))  # (n, C, H, W)
    n, h, w, k = len(x), x.shape[-2], x.shape[-1], cfg.crops_per_image
    boxes = random_square_boxes(n * k, h, w, (cfg.crop_scale_min, 1.0), gen)
    owner = torch.arange(n).repeat_interleave(k)
    if cfg.crop_score == "ce":
        score = teacher_log_odds(teacher, crop_resize(x, boxes, h, owner), c).cpu()  # ranks as -CE does
    else:
        cam = class_activation_maps(teacher, x, torch.full((n,), c)).cpu()
        mass = box_mass(cam, boxes, owner)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        score = mass / cam.sum((1, 2))[owner].clamp_min(1e-12) if cfg.crop_score == "cam_ratio" else mass / area
    top = score.view(n, k).topk(min(cfg.top_t, k), dim=1).indices  # (n, t)
    keep = (top + torch.arange(n)[:, None] * k).flatten()
    patches = crop_resize(x, boxes[keep], h, owner[keep])
    if cfg.select in FEATURE_PICKS:  # one teacher pass gives both the features and the confidence
        b = batch_size_for(patches, 500)
        with torch.no_grad():
            feats = torch.cat([teacher.embed(teacher.features(patches[i:i + b])) for i in range(0, len(patches), b)])
            conf = log_odds(teacher.classifier(feats), c).cpu()
        order = FEATURE_PICKS[cfg.select](feats.cpu(), conf, need, gen)
    else:
        # rded's crop score is already the teacher's log-odds of every crop: no second pass over the kept ones
        conf = score[keep] if cfg.crop_score == "ce" else teacher_log_odds(teacher, patches, c).cpu()
        order = confidence_pick(conf, need, cfg.select)
    return patches[order.to(patches.device)], {
        "source_index": pool_idx[owner[keep][order]].tolist(), "boxes": boxes[keep][order].tolist(),
        "confidence": [round(v, 5) for v in torch.sigmoid(conf[order]).tolist()],
        "log_odds": [round(v, 3) for v in conf[order].tolist()]}


def initial_images(teacher: Net, train: Split, num_classes: int, cfg: SynthConfig, device,
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
            patches, rec = select_patches(teacher, train.of_class(c), c, cfg, device)
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
