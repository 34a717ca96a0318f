"""Stage 7: a distilled set in the layouts other tools load. `ddranking`: DD-Ranking's (arXiv 2505.13300)
`compute_metrics(image_tensor=..., image_path=...)` inputs: a class-major float tensor normalised as the
evaluator normalises its test set, the class index of each image, and an ImageFolder whose folder names sort
into the class order."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from nrrdd import NrrddError
from nrrdd.data import load_distilled, normalize
from nrrdd.files import atomic_path, write_json
from nrrdd.outdir import check_out, finish_out, open_out
from nrrdd.runtime import provenance


FORMATS = ("ddranking",)


def export(distilled, out_dir, fmt: str = "ddranking", mean=None, std=None, overwrite: bool = False,
           verify: bool = True) -> dict:
    """Write images.pt (float32, N x C x H x W, class-major, normalised with mean/std: by default the set's own,
    i.e. its teacher's), labels.pt (int64 class indices), image_folder/<class index>/<n>.png and export.json."""
    if fmt not in FORMATS:
        raise NrrddError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    split, classes, record = load_distilled(distilled, verify)
    mean, std = mean or record.get("mean"), std or record.get("std")
    if mean is None or std is None:
        raise NrrddError(f"{distilled}: no distill.json records the normalisation; pass --mean and --std")
    if not len(mean) == len(std) == split.images.shape[1]:
        raise NrrddError(f"--mean / --std: {len(mean)} and {len(std)} values for {split.images.shape[1]} channels")
    counts = torch.bincount(split.labels, minlength=len(classes)).tolist()
    if len(set(counts)) != 1:  # DD-Ranking labels the i-th block of ipc images as class i
        raise NrrddError(f"{distilled}: classes hold different numbers of images ({dict(zip(classes, counts))}); "
                         "DD-Ranking needs the same count per class")
    settings = {"format": fmt, "mean": list(mean), "std": list(std)}
    state = check_out(out, "export", settings, overwrite, inputs=[distilled])
    open_out(out, "export", settings, state)
    order = torch.argsort(split.labels, stable=True)
    images, labels = split.images[order], split.labels[order]
    for name, t in (("images.pt", normalize(images, mean, std).contiguous()), ("labels.pt", labels.contiguous())):
        with atomic_path(out / name) as tmp:
            torch.save(t, tmp)
    src_root = Path(distilled) / "images" if (Path(distilled) / "images").is_dir() else Path(distilled)
    sources = sorted(f for f in src_root.rglob("*") if f.is_file())
    by_class = {c: sorted(f for f in sources if f.parent.name == c) for c in classes}
    for i, c in enumerate(classes):
        for j, f in enumerate(by_class[c]):
            dest = out / "image_folder" / f"{i:05d}" / f"{j:05d}{f.suffix.lower()}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
    info = {"kind": "export", "schema_version": 1, "format": fmt, "distilled": str(distilled),
            "classes": classes, "ipc": counts[0], "images": list(images.shape), "mean": list(mean),
            "std": list(std), "preset": record.get("preset"), **provenance(),
            "load": "image_tensor = torch.load('images.pt', weights_only=True); labels = torch.load('labels.pt', "
                    "weights_only=True); or image_path = 'image_folder' (folders 00000.. in class order)"}
    write_json(out / "export.json", info)
    finish_out(out, "export", settings, {"kind": "export"})
    return info
