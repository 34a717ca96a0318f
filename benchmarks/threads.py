"""Wall time of the demo and of a CIFAR-10 student under a few `--threads` settings, on a quiet machine and
beside a competing process (a matrix-multiply loop at torch's default thread count, as another training job
would be). Writes benchmarks/results/threads_cpu.json.

    python benchmarks/threads.py --distilled runs/screen/d_cidd     # a CIFAR-10 IPC 10 distilled folder

Run it on an otherwise idle machine: the "quiet" rows assume nothing else runs."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
COMPETITOR = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


def timed(argv: list[str], env: dict, timeout: float) -> dict:
    t0 = time.monotonic()
    try:
        r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           timeout=timeout)
        status = "ok" if r.returncode == 0 else f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout:.0f} s"
    return {"wall_s": round(time.monotonic() - t0, 1), "status": status}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--distilled", required=True, help="CIFAR-10 distilled folder for the student rows")
    ap.add_argument("--threads", nargs="+", default=["1", "2", "auto"], help="--threads values to compare")
    ap.add_argument("--student-epochs", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "threads_cpu.json"))
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    nrrdd = [sys.executable, "-m", "nrrdd"]
    rows = []
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for load in ("quiet", "loaded"):
            comp = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env) if load == "loaded" else None
            try:
                for n in a.threads:
                    jobs = {"demo": nrrdd + ["demo", "--quiet", "--threads", str(n), "--out", f"{tmp}/demo{n}{load}"],
                            "student": nrrdd + ["evaluate", "--distilled", a.distilled, "--epochs",
                                                str(a.student_epochs), "--seeds", "1", "--quiet", "--device", "cpu",
                                                "--threads", str(n), "--out", f"{tmp}/ev{n}{load}"]}
                    for job, argv in jobs.items():
                        r = {"job": job, "threads": n, "load": load, **timed(argv, env, a.timeout)}
                        print(json.dumps(r), flush=True)
                        rows.append(r)
                        shutil.rmtree(argv[-1], ignore_errors=True)
            finally:
                if comp is not None:
                    comp.kill()
                    comp.wait()
    from nrrdd.runtime import provenance
    record = {"kind": "benchmark", "benchmark": "threads", "rows": rows, **provenance(),
              "command": " ".join(["python"] + sys.argv), "machine": platform.node(),
              "cores": os.cpu_count(), "student": {"distilled": a.distilled, "epochs": a.student_epochs, "seeds": 1},
              "competitor": "one process looping 1024x1024 float32 matmuls at torch's default thread count",
              "wall_time_s": round(time.time() - t_start, 1)}
    Path(a.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
