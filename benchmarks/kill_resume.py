"""Kill-and-resume check of every long command (train-teacher, distill, evaluate) on the embedded digits data.

Each command runs once uninterrupted (the reference), then three more times as real sub-processes that are
killed with SIGKILL at three different points of progress seen on disk (a checkpoint, a work file, a final
output); each killed run is resumed with `--resume`, and the resumed output must be bit-identical to the
reference (same seed, CPU, one thread):

    python benchmarks/kill_resume.py                  # a few minutes on 2 CPU cores
    -> benchmarks/results/kill_resume.json            # per command and kill point: when, sha256s, match

Compared: the teacher's tensors (train-teacher), every PNG + synthetic.safetensors (distill), the per-seed
validation and test accuracies (evaluate). The helpers below (commands, markers, kill, digests) are shared with
tests/test_faults.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "kill_resume.json"

# Small settings: seconds per run on one CPU thread, yet several checkpoints / work files per run.
ARGS = {
    "train-teacher": ["--data", "digits", "--width", "16", "--epochs", "4", "--batch-size", "128"],
    "distill": ["--data", "digits", "--ipc", "2", "--iterations", "40", "--refine-batch", "5"],  # 4 batches
    "evaluate": ["--epochs", "8", "--seeds", "2", "--checkpoint-every", "2", "--width", "16"],
}
COMMON = ["--device", "cpu", "--quiet"]


@dataclass(frozen=True)
class Marker:
    """A point of progress visible on disk: the `count`-th new version of `path` (relative to --out; a glob)
    since the launch. Atomic writes replace a file, so every checkpoint save is a new version."""
    path: str
    count: int = 1
    delay: float = 0.0  # seconds between seeing the marker and the kill

    def __str__(self) -> str:
        nth = {1: "1st", 2: "2nd", 3: "3rd"}.get(self.count, f"{self.count}th")
        return f"{self.path} ({nth} new version)" + (f" + {self.delay} s" if self.delay else "")


# Three kill points per command, early to late.
KILL_POINTS = {
    "train-teacher": [Marker("state.pt", 1), Marker("state.pt", 3), Marker("teacher.safetensors")],
    "distill": [Marker(".work/init.safetensors"), Marker(".work/refined_00001.safetensors"),
                Marker("synthetic.safetensors")],
    "evaluate": [Marker("seeds/.state_0.pt"), Marker("seeds/seed_0.json"), Marker("seeds/.state_1.pt", 2)],
}


def cli_env(cache) -> dict:
    """Sub-process environment: one intra-op thread (bit-identical CPU results need the same thread count)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NRRDD_CACHE": str(cache),
            "PYTHONUNBUFFERED": "1"}


def command(name: str, out, teacher=None, distilled=None, resume: bool = False) -> list[str]:
    """argv of `nrrdd <name>` with the small settings above (distill needs a teacher, evaluate a distilled set)."""
    extra = {"distill": ["--teacher", str(teacher)], "evaluate": ["--distilled", str(distilled)]}.get(name, [])
    return ([sys.executable, "-m", "nrrdd", name, *ARGS[name], *extra, *COMMON, "--out", str(out)]
            + (["--resume"] if resume else []))


def run(argv: list[str], env: dict, timeout: float = 300) -> float:
    """Run to completion; raise with the tail of stderr on failure. Returns the wall time in seconds."""
    t0 = time.monotonic()
    r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return round(time.monotonic() - t0, 2)


def _versions(out: Path, pattern: str) -> set:
    found = set()
    for p in out.glob(pattern):
        try:
            st = p.stat()
        except FileNotFoundError:  # replaced or removed between glob and stat
            continue
        found.add((str(p), st.st_ino, st.st_mtime_ns, st.st_size))
    return found


