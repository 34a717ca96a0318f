"""Stage 1: the teacher, trained on hard labels on the training split (minus validation)."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nrrdd import NrrddError
from nrrdd.checkpoint import load_model, read_meta, save_model
from nrrdd.config import TeacherConfig, to_dict
from nrrdd.data import (Dataset, data_mismatch, dataset_stats, decode_workers, image_batches, load_dataset,
                        random_crop_flip)
from nrrdd.files import read_json, sha256_file, write_json
from nrrdd.models import create_model, merge_nets
from nrrdd.outdir import check_out, check_out_file, finish_out, open_out
from nrrdd.runtime import pick_device, provenance, seed_everything
from nrrdd.training import TrainState, accuracy, check_finite, one_cycle, param_groups


def train_teacher(cfg: TeacherConfig, out_dir, device: str = "auto", resume: bool = False, overwrite: bool = False,
                  data: Dataset | None = None, progress: bool = True) -> dict:
    """Train a teacher on the training split; pick nothing by test accuracy; write teacher.safetensors + results."""
    out, settings = Path(out_dir), to_dict(cfg)
    state_kind = check_out(out, "train-teacher", settings, overwrite, resume, inputs=[cfg.data])
    if state_kind == "finished":
        return read_json(out / "results.json")  # finished earlier: never retrain over it
    t0 = time.time()
    dev = pick_device(device)
    # a folder too large to hold decoded is listed and streamed from disk by decoding workers
    ds = data or load_dataset(cfg.data, cfg.image_size, cfg.val_fraction, cfg.split_seed, progress=progress,
                              lazy="auto")
    mean, std = dataset_stats(ds)
    create_model(cfg.arch, ds.num_classes, ds.image_size, ds.channels, **cfg.model_kwargs())  # a bad name fails here
    open_out(out, "train-teacher", settings, state_kind)
    gen = seed_everything(cfg.seed)
    model = create_model(cfg.arch, ds.num_classes, ds.image_size, ds.channels, **cfg.model_kwargs())
    model = model.set_stats(mean, std).to(dev)
    opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    steps_per_epoch = math.ceil(len(ds.train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: one_cycle(s, total, cfg.warmup))
    state, start, history = TrainState(out / "state.pt"), 0, []
    if resume and state.exists():
        counters = state.load(model, opt, gen, config=settings)
        start, history = counters["epoch"], list(counters.get("history", []))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: one_cycle(s, total, cfg.warmup),
                                                  last_epoch=start * steps_per_epoch - 1)
    x_all = ds.train.images.to(dev) if isinstance(ds.train.images, torch.Tensor) else ds.train.images
    y_all, workers = ds.train.labels.to(dev), decode_workers()
    bar = tqdm(range(start, cfg.epochs), desc="teacher", disable=not progress, initial=start, total=cfg.epochs)
    for epoch in bar:
        model.train()
        batches = list(torch.randperm(len(ds.train), generator=gen).to(dev).split(cfg.batch_size))
        for idx, xb in zip(batches, image_batches(x_all, batches, dev, workers)):
            x = random_crop_flip(model.normalize(xb), cfg.crop_pad, gen)
            loss = F.cross_entropy(model(x), y_all[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        check_finite(loss, f"teacher epoch {epoch + 1}")
        val = accuracy(model, ds.val, dev)
        history.append({"epoch": epoch + 1, "loss": loss.item(), "val_acc": val, "time_s": state.elapsed()})
        bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.1f}")
        state.save(model, opt, gen, epoch=epoch + 1, history=history, config=settings)
    # The final epoch's weights are the teacher: no epoch is chosen by any accuracy.
    test = accuracy(model, ds.test, dev)
    meta = {"arch": cfg.arch, "classes": ds.classes, "image_size": ds.image_size, "channels": ds.channels,
            "mean": list(mean), "std": list(std), "model_kwargs": cfg.model_kwargs(), "recipe": settings,
            "val_acc": history[-1]["val_acc"] if history else None, "test_acc": test, "data_info": ds.info}
    save_model(out / "teacher.safetensors", model.cpu(), meta)
    state.path.unlink(missing_ok=True)
    results = {"kind": "teacher", "config": settings, "val_acc": meta["val_acc"], "test_acc": test,
               "history": history, "train_s": round(state.elapsed(), 1),
               "wall_time_s": round(time.time() - t0, 1), "data": ds.info, **provenance()}
    write_json(out / "results.json", results)
    finish_out(out, "train-teacher", settings, {"kind": "teacher"})
    return results


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def class_names(spec) -> list[str]:
    """Class names in output order: a text file (one per line) or an image folder (its sorted class folders,
    or those of its train/)."""
    path = Path(spec)
    if path.is_file():
        names = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    elif path.is_dir():
        root = path / "train" if (path / "train").is_dir() else path
        names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    else:
        raise NrrddError(f"--classes {spec}: neither a file of class names nor a folder of class folders")
    if len(set(names)) != len(names) or not names:
        raise NrrddError(f"--classes {spec}: {len(names)} names, {len(names) - len(set(names))} repeated")
    return names


def import_teacher(arch: str, weights, classes: list[str], out, image_size: int = 224, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, overwrite: bool = False) -> dict:
    """A standard torchvision checkpoint (a state dict, read with weights_only: no code runs) as an nrrdd
    teacher: safetensors with the metadata distill, relabel and evaluate read (classes, input size,
    normalisation). The wrapped net computes exactly what the torchvision model computes."""
    import torchvision

    from nrrdd.models import TORCHVISION
    if arch not in TORCHVISION:
        raise NrrddError(f"--arch {arch}: import-teacher reads torchvision's {', '.join(TORCHVISION)}")
    out, weights = Path(out), Path(weights)
    check_out_file(out, overwrite, "an nrrdd checkpoint", read_meta)
    if not weights.is_file():
        raise NrrddError(f"--weights {weights}: file not found")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code, or not a torch file at all
        raise NrrddError(f"--weights {weights}: not a plain state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NrrddError(f"--weights {weights}: expected a dict of tensors (a state dict)")
    m = getattr(torchvision.models, arch)(weights=None, num_classes=len(classes))
    try:
        m.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    except RuntimeError as e:
        why = " ".join(str(e).split())[:400]
        raise NrrddError(f"--weights {weights}: does not fit a torchvision {arch} with {len(classes)} classes: "
                         f"{why}") from None
    net = TORCHVISION[arch](m)
    registered = f"{arch}_imagenet" if arch.startswith("resnet") else arch  # the stem the weights were made for
    meta = {"arch": registered, "classes": classes,
            "image_size": image_size, "channels": 3, "mean": list(mean), "std": list(std),
            "imported_from": {"torchvision": arch, "weights": str(weights), "sha256": sha256_file(weights)}}
    save_model(out, net.eval(), meta)
    return meta


def ensemble_teachers(paths: list, out, data: str | None = None, overwrite: bool = False,
                      device: str = "auto", progress: bool = True) -> dict:
    """Several teachers of the same classes, input size and normalisation as one teacher file whose logits are
    the mean of theirs (EDC's ensemble relabelling; `models.merge_nets`). With `data`, its validation and test
    accuracy (on the first member's validation split) are measured and recorded."""
    out = Path(out)
    check_out_file(out, overwrite, "an nrrdd checkpoint", read_meta)
    if len(paths) < 2:
        raise NrrddError(f"an ensemble needs at least two teachers, got {len(paths)}")
    metas = [read_meta(p) for p in paths]
    first = metas[0]
    for p, m in zip(paths[1:], metas[1:]):
        for key in ("classes", "image_size", "channels"):
            if m[key] != first[key]:
                raise NrrddError(f"{p}: its {key} differ from {paths[0]}'s; an ensemble's teachers must agree")
        if any(abs(a - b) > 1e-4 for a, b in zip(m["mean"] + m["std"], first["mean"] + first["std"])):
            raise NrrddError(f"{p}: normalised with other mean/std than {paths[0]} "
                             f"({m['mean']}/{m['std']} vs {first['mean']}/{first['std']}); an ensemble feeds its "
                             "members one input")
    dev = pick_device(device)
    nets = [load_model(p, device=dev)[0] for p in paths]
    probe = torch.zeros(1, first["channels"], first["image_size"], first["image_size"], device=dev)
    with torch.no_grad():
        sides = {tuple(n.features(probe).shape[-2:]) for n in nets}
    if len(sides) > 1:
        raise NrrddError(f"the teachers' last feature maps differ in size {sorted(sides)}: their CAMs cannot "
                         "be averaged")
    net = merge_nets(nets).set_stats(first["mean"], first["std"]).eval()
    members = [{"file": Path(p).name, "sha256": sha256_file(p), "arch": m["arch"],
                "model_kwargs": m.get("model_kwargs", {}), "val_acc": m.get("val_acc"),
                "test_acc": m.get("test_acc"), "recipe": m.get("recipe")} for p, m in zip(paths, metas)]
    # a member trained on other files or another validation split makes validation figures unsafe: say so
    whys = [(p, data_mismatch(m.get("data_info") or {}, first.get("data_info") or {}))
            for p, m in zip(paths[1:], metas[1:])]
    for p, why in whys:
        if why:
            print(f"warning: {p}: unlike {paths[0]}, {why}", file=sys.stderr)
    same_data = not any(why for _, why in whys)
    meta = {"arch": "ensemble", "classes": first["classes"], "image_size": first["image_size"],
            "channels": first["channels"], "mean": first["mean"], "std": first["std"],
            "model_kwargs": {"members": [{"arch": m["arch"], "model_kwargs": m["model_kwargs"]} for m in members]},
            "members": members, "data_info": first.get("data_info") if same_data else None,
            "val_acc": None, "test_acc": None}
    if data is not None:
        recipe = first.get("recipe") or {}
        ds = load_dataset(data, first["image_size"], recipe.get("val_fraction", 0.1), recipe.get("split_seed", 0),
                          progress=progress, lazy="auto")
        if ds.classes != first["classes"]:
            raise NrrddError(f"--data {data}: its classes are not the teachers'")
        meta["val_acc"], meta["test_acc"] = accuracy(net, ds.val, dev), accuracy(net, ds.test, dev)
    save_model(out, net.cpu(), meta)
    return meta
