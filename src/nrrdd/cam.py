"""Class activation maps (Eq. 1), batched and gradient-free, for any `Net`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nrrdd.models import Net, batch_size_for


def normalize_per_image(m: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max normalise each (H, W) map to [0, 1], so that epsilon means the same for every image."""
    flat = m.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(m)


@torch.no_grad()
def class_activation_maps(model: Net, x: torch.Tensor, labels: torch.Tensor,
                          batch_size: int | None = None) -> torch.Tensor:
    """CAM of class `labels[i]` for image `x[i]`: (B, H, W) in [0, 1], upsampled bilinearly to the input size.

    x is already normalised. The model's mode is left as the caller set it (eval for teachers).
    """
    out, batch_size = [], batch_size or batch_size_for(x, 512)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], labels[i:i + batch_size].to(x.device)
        f = model.features(xb)  # (B, K, h, w)
        W = model.cam_weights(f.shape)[yb]  # (B, K, h|1, w|1)
        cam = (W * f).sum(1, keepdim=True)  # (B, 1, h, w)
        cam = F.interpolate(cam, size=xb.shape[-2:], mode="bilinear", align_corners=False)
        out.append(normalize_per_image(cam[:, 0]))
    return torch.cat(out) if out else x.new_zeros((0, *x.shape[-2:]))
