"""Stage 1: the teacher, trained on hard labels on the training split (minus validation)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nrrdd.checkpoint import save_model
from nrrdd.config import TeacherConfig, to_dict
from nrrdd.data import Dataset, load_dataset, random_crop_flip
from nrrdd.files import read_json, write_json
from nrrdd.models import create_model
from nrrdd.outdir import check_out, finish_out, open_out
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
    ds = data or load_dataset(cfg.data, cfg.image_size, cfg.val_fraction, cfg.split_seed, progress=progress)
    create_model(cfg.arch, ds.num_classes, ds.image_size, ds.channels, **cfg.model_kwargs())  # a bad name fails here
    open_out(out, "train-teacher", settings, state_kind)
    gen = seed_everything(cfg.seed)
    model = create_model(cfg.arch, ds.num_classes, ds.image_size, ds.channels, **cfg.model_kwargs())
    model = model.set_stats(ds.mean, ds.std).to(dev)
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
    x_all, y_all = ds.train.images.to(dev), ds.train.labels.to(dev)
    bar = tqdm(range(start, cfg.epochs), desc="teacher", disable=not progress, initial=start, total=cfg.epochs)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(ds.train), generator=gen).to(dev)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = random_crop_flip(model.normalize(x_all[idx]), cfg.crop_pad, gen)
            loss = F.cross_entropy(model(x), y_all[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        check_finite(loss, f"teacher epoch {epoch + 1}")
        val = accuracy(model, ds.val, dev)
        history.append({"epoch": epoch + 1, "loss": loss.item(), "val_acc": val, "time_s": time.time() - t0})
        bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.1f}")
        state.save(model, opt, gen, epoch=epoch + 1, history=history, config=settings)
    # The final epoch's weights are the teacher: no epoch is chosen by any accuracy.
    test = accuracy(model, ds.test, dev)
    meta = {"arch": cfg.arch, "classes": ds.classes, "image_size": ds.image_size, "channels": ds.channels,
            "mean": list(ds.mean), "std": list(ds.std), "model_kwargs": cfg.model_kwargs(), "recipe": settings,
            "val_acc": history[-1]["val_acc"] if history else None, "test_acc": test, "data_info": ds.info}
    save_model(out / "teacher.safetensors", model.cpu(), meta)
    state.path.unlink(missing_ok=True)
    results = {"kind": "teacher", "config": settings, "val_acc": meta["val_acc"], "test_acc": test,
               "history": history, "wall_time_s": round(time.time() - t0, 1), "data": ds.info, **provenance()}
    write_json(out / "results.json", results)
    finish_out(out, "train-teacher", settings, {"kind": "teacher"})
    return results
