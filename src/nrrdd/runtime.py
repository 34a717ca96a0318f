"""Where and how a run executes: device choice, seeds, torchrun ranks, and the provenance every output records."""
from __future__ import annotations

import hashlib
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nrrdd import NrrddError, __version__


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # under torchrun each rank takes its own GPU
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise NrrddError(f"--device {name}: choose auto, cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise NrrddError(f"--device {name}: no CUDA device is visible; use --device cpu")
    if kind == "cuda" and int(index) >= torch.cuda.device_count():
        raise NrrddError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    dev = torch.device(name)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev



def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)



def class_generator(seed: int, c: int, stream: int = 0) -> torch.Generator:
    """Independent stream per (seed, class): classes can run in any order or on any rank with the same result."""
    return torch.Generator().manual_seed(seed * 1_000_003 + c * 7919 + stream)



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



def source_digest() -> str:
    """sha256 over the package's own source files: names the code of a run even in a copy without .git."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()



def provenance() -> dict:
    """What a reader needs to rerun an output: code version, command, machine."""
    try:
        r = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], capture_output=True, text=True,
                           cwd=Path(__file__).parent, timeout=5)
        commit = r.stdout.strip() if r.returncode == 0 else None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    import torchvision
    return {
        "nrrdd": __version__, "git_commit": commit, "git_dirty": dirty, "source_sha256": source_digest(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "numpy": np.__version__, "machine": platform.node(), "processor": platform.machine(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}",
    }
