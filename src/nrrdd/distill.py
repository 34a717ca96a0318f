"""`nrrdd distill`: teacher + data + preset -> a distilled ImageFolder with config, provenance and pictures."""
from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nrrdd import NrrddError
from nrrdd.checkpoint import load_model, read_meta
from nrrdd.config import SynthConfig, to_dict
from nrrdd.data import Dataset, data_mismatch, display_names, load_dataset
from nrrdd.files import load_tensors, read_json, read_tensor_meta, save_tensors, sha256_bytes, sha256_file, write_json
from nrrdd.outdir import check_out, finish_out, open_out
from nrrdd.refine import refine_images, refinement_effect, refinement_mask, to_uint8
from nrrdd.runtime import barrier, init_from_env, is_main, mine, pick_device, provenance
from nrrdd.selection import check_enough_images, initial_images
from nrrdd.viz import image_grid, refinement_panel, save_png


IMAGES = "images"


def peak_memory_mb(device: torch.device) -> dict:
    mem = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        mem["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return mem


def image_name(classes: list[str], c: int, i: int) -> str:
    return f"{IMAGES}/{classes[c]}/{i:04d}.png"


def distill(data: str | Dataset, teacher_path, cfg: SynthConfig, out_dir, preset: str = "custom",
            device: str = "auto", resume: bool = False, overwrite: bool = False, progress: bool = True,
            class_names=None) -> dict:
    """Synthesise `cfg.ipc` images per class and write them (PNG in class folders) with everything to reuse them.
    `class_names`: a file of readable names for the pictures (class folders keep their names)."""
    out = Path(out_dir)
    teacher_meta = read_meta(teacher_path)  # a missing or foreign teacher file fails before anything is decoded
    settings = {"config": to_dict(cfg), "data": data.name if isinstance(data, Dataset) else data,
                "teacher_sha256": sha256_file(teacher_path)}
    state = check_out(out, "distill", settings, overwrite, resume, inputs=[teacher_path, settings["data"]])
    if state == "finished":
        return read_json(out / "distill.json")  # finished earlier: nothing to recompute
    dev = pick_device(device)
    init_from_env(dev)
    progress = progress and is_main()
    t0 = time.time()
    # listed, not decoded: each class's candidate pool is decoded when selected, at the teacher's resolution,
    # so memory follows one pool and the distilled set, not the training set
    ds = data if isinstance(data, Dataset) else load_dataset(data, teacher_meta["image_size"], progress=progress,
                                                               lazy=True)
    teacher, meta = load_model(teacher_path, classes=ds.classes, device=dev)
    why = data_mismatch(meta.get("data_info") or {}, ds.info)
    if why and is_main():
        print(f"warning: {teacher_path} may not fit {ds.name}: {why} (same class names); distilling anyway",
              file=sys.stderr)
    if meta["image_size"] != ds.image_size:
        raise NrrddError(f"{teacher_path}: teacher expects {meta['image_size']} px images, the data has "
                         f"{ds.image_size} px")
    shown = display_names(class_names, ds.classes) if class_names else ds.classes
    check_enough_images(torch.bincount(ds.train.labels, minlength=ds.num_classes).tolist(), ds.classes, cfg)
    timings = {"load_s": round(time.time() - t0, 2)}
    barrier()  # every rank has checked --out before rank 0 opens it
    if is_main():
        open_out(out, "distill", settings, state)
    barrier()
    work = out / ".work"
    work.mkdir(exist_ok=True)

    # ---- stage 1: initial images (CIDD / RDED / noise / random), one file per class, classes split over ranks
    t = time.time()
    x0, y, records = initial_set(teacher, ds, cfg, dev, work, progress)
    timings["select_s"] = round(time.time() - t, 2)

    # ---- stage 2: refinement (none / masked / all)
    t = time.time()
    x, cam = refine_images(teacher, x0, y.to(dev), cfg, work_dir=work, progress=progress)
    timings["refine_s"] = round(time.time() - t, 2)
    refined = cfg.refine != "none" and cfg.iterations > 0
    effect = refinement_effect(teacher, x0, x, y.to(dev), cam, cfg) if refined and is_main() else None
    if not is_main():  # rank 0 writes the outputs
        barrier()
        return {}

    # ---- stage 3: write images, labels, pictures, manifest
    t = time.time()
    images = to_uint8(x, teacher.mean, teacher.std).cpu()
    counts = [0] * ds.num_classes
    names = []
    for img, c in zip(images, y.tolist()):
        names.append(image_name(ds.classes, c, counts[c]))
        save_png(out / names[-1], img)
        counts[c] += 1
    save_tensors(out / "synthetic.safetensors", {"images": x.cpu(), "labels": y.cpu()})  # exact, before PNG
    write_json(out / "selection.json", records)
    image_grid(out / "pictures" / "grid.png", images, y, shown)
    show = torch.stack([torch.nonzero(y == c)[0, 0] for c in range(min(ds.num_classes, 6))])
    before = to_uint8(x0[show.to(x0.device)], teacher.mean, teacher.std).cpu()  # the shown ones only
    refinement_panel(out / "pictures" / "refinement.png", before, images[show], cam[show].cpu(),
                     refinement_mask(cam[show.to(cam.device)], cfg)[:, 0].cpu(), [shown[int(c)] for c in y[show]])
    timings["write_s"] = round(time.time() - t, 2)
    timings["total_s"] = round(time.time() - t0, 2)
    record = {"kind": "distilled", "preset": preset, "config": to_dict(cfg), "seed": cfg.seed,
              "classes": ds.classes, **({"class_names": shown} if class_names else {}), "ipc": cfg.ipc,
              "images": names, "mean": meta["mean"], "std": meta["std"],
              "teacher": {"path": str(teacher_path), "sha256": sha256_file(teacher_path), "arch": meta["arch"],
                          "test_acc": meta.get("test_acc")},
              "data": {"spec": ds.name, **ds.info}, **({"refinement": effect} if effect else {}),
              "timings": timings, "memory": peak_memory_mb(dev),
              **provenance()}
    write_json(out / "config.json", to_dict(cfg))
    write_json(out / "distill.json", record)
    shutil.rmtree(work)
    finish_out(out, "distill", settings, {"kind": "distilled", "preset": preset})
    barrier()
    return record


def initial_set(teacher, ds: Dataset, cfg: SynthConfig, dev, work: Path, progress: bool):
    """Initial images of every class, class-major. Each class is computed by one rank (or loaded from an
    earlier, killed run) and saved to its own file; every rank then reads all of them."""
    merged = work / "init.safetensors"
    key = sha256_bytes(json.dumps(to_dict(cfg), sort_keys=True).encode())[:12]  # stale files never match
    if not merged.exists():
        for c in tqdm(mine(range(ds.num_classes)), desc="select", disable=not progress):
            f = work / f"init_c{c:05d}_{key}.safetensors"
            if f.exists():
                continue
            x, y, rec = initial_images(teacher, ds.train, ds.num_classes, cfg, dev, False, classes=[c])
            save_tensors(f, {"x": x.cpu(), "y": y}, {"selection": rec[0]})
        barrier()
        if is_main():
            parts = [work / f"init_c{c:05d}_{key}.safetensors" for c in range(ds.num_classes)]
            tensors = [load_tensors(p) for p in parts]
            save_tensors(merged, {"x": torch.cat([t["x"] for t in tensors]), "y": torch.cat([t["y"] for t in tensors])},
                         {"selection": [read_tensor_meta(p)["selection"] for p in parts]})
            for p in parts:
                p.unlink()
        barrier()
    saved = load_tensors(merged)
    return saved["x"].to(dev), saved["y"], read_tensor_meta(merged)["selection"]
