"""Multi-process runs with torch.distributed (launched by torchrun): ranks split classes, refinement batches
and label-plan epochs; files in the run's work folder carry the pieces, so the result is the same as one
process's (bit for bit on CPU with the same thread count)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a no-op for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mine(items) -> list:
    """This rank's share of `items`: every world()-th item from position rank()."""
    return list(items)[rank()::world()]


def gather_to_all(obj):
    """List of every rank's `obj`, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out
