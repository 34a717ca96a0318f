"""Files that survive crashes: atomic writes, manifests, checksums, provenance, device choice."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from nrrdd import NrrddError
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
