"""Files that survive crashes: atomic writes, manifests, checksums, provenance, device choice."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from nrrdd import NrrddError, __version__
from nrrdd.outdir import MANIFEST

_UMASK = os.umask(0)  # read the umask (there is no getter) and put it back
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    A crash or a full disk leaves the old file (or none), never a partial one that looks valid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide outputs from everyone else on the machine
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise NrrddError(f"disk full while writing {path}: free some space and rerun with --resume") from e
        raise


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json(path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise NrrddError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise NrrddError(f"{path}: not valid JSON ({e})") from None


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    # A copy without .git (e.g. a remote GPU machine) is told its commit by whoever sent it.
    commit = commit or os.environ.get("NRRDD_GIT_COMMIT")
    import torchvision
    return {
        "nrrdd": __version__, "git_commit": commit, "git_dirty": dirty,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "numpy": np.__version__, "machine": platform.node(), "processor": platform.machine(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}",
    }


def _listed(out_dir: Path) -> list[Path]:
    """The files a manifest covers: all but itself and hidden bookkeeping (run file, temporary files)."""
    return [p for p in sorted(out_dir.rglob("*")) if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")]


def write_manifest(out_dir, extra: dict) -> dict:
    """Checksum every file in `out_dir` and write the manifest last: its presence marks the folder complete."""
    out_dir = Path(out_dir)
    files = _listed(out_dir)
    manifest = {**extra, "files": {str(p.relative_to(out_dir)): sha256_file(p) for p in files},
                "sizes": {str(p.relative_to(out_dir)): p.stat().st_size for p in files}}
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def verify_dir(out_dir, quick: bool = False) -> list[str]:
    """Problems found comparing `out_dir` against its manifest (empty list: all good). Sizes first: with
    `quick`, a missing, extra or resized file is reported without hashing anything."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST).exists():
        return [f"{out_dir}: no {MANIFEST} (incomplete or not an nrrdd output)"]
    manifest = read_json(out_dir / MANIFEST)
    want, sizes = manifest.get("files", {}), manifest.get("sizes", {})
    have = {str(p.relative_to(out_dir)) for p in _listed(out_dir)}
    problems = [f"missing: {f}" for f in sorted(set(want) - have)]
    problems += [f"extra: {f}" for f in sorted(have - set(want))]
    both = sorted(set(want) & have)
    resized = [f for f in both if f in sizes and (out_dir / f).stat().st_size != sizes[f]]
    problems += [f"changed: {f}" for f in resized]
    if not (quick and problems):
        problems += [f"changed: {f}" for f in both if f not in resized and sha256_file(out_dir / f) != want[f]]
    return sorted(problems, key=lambda p: p.split(": ", 1)[1])


def require_intact(folder, what: str) -> None:
    """Refuse a folder that no longer matches its manifest (a file truncated, added or edited since)."""
    problems = verify_dir(folder, quick=True)
    if problems:
        raise NrrddError(f"{folder}: the {what} changed since nrrdd wrote it ({len(problems)} problem(s): "
                         f"{'; '.join(problems[:3])}); see `nrrdd verify {folder}`, restore it or pass --no-verify")


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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


def check_finite(loss: torch.Tensor, where: str) -> None:
    """Stop on NaN/inf rather than training on garbage; the caller's last checkpoint stays intact."""
    if not torch.isfinite(loss).all():
        raise NrrddError(f"non-finite loss ({loss.detach().flatten()[0].item()}) at {where}; the last good "
                         "checkpoint is kept: lower the learning rate and rerun with --resume")


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> int:
    """Write a safetensors file atomically; return its size on disk in bytes. Metadata travels as one sorted
    JSON string: safetensors writes several keys in an arbitrary order, which would change the bytes."""
    from safetensors.torch import save_file
    meta = {"nrrdd": json.dumps(metadata, sort_keys=True)} if metadata else None
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return Path(path).stat().st_size


def read_tensor_meta(path) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as h:
            return json.loads((h.metadata() or {}).get("nrrdd", "{}"))
    except Exception as e:  # a pickle or a truncated file: never unpickled, one clear error
        raise NrrddError(f"{path}: not a readable safetensors file ({e})") from None


def load_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types; none executes code
        raise NrrddError(f"{path}: not a readable safetensors file ({e})") from None
