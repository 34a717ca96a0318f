"""Wall time and peak memory of each distillation stage, per preset, CIFAR-10 IPC 10, committed ConvNet-3
teacher, on this machine; writes benchmarks/results/distill_timing_<device>.json. Each preset runs in its own
process (so peak memory is its own), one after the other.

    python benchmarks/distill_timing.py [--device cpu] [--ipc 10] [--presets random rded ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]

from nrrdd.config import PRESETS
from nrrdd.runtime import provenance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--data", default="cifar10")
    a = p.parse_args()
    t0 = time.time()
    rows = {}
    for preset in a.presets:
        out = REPO / "runs" / "timing" / f"{preset}_ipc{a.ipc}"
        cmd = [sys.executable, "-m", "nrrdd", "distill", "--data", a.data, "--teacher",
               str(REPO / "teachers" / "cifar10_convnet3_nols15.safetensors"), "--preset", preset, "--ipc", str(a.ipc),
               "--device", a.device, "--out", str(out), "--overwrite", "--quiet"]
        load = os.getloadavg()
        subprocess.run(cmd, check=True)
        rec = json.loads((out / "distill.json").read_text())
        rows[preset] = {"timings_s": rec["timings"], "memory": rec["memory"], "load_average_before": load,
                        "config": rec["config"], "command": " ".join(cmd[1:])}
        print(preset, rec["timings"], flush=True)
    result = {"kind": "benchmark", "benchmark": "distill_timing", "what": f"nrrdd distill, {a.data}, IPC {a.ipc}, per-stage wall time (s) and peak memory",
              "presets": rows, "cpu_count": os.cpu_count(), "wall_time_s": round(time.time() - t0, 1), **provenance()}
    path = REPO / "benchmarks" / "results" / f"distill_timing_{a.device.split(':')[0]}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
