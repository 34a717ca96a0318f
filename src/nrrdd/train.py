"""Teacher training (hard labels) and the pieces every training loop shares: optimiser groups, schedules,
accuracy, resumable state."""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from nrrdd import NrrddError
from nrrdd.checkpoint import save_model
from nrrdd.config import TeacherConfig, to_dict
from nrrdd.data import Dataset, Split, load_dataset, normalize, random_crop_flip
from nrrdd.files import atomic_path, check_finite, pick_device, provenance, read_json, seed_everything, write_json
from nrrdd.outdir import check_out, finish_out, open_out
from nrrdd.models import create_model


# ---------------------------------------------------------------- shared pieces

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm parameters (1-d tensors), as RDED's and timm's recipes do."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def one_cycle(step: int, total: int, warmup: float) -> float:
    """Linear warm-up to 1, then cosine down to 0."""
    w = max(1, int(warmup * total))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, mean, std, device, batch_size: int = 1000) -> torch.Tensor:
    """Logits (N, C) of uint8 images, in eval mode, on `device`; returned on the CPU."""
    was = model.training
    model.eval()
    out = [model(normalize(images[i:i + batch_size].to(device, non_blocking=True), mean, std)).float().cpu()
           for i in range(0, len(images), batch_size)]
    model.train(was)
    return torch.cat(out)


def accuracy(model, split: Split, mean, std, device) -> float:
    if len(split) == 0:
        return float("nan")
    return (predict(model, split.images, mean, std, device).argmax(1) == split.labels).float().mean().item() * 100


class TrainState:
    """Resumable state of a training loop (model, optimiser, RNG, counters), saved atomically, loaded without pickles."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def save(self, model, opt, gen: torch.Generator, **counters) -> None:
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                 "torch_rng": torch.get_rng_state(), **counters}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def load(self, model, opt, gen: torch.Generator, config: dict | None = None) -> dict:
        """Restore model, optimiser and RNGs; with `config`, refuse a state saved under another recipe."""
        try:
            with warnings.catch_warnings():  # torch's notes on pickle protocols would only add noise to the error
                warnings.simplefilter("ignore")
                state = torch.load(self.path, map_location="cpu", weights_only=True)  # never runs code
        except Exception as e:
            raise self._unreadable(e) from None
        if not isinstance(state, dict):
            raise self._unreadable(TypeError(f"holds a {type(state).__name__}, not a training state"))
        if config is not None and state.get("config", config) != config:
            raise NrrddError(f"{self.path.parent}: the unfinished run there used another recipe; resume it with the "
                             "same settings, or pass --overwrite to start again")
        try:
            model.load_state_dict(state.pop("model"))
            opt.load_state_dict(state.pop("opt"))
            gen.set_state(state.pop("gen"))
            torch.set_rng_state(state.pop("torch_rng"))
        except Exception as e:
            raise self._unreadable(e) from None
        return state

    def _unreadable(self, e: Exception) -> NrrddError:
        """A pickle with code, a truncated file, another model's state: one clear line, not a traceback."""
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        why = next((ln for ln in lines if "Unsupported" in ln or "unpickler error" in ln.lower()
                    or "size mismatch" in ln), lines[0])
        return NrrddError(f"{self.path}: not a readable training state ({why[:200]}); delete it to start this run "
                          "afresh, or pass --overwrite")

    def exists(self) -> bool:
        return self.path.exists()


# ---------------------------------------------------------------- teacher

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
    model = create_model(cfg.arch, ds.num_classes, ds.image_size, ds.channels, **cfg.model_kwargs()).to(dev)
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
            x = random_crop_flip(normalize(x_all[idx], ds.mean, ds.std), cfg.crop_pad, gen)
            loss = F.cross_entropy(model(x), y_all[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        check_finite(loss, f"teacher epoch {epoch + 1}")
        val = accuracy(model, ds.val, ds.mean, ds.std, dev)
        history.append({"epoch": epoch + 1, "loss": loss.item(), "val_acc": val, "time_s": time.time() - t0})
        bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.1f}")
        state.save(model, opt, gen, epoch=epoch + 1, history=history, config=settings)
    # The final epoch's weights are the teacher: no epoch is chosen by any accuracy.
    test = accuracy(model, ds.test, ds.mean, ds.std, dev)
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
