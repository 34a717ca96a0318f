"""Small pure losses and masks of the paper, each tested against hand-computed values."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def noncritical_mask(cam: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Eq. 4: M = max(0, epsilon - C). Zero wherever the normalised CAM is >= epsilon (critical pixels)."""
    return (epsilon - cam).clamp_min(0)


def bn_stat_loss(batch_stats: list[tuple[torch.Tensor, torch.Tensor]], running: list[tuple[torch.Tensor, torch.Tensor]],
                 first_weight: float = 1.0) -> torch.Tensor:
    """Eq. 3: sum over BN layers of ||mu - mu_run||_2 + ||var - var_run||_2 (norms not squared), SRe2L-style
    with the first layer weighted `first_weight`."""
    total = batch_stats[0][0].new_zeros(())
    for i, ((mu, var), (rmu, rvar)) in enumerate(zip(batch_stats, running)):
        w = first_weight if i == 0 else 1.0
        total = total + w * (torch.linalg.vector_norm(mu - rmu) + torch.linalg.vector_norm(var - rvar))
    return total


def hinge_distance_loss(d_org: torch.Tensor, d_aug: torch.Tensor, r: float) -> torch.Tensor:
    """Eq. 12 (L_lr) and the student's L_sce (Eq. 10): max(0, d_org - r) + max(0, d_aug - r), batch mean."""
    return ((d_org - r).clamp_min(0) + (d_aug - r).clamp_min(0)).mean()


def dbr_match_loss(d_org_s: torch.Tensor, d_aug_s: torch.Tensor, d_org_t: torch.Tensor, d_aug_t: torch.Tensor):
    """Eq. 9: |d_org^S - d_org^T| + |d_aug^S - d_aug^T|, batch mean."""
    return ((d_org_s - d_org_t).abs() + (d_aug_s - d_aug_t).abs()).mean()


def soft_kl(student_logits: torch.Tensor, teacher_probs_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """RDED's loss: KL(teacher softmax(z/T) || student softmax(z/T)), batch mean, no T^2 factor.
    `teacher_probs_t` are already softened at the same temperature."""
    logp = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(logp, teacher_probs_t, reduction="batchmean")


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """EDC's soft-label loss: squared logit difference, mean over samples and classes. Unlike KL at T it
    also matches the logits' scale, not only the softened distribution they give."""
    return F.mse_loss(student_logits, teacher_logits)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a (mixed) target distribution, batch mean."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


class BNStats:
    """Context manager recording (mean, biased var) of the input of every BatchNorm2d on each forward pass."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _hook(self, module, inputs, output):
        x = inputs[0]
        self.stats.append((x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)))

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def running(self):
        return [(m.running_mean, m.running_var) for m in self.layers]

    def pop(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        stats, self.stats = self.stats, []
        return stats
