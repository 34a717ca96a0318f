"""Model checkpoints as safetensors with a JSON header: no pickles, so loading never runs code."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from nrrdd import NrrddError
from nrrdd.files import atomic_path
from nrrdd.models import Net, create_model


REQUIRED = ("arch", "classes", "image_size", "channels", "mean", "std")


def save_model(path, model: Net, meta: dict) -> None:
    """`meta` must hold arch, classes, image_size, channels, mean, std; anything else (recipe, accuracy) rides along."""
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"nrrdd": json.dumps(meta)})


def read_meta(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise NrrddError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("nrrdd")
    except (SafetensorError, OSError, ValueError) as e:
        raise NrrddError(f"{path}: not a safetensors checkpoint ({e}); nrrdd never unpickles .pt/.pth files") from None
    if raw is None:
        raise NrrddError(f"{path}: safetensors file without nrrdd metadata (arch, classes, normalisation)")
    return json.loads(raw)


def load_model(path, arch: str | None = None, classes: list[str] | None = None,
               device: str | torch.device = "cpu") -> tuple[Net, dict]:
    """Rebuild the model a checkpoint describes; refuse one built for another architecture or class list."""
    meta = read_meta(path)
    if arch is not None and arch != meta["arch"]:
        raise NrrddError(f"{path}: checkpoint is a {meta['arch']} ({len(meta['classes'])} classes), "
                         f"but {arch} was asked for; pass the matching --arch or another checkpoint")
    if classes is not None and list(classes) != list(meta["classes"]):
        raise NrrddError(f"{path}: checkpoint was trained on classes {meta['classes'][:5]}... "
                         f"({len(meta['classes'])}) but the data has {list(classes)[:5]}... ({len(classes)}); "
                         "class names and order must match")
    model = create_model(meta["arch"], len(meta["classes"]), meta["image_size"], meta["channels"],
                         **meta.get("model_kwargs", {}))
    state = load_file(str(path))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise NrrddError(f"{path}: weights do not fit a {meta['arch']}: {str(e).splitlines()[0]}") from None
    return model.set_stats(meta["mean"], meta["std"]).to(device).eval(), meta
