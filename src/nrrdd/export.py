"""Stage 7: a distilled set in the layouts other tools load. `ddranking`: DD-Ranking's (arXiv 2505.13300)
`compute_metrics(image_tensor=..., image_path=...)` inputs: a class-major float tensor normalised as the
evaluator normalises its test set, the class index of each image, and an ImageFolder whose folder names sort
into the class order."""
from __future__ import annotations

from pathlib import Path

import torch

from nrrdd import NrrddError
from nrrdd.data import distilled_root, load_distilled, normalize, scan_image_folder
from nrrdd.files import atomic_path, write_bytes, write_json
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
    order = torch.argsort(split.labels, stable=True).tolist()  # class-major, files in the order decoded
    images, labels = split.images[order], split.labels[order]
    for name, t in (("images.pt", normalize(images, mean, std).contiguous()), ("labels.pt", labels.contiguous())):
        with atomic_path(out / name) as tmp:
            torch.save(t, tmp)
    tree, _, items = scan_image_folder(distilled_root(distilled))  # the listing load_distilled decoded
    counters = [0] * len(classes)
    for i in order:
        rel, c = items[i]
        dest = out / "image_folder" / f"{c:05d}" / f"{counters[c]:05d}{Path(rel).suffix.lower()}"
        counters[c] += 1
        write_bytes(dest, tree.read(rel))
    info = {"kind": "export", "schema_version": 1, "format": fmt, "distilled": str(distilled),
            "classes": classes, "ipc": counts[0], "images": list(images.shape), "mean": list(mean),
            "std": list(std), "preset": record.get("preset"), **provenance(),
            "load": "image_tensor = torch.load('images.pt', weights_only=True); labels = torch.load('labels.pt', "
                    "weights_only=True); or image_path = 'image_folder' (folders 00000.. in class order)"}
    write_json(out / "export.json", info)
    finish_out(out, "export", settings, {"kind": "export"})
    return info
