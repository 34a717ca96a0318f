"""Label plans and label modes (Sec. 3.4).

A label plan fixes, for every epoch of student training, which images form each batch, each image's crop
and flip, and each batch's mix (CutMix box or MixUp weight, and the pairing). The teacher labels the
mixed samples of the plan once (stored modes) or on the fly (sl-online); the student replays the same plan,
so it sees exactly the pixels the teacher labelled."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nrrdd import NrrddError
from nrrdd.augment import crop_resize, cutmix_boxes, mixup, paste_boxes, random_square_boxes
from nrrdd.data import normalize
from nrrdd.dist import gather_to_all, mine
from nrrdd.losses import dbr_match_loss, hinge_distance_loss, soft_cross_entropy, soft_kl

LABEL_MODES = ("sl-online", "sl-stored", "dbr", "onehot", "compact")
STORED_MODES = ("sl-stored", "dbr", "compact")


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


# ---------------------------------------------------------------- the label each mode stores

def teacher_payload(mode: str, logits: torch.Tensor, y_org, y_aug, topk: int) -> dict:
    """What a stored mode keeps per mixed sample: C soft-label floats, 2 distances (Eq. 8), or top-k entries."""
    if mode == "sl-stored":
        return {"logits": logits.half()}
    if mode == "dbr":
        return {"d_org": F.cross_entropy(logits, y_org, reduction="none").half(),
                "d_aug": F.cross_entropy(logits, y_aug, reduction="none").half()}
    if mode == "compact":
        # Top-k of the teacher's own (T = 1) belief: at T = 20 the top two entries are nearly equal and the
        # renormalised pair loses which class the teacher actually saw.
        v, i = F.softmax(logits, 1).topk(topk, dim=1)
        return {"topk_values": v.half(), "topk_index": i.short()}
    raise ValueError(mode)


def student_loss(mode: str, logits: torch.Tensor, y_org, y_aug, lam, label: dict, temperature: float,
                 r: float, alpha_dbr: float, num_classes: int) -> torch.Tensor:
    """Student loss for a batch given the mode's label (teacher logits for sl-*, distances for dbr...)."""
    if mode in ("sl-online", "sl-stored"):
        return soft_kl(logits, F.softmax(label["logits"].float() / temperature, 1), temperature)
    if mode == "dbr":  # Eq. 9-10
        d_org = F.cross_entropy(logits, y_org, reduction="none")
        d_aug = F.cross_entropy(logits, y_aug, reduction="none")
        return hinge_distance_loss(d_org, d_aug, r) + alpha_dbr * dbr_match_loss(
            d_org, d_aug, label["d_org"].float(), label["d_aug"].float())
    if mode == "onehot":
        lam = lam[:, None]
        target = lam * F.one_hot(y_org, num_classes) + (1 - lam) * F.one_hot(y_aug, num_classes)
        return soft_cross_entropy(logits, target)
    if mode == "compact":
        target = torch.zeros_like(logits).scatter_(1, label["topk_index"].long(), label["topk_values"].float())
        return soft_cross_entropy(logits, target / target.sum(1, keepdim=True))
    raise NrrddError(f"unknown label mode '{mode}'; modes: {', '.join(LABEL_MODES)}")


# ---------------------------------------------------------------- relabel: store the teacher's labels

@torch.no_grad()
def relabel(teacher, images: torch.Tensor, labels: torch.Tensor, plan: dict, spec: PlanSpec, mode: str,
            topk: int, mean, std, progress: bool = True) -> dict[str, torch.Tensor]:
    """Teacher labels for every mixed sample of the plan, as (E, N, ...) tensors of the mode's payload."""
    teacher.eval()
    nb = plan["lam"].shape[1]
    mine_epochs = {}
    for e in tqdm(mine(range(spec.epochs)), desc=f"relabel {mode}", disable=not progress, leave=False):
        chunks: dict[str, list] = {}
        for b in range(nb):
            x, y_org, y_aug, _ = mixed_batch(images, labels, plan, spec, e, b, mean, std)
            for k, v in teacher_payload(mode, teacher(x).float(), y_org, y_aug, topk).items():
                chunks.setdefault(k, []).append(v.cpu())
        mine_epochs[e] = {k: torch.cat(v) for k, v in chunks.items()}
    epochs = {e: p for part in gather_to_all(mine_epochs) for e, p in part.items()}  # ranks split the epochs
    return {k: torch.stack([epochs[e][k] for e in range(spec.epochs)]) for k in epochs[0]}


def label_slice(payload: dict, spec: PlanSpec, epoch: int, b: int, device) -> dict:
    sl = slice(b * spec.batch_size, (b + 1) * spec.batch_size)
    return {k: v[epoch, sl].to(device) for k, v in payload.items()}
