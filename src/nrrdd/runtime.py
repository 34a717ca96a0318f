"""Where and how a run executes: device choice, seeds, torchrun ranks, and the provenance every output records."""
from __future__ import annotations

import hashlib
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nrrdd import NrrddError, __version__


SCHEMA_VERSION = 1  # of every results record (docs/results.md); provenance() stamps it


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


def _cpu_times() -> tuple[int, int]:
    """(all, idle) jiffies of every core so far, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]  # idle + iowait


def idle_cores(interval: float = 0.2) -> int:
    """Cores other processes leave idle now (at least 1), sampled over `interval` seconds: what this process
    can use without torch's spinning threads fighting for cores already taken. A load average would count
    the previous command of a script as a competitor."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        total0, idle0 = _cpu_times()
        time.sleep(interval)
        total1, idle1 = _cpu_times()
        busy = (1 - (idle1 - idle0) / max(1, total1 - total0)) * (os.cpu_count() or cores)
    except (OSError, ValueError, IndexError):  # no /proc: the last minute's load average
        busy = os.getloadavg()[0]
    return max(1, min(cores, round(cores - busy)))


def set_threads(spec: str) -> int:
    """Apply --threads: a count, 0 (torch's default) or auto: $OMP_NUM_THREADS where the user set it, else
    `idle_cores`. Returns the count in force (provenance records it: CPU float sums depend on it)."""
    if spec != "auto" and not spec.isdigit():
        raise NrrddError(f"--threads {spec}: give a number of threads, 0 (torch's default) or auto")
    if spec == "auto" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(idle_cores())
    elif spec.isdigit() and int(spec) > 0:
        torch.set_num_threads(int(spec))
    return torch.get_num_threads()


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


def source_digest() -> str:
    """sha256 over the package's own source files: names the code of a run even in a copy without .git."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def git_state(where: Path) -> tuple[str | None, bool | None]:
    """HEAD commit and whether tracked files differ from it, of the repository holding `where`; else of the
    working directory's (a run from a copy of the source, e.g. one kept apart from edits, made from that
    checkout: its source_sha256 says which source it was); (None, None) outside any."""
    def git(*args, cwd):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd, timeout=5)
    try:
        for cwd in (where, Path.cwd()):
            r = git("rev-parse", "--verify", "HEAD", cwd=cwd)
            if r.returncode == 0:
                dirty = git("status", "--porcelain", "--untracked-files=no", cwd=cwd).stdout.strip()
                return r.stdout.strip(), bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return None, None


def provenance() -> dict:
    """What a reader needs to rerun an output: record format, code version (git commit, or without .git the
    source digest), command, machine."""
    commit, dirty = git_state(Path(__file__).parent)
    import torchvision
    return {
        "schema_version": SCHEMA_VERSION, "nrrdd": __version__, "git_commit": commit, "git_dirty": dirty,
        "source_sha256": source_digest(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "numpy": np.__version__, "machine": platform.node(), "processor": platform.machine(),
        # the SIMD kernels torch picked (AVX2, AVX512...): gradient-based refinement can round differently across them
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}",
    }