def progress_files(out: Path) -> list[str]:
    """What the folder holds (PNG files summarised per folder): the state a resume starts from."""
    if not out.exists():
        return []
    files, pngs = [], {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            rel = p.relative_to(out)
            if p.suffix == ".png" and rel.parts[0] == "images":
                pngs["images"] = pngs.get("images", 0) + 1
            else:
                files.append(str(rel))
    return files + [f"{k}/**/*.png x {n}" for k, n in pngs.items()]


def kill_at(argv: list[str], env: dict, out, marker: Marker, timeout: float = 300) -> dict:
    """Start `argv`, poll `out` for `marker`, SIGKILL the process as soon as it is seen (after marker.delay).

    If the process ends before the marker appears (a race on a fast machine) it is not killed: `killed` is
    false and the resume that follows starts from a finished or partial folder, which must also work."""
    out = Path(out)
    before = _versions(out, marker.path)
    seen: set = set()
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        hit = False
        while p.poll() is None:
            seen |= _versions(out, marker.path) - before
            if len(seen) >= marker.count:
                hit = True
                if marker.delay:
                    time.sleep(marker.delay)
                p.send_signal(signal.SIGKILL)
                break
            if time.monotonic() - t0 > timeout:
                p.kill()
                p.wait()
                raise RuntimeError(f"{' '.join(argv)}: no {marker} within {timeout} s")
            time.sleep(0.002)
        rc = p.wait()
        elapsed = round(time.monotonic() - t0, 3)
        if rc not in (0, -signal.SIGKILL):
            err.seek(0)
            raise RuntimeError(f"{' '.join(argv)} exited {rc} before the kill:\n{err.read()[-3000:]}")
    return {"marker": str(marker), "marker_seen": hit, "killed": rc == -signal.SIGKILL, "elapsed_s": elapsed,
            "on_disk": progress_files(out)}


# ---------------------------------------------------------------- what must be bit-identical

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def teacher_tensors(out) -> dict[str, str]:
    """sha256 of every tensor of teacher.safetensors (name, dtype, shape and bytes)."""
    import torch
    from safetensors.torch import load_file
    tensors = load_file(str(Path(out) / "teacher.safetensors"))
    raw = {k: v.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() for k, v in tensors.items()}
    return {k: _sha(f"{v.dtype}{tuple(v.shape)}".encode() + raw[k]) for k, v in sorted(tensors.items())}


def distilled_files(out) -> dict[str, str]:
    """sha256 of every PNG (images and pictures) and of synthetic.safetensors."""
    out = Path(out)
    files = sorted(out.rglob("*.png")) + [out / "synthetic.safetensors"]
    return {str(p.relative_to(out)): _sha(p.read_bytes()) for p in files}


def evaluation_values(out) -> list[dict]:
    """Per-seed accuracies of results.json (time_s left out: it is a measurement, not a result)."""
    per_seed = json.loads((Path(out) / "results.json").read_text())["per_seed"]
    return [{k: r[k] for k in ("seed", "val_acc", "test_acc", "weights_sha256")} for r in per_seed]


OUTPUT = {"train-teacher": teacher_tensors, "distill": distilled_files, "evaluate": evaluation_values}


def digest(name: str, out) -> str:
    return _sha(json.dumps(OUTPUT[name](out), sort_keys=True).encode())


# ---------------------------------------------------------------- the benchmark

def _git(*args) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", help="folder for the runs (default: a temporary folder, removed afterwards)")
    ap.add_argument("--out", default=str(RESULTS), help=f"results JSON (default: {RESULTS.relative_to(REPO)})")
    a = ap.parse_args(argv)
    t_start = time.monotonic()
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="kill_resume-")
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    env = cli_env(work / "cache")
    inputs = {"teacher": None, "distilled": None}
    report: dict = {}
    try:
        for name in ("train-teacher", "distill", "evaluate"):
            ref = work / name / "reference"
            shutil.rmtree(work / name, ignore_errors=True)
            entry = {"command": " ".join(command(name, ref, **inputs)).replace(str(work), "$WORK"),
                     "resume_command": " ".join(command(name, work / name / "killed_N", resume=True, **inputs)
                                                ).replace(str(work), "$WORK"),
                     "reference_wall_s": run(command(name, ref, **inputs), env)}
            entry["reference_sha256"] = digest(name, ref)
            entry["kills"] = []
            for i, marker in enumerate(KILL_POINTS[name]):
                out = work / name / f"killed_{i}"
                k = kill_at(command(name, out, **inputs), env, out, marker)
                k["resume_wall_s"] = run(command(name, out, resume=True, **inputs), env)
                k["resumed_sha256"] = digest(name, out)
                k["match"] = k["resumed_sha256"] == entry["reference_sha256"]
                entry["kills"].append(k)
                print(f"{name:13s} kill at {k['marker']:45s} {k['elapsed_s']:6.2f} s  killed={k['killed']!s:5s} "
                      f"match={k['match']}", flush=True)
            report[name] = entry
            if name == "train-teacher":
                inputs = {"teacher": ref / "teacher.safetensors"}
            elif name == "distill":
                inputs = {"distilled": ref}
    finally:
        if tmp is not None:
            tmp.cleanup()
    import torch
    result = {
        "kind": "kill_resume",
        "all_match": all(k["match"] for e in report.values() for k in e["kills"]),
        "kills_landed": sum(k["killed"] for e in report.values() for k in e["kills"]),
        "compared": {"train-teacher": "tensors of teacher.safetensors", "distill": "every PNG + synthetic.safetensors",
                     "evaluate": "results.json per_seed (seed, val_acc, test_acc, student weights sha256)"},
        "commands": report,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "machine": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "threads": "OMP_NUM_THREADS=1",
        "wall_time_s": round(time.monotonic() - t_start, 1),
    }
    from nrrdd.files import write_json
    write_json(a.out, result)
    print(f"all match: {result['all_match']} ({result['kills_landed']} of 9 kills landed) -> {a.out}")
    return 0 if result["all_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
