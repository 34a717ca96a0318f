"""Per-stage throughput (images/s) of the pipeline's inner loops for ConvNet-3 and ResNet-18 at 32x32, on
whichever device runs it; writes benchmarks/results/throughput_<device>.json. Random inputs and random
weights: throughput does not depend on the values.

    python benchmarks/throughput.py [--device cpu|cuda] [--seconds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F


REPO = Path(__file__).resolve().parents[1]

from nrrdd.cam import class_activation_maps
from nrrdd.losses import BNStats, bn_stat_loss
from nrrdd.models import create_model
from nrrdd.runtime import pick_device, provenance


def rate(fn, batch: int, seconds: float, device) -> float:
    """Images per second of fn() on `batch` images, after one warm-up call, timed for about `seconds`."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync()
    return round(n * batch / (time.perf_counter() - t0), 1)


def stages(arch: str, device, seconds: float) -> dict:
    teacher = create_model(arch, 10, 32).to(device).eval().requires_grad_(False)
    student = create_model(arch, 10, 32).to(device).train()
    opt = torch.optim.AdamW(student.parameters(), 1e-3)
    x = torch.randn(100, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (100,), device=device)

    def score():  # CIDD: teacher CAM and confidence of candidate patches
        with torch.no_grad():
            class_activation_maps(teacher, x, y)
            teacher(x)

    xr = x.clone().requires_grad_(True)
    ropt = torch.optim.Adam([xr], 0.01)
    bn = BNStats(teacher)

    def refine():  # NRR: one refinement step on 100 images (CE + L_bn)
        with bn:
            loss = F.cross_entropy(teacher(xr), y) + 0.01 * bn_stat_loss(bn.pop(), bn.running())
        ropt.zero_grad()
        loss.backward()
        ropt.step()

    def relabel():  # stored labels: one teacher pass over mixed samples
        with torch.no_grad():
            teacher(x)

    def student_step():  # student training with online soft labels
        with torch.no_grad():
            t = teacher(x[:50])
        loss = F.kl_div(F.log_softmax(student(x[:50]) / 4, 1), F.softmax(t / 4, 1), reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()

    return {"cidd_scoring": rate(score, 100, seconds, device), "nrr_refine_step": rate(refine, 100, seconds, device),
            "relabel": rate(relabel, 100, seconds, device), "student_step_sl_online": rate(student_step, 50, seconds, device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--seconds", type=float, default=5.0)
    a = p.parse_args()
    dev = pick_device(a.device)
    t0 = time.time()
    out = {"kind": "benchmark", "benchmark": "throughput", "units": "images per second", "device": provenance()["device"], "load_average_before": os.getloadavg(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.node(),
           "stages": {arch: stages(arch, dev, a.seconds) for arch in ("convnet3", "resnet18")}}
    out.update(wall_time_s=round(time.time() - t0, 1), load_average_after=os.getloadavg(), **provenance())
    path = REPO / "benchmarks" / "results" / f"throughput_{dev.type}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["stages"], indent=2))


if __name__ == "__main__":
    main()
