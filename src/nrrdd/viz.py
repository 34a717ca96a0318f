"""Pictures a user would rather look at than read: grids of distilled images, CAM / mask / refinement panels."""
# isort: skip_file (the backend must be chosen between the two matplotlib imports)
from __future__ import annotations

from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from nrrdd.files import atomic_path  # noqa: E402


def save_png(path, img_chw_uint8: torch.Tensor) -> None:
    """Lossless PNG of one (C, H, W) uint8 image, written atomically."""
    arr = img_chw_uint8.permute(1, 2, 0).cpu().numpy()
    im = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def image_grid(path, images: torch.Tensor, labels: torch.Tensor, classes: list[str], max_cols: int = 10,
               max_rows: int = 20) -> None:
    """One row per class, up to `max_cols` images each, labelled with the class name."""
    rows = [c for c in range(len(classes)) if (labels == c).any()][:max_rows]
    cols = min(max_cols, max(int((labels == c).sum()) for c in rows))
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 0.9 + 1, len(rows) * 0.9), squeeze=False)
    for r, c in enumerate(rows):
        imgs = images[labels == c][:cols]
        for j in range(cols):
            ax = axes[r][j]
            ax.axis("off")
            if j < len(imgs):
                ax.imshow(imgs[j].permute(1, 2, 0).cpu().numpy().squeeze(), interpolation="nearest",
                          cmap="gray" if imgs.shape[1] == 1 else None)
        axes[r][0].text(-0.1, 0.5, classes[c], transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.12, wspace=0.05, hspace=0.05)
    _save(fig, path)


def refinement_panel(path, before: torch.Tensor, after: torch.Tensor, cam: torch.Tensor, mask: torch.Tensor,
                     titles: list[str]) -> None:
    """Per image: initial, CAM overlay, mask M, refined, |refined - initial| scaled to its largest value over
    the panel (a fixed gain leaves gentle refinements black), or "no refinement" where nothing changed."""
    n = len(before)
    diff = (after.float() - before.float()).abs() / 255
    top = diff.max().item()
    diff_title = f"|diff|, max {top * 255:.0f}/255" if top > 0 else "no refinement"
    fig, axes = plt.subplots(n, 5, figsize=(7.5, 1.6 * n), squeeze=False)
    for i in range(n):
        b, a = before[i].permute(1, 2, 0).float().numpy() / 255, after[i].permute(1, 2, 0).float().numpy() / 255
        d = diff[i].permute(1, 2, 0).numpy() / top if top > 0 else None
        panels = [(b, None, "initial"), (b, "cam", "CAM"), (mask[i].numpy(), "gray", "mask M"), (a, None, "refined"),
                  (d, None, diff_title)]
        for j, (img, kind, name) in enumerate(panels):
            ax = axes[i][j]
            ax.axis("off")
            if img is None:
                ax.text(0.5, 0.5, "no refinement", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            elif kind == "cam":
                ax.imshow(img.squeeze(), interpolation="nearest")
                ax.imshow(cam[i].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            else:
                ax.imshow(img.squeeze(), cmap=kind, interpolation="nearest", vmin=0,
                          vmax=mask.max().item() if kind else None)
            if i == 0:
                ax.set_title(name, fontsize=8)
        axes[i][0].text(-0.1, 0.5, titles[i], transform=axes[i][0].transAxes, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.15, wspace=0.05, hspace=0.1)
    _save(fig, path)


def _save(fig, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
