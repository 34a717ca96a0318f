"""Crops, flips and mixes as explicit parameters, so the same augmentation can be drawn once, stored,
and replayed exactly (label plans) or applied differentiably (refinement)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


def random_square_boxes(n: int, h: int, w: int, scale: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """(n, 4) integer-valued float boxes x1, y1, x2, y2 of square crops covering `scale` of the area,
    as RandomResizedCrop with ratio 1 draws them."""
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=gen) * h * w
    side = area.sqrt().round().clamp(1, min(h, w))
    x1 = (torch.rand(n, generator=gen) * (w - side + 1)).floor()
    y1 = (torch.rand(n, generator=gen) * (h - side + 1)).floor()
    return torch.stack([x1, y1, x1 + side, y1 + side], 1)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """Crop box i from image index[i] (default i) and resize to size x size: batched, bilinear, differentiable,
    averaging ceil(box/size)^2 samples per output cell so large crops shrink without aliasing and a
    full-image box is the identity."""
    index = torch.arange(len(boxes)) if index is None else index
    rois = torch.cat([index[:, None].to(boxes), boxes], 1).to(x.device, x.dtype)
    return roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def box_mass(maps: torch.Tensor, boxes: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Sum of maps[index[i]] inside integer box i, via integral images: (n,)."""
    ii = torch.nn.functional.pad(maps.cumsum(1).cumsum(2), (1, 0, 1, 0))  # (B, H+1, W+1)
    x1, y1, x2, y2 = boxes.long().unbind(1)
    b = index.to(ii.device)
    return ii[b, y2, x2] - ii[b, y1, x2] - ii[b, y2, x1] + ii[b, y1, x1]


def cutmix_boxes(n: int, h: int, w: int, lam: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """CutMix boxes (n, 4) whose area is (1 - lam) of the image, centred uniformly and clipped (Yun et al.)."""
    cut = (1 - lam).sqrt()
    cw, ch = (cut * w).floor(), (cut * h).floor()
    cx = torch.randint(0, w, (n,), generator=gen).float()
    cy = torch.randint(0, h, (n,), generator=gen).float()
    return torch.stack([(cx - cw / 2).clamp(0, w).floor(), (cy - ch / 2).clamp(0, h).floor(),
                        (cx + cw / 2).clamp(0, w).floor(), (cy + ch / 2).clamp(0, h).floor()], 1)


def paste_boxes(x_org: torch.Tensor, x_aug: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix: x_aug's pixels inside box i replace x_org[i]'s; returns (mixed, lam = share of x_org kept)."""
    h, w = x_org.shape[-2:]
    ys = torch.arange(h, device=x_org.device)[None, :, None]
    xs = torch.arange(w, device=x_org.device)[None, None, :]
    b = boxes.to(x_org.device)
    inside = ((ys >= b[:, 1, None, None]) & (ys < b[:, 3, None, None]) &
              (xs >= b[:, 0, None, None]) & (xs < b[:, 2, None, None]))  # (n, h, w)
    lam = 1 - inside.flatten(1).float().mean(1)
    return torch.where(inside[:, None], x_aug, x_org), lam


def mixup(x_org: torch.Tensor, x_aug: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    lam = lam.to(x_org)
    return lam[:, None, None, None] * x_org + (1 - lam[:, None, None, None]) * x_aug


def stitch(patches: torch.Tensor, beta: int) -> torch.Tensor:
    """Tile groups of beta = g*g consecutive patches (N*beta, C, s, s) into a g x g grid: (N, C, g*s, g*s),
    row-major (patch 0 top-left, patch 1 to its right)."""
    g = math.isqrt(beta)
    if g * g != beta:
        raise ValueError(f"beta must be a square (1, 4, 9...), got {beta}")
    n, c, s, _ = patches.shape
    grid = patches.view(n // beta, g, g, c, s, s).permute(0, 3, 1, 4, 2, 5)  # (N, C, g, s, g, s)
    return grid.reshape(n // beta, c, g * s, g * s)


def unstitch(images: torch.Tensor, beta: int) -> torch.Tensor:
    """The inverse a student applies to stitched images (multi-formation): each g x g mosaic (N, C, H, W)
    becomes its beta = g*g tiles, row-major as `stitch` laid them, each resized back to H x W (bilinear), as
    float in [0, 1]: (N * beta, C, H, W)."""
    g = math.isqrt(beta)
    n, c, h, w = images.shape
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    s_h, s_w = h // g, w // g
    x = x[..., :g * s_h, :g * s_w]  # sides not divisible by g: selection stretched the grid, so drop the rest
    tiles = x.reshape(n, c, g, s_h, g, s_w).permute(0, 2, 4, 1, 3, 5).reshape(n * beta, c, s_h, s_w)
    return F.interpolate(tiles, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
