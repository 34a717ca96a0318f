"""Start-up time of the `nrrdd` command: `--help` and a bad flag must answer before torch is imported.
Writes benchmarks/results/startup_cpu.json.

    python benchmarks/startup.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nrrdd.runtime import provenance


REPO = Path(__file__).resolve().parents[1]
CASES = {"nrrdd --help": ["--help"], "nrrdd distill --help": ["distill", "--help"],
         "nrrdd evaluate --ipc (a bad flag)": ["evaluate", "--ipc"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    t0, out = time.time(), {}
    for name, argv in CASES.items():
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "nrrdd", *argv], capture_output=True)
            times.append(round(time.perf_counter() - t, 3))
        out[name] = {"seconds": times, "median_s": statistics.median(times), "min_s": min(times)}
    record = {"kind": "benchmark", "schema_version": 1, "benchmark": "startup", "cases": out,
              "repeats": a.repeats, "wall_time_s": round(time.time() - t0, 1), **provenance()}
    dest = REPO / "benchmarks" / "results" / "startup_cpu.json"
    dest.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
