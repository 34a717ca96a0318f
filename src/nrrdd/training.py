"""The pieces every training loop shares: optimiser groups, the one cosine schedule, accuracy, a stop on
non-finite losses, resumable state."""
from __future__ import annotations

import copy
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from nrrdd import NrrddError
from nrrdd.data import Split
from nrrdd.files import atomic_path
from nrrdd.models import Net, batch_size_for


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm parameters (1-d tensors), as RDED's and timm's recipes do."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine(step: float, total: float, span: float = 1.0) -> float:
    """The one cosine schedule: 1 at step 0, down to 0 at `span * total` (span 2 stops halfway, at 0.5)."""
    return 0.5 * (1 + math.cos(math.pi * step / (span * total)))


def one_cycle(step: int, total: int, warmup: float) -> float:
    """Linear warm-up to 1, then cosine down to 0."""
    w = max(1, int(warmup * total))
    if step < w:
        return (step + 1) / w
    return cosine(step - w, max(1, total - w))


@torch.no_grad()
def predict(model: Net, images: torch.Tensor, device, batch_size: int | None = None) -> torch.Tensor:
    """Logits (N, C) of uint8 images (a tensor or LazyImages, decoded a batch at a time), in eval mode, on
    `device`; returned on the CPU."""
    batch_size = batch_size or batch_size_for(images, 1000)
    was = model.training
    model.eval()
    out = [model(model.normalize(images[i:i + batch_size].to(device, non_blocking=True))).float().cpu()
           for i in range(0, len(images), batch_size)]
    model.train(was)
    return torch.cat(out)


def accuracy(model: Net, split: Split, device) -> float:
    if len(split) == 0:
        return float("nan")
    return (predict(model, split.images, device).argmax(1) == split.labels).float().mean().item() * 100


def ema_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` that `ema_update` moves towards it after every step."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Weights: ema <- decay * ema + (1 - decay) * model; buffers (BatchNorm statistics, counters) copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def check_finite(loss: torch.Tensor, where: str) -> None:
    """Stop on NaN/inf rather than training on garbage; the caller's last checkpoint stays intact."""
    if not torch.isfinite(loss).all():
        raise NrrddError(f"non-finite loss ({loss.detach().flatten()[0].item()}) at {where}; the last good "
                         "checkpoint is kept: lower the learning rate and rerun with --resume")


class TrainState:
    """Resumable state of a training loop (model, optimiser, RNG, counters), saved atomically, loaded without pickles.
    It also keeps the seconds trained so far, so a run resumed near its end still reports its whole cost (the
    work between the last save and a kill is lost, and not counted)."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None  # None: a run that only keeps time, never saves
        self.before_s, self.t0 = 0.0, time.time()

    def elapsed(self) -> float:
        """Seconds of training in this process plus those recorded by the runs it resumed."""
        return self.before_s + time.time() - self.t0

    def save(self, model, opt, gen: torch.Generator, **counters) -> None:
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                 "torch_rng": torch.get_rng_state(), "train_s": self.elapsed(), **counters}
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
        self.before_s, self.t0 = float(state.pop("train_s", 0.0)), time.time()
        return state

    def _unreadable(self, e: Exception) -> NrrddError:
        """A pickle with code, a truncated file, another model's state: one clear line, not a traceback."""
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        why = next((ln for ln in lines if "Unsupported" in ln or "unpickler error" in ln.lower()
                    or "size mismatch" in ln), lines[0])
        return NrrddError(f"{self.path}: not a readable training state ({why[:200]}); delete it to start this run "
                          "afresh, or pass --overwrite")

    def exists(self) -> bool:
        return self.path is not None and self.path.exists()
