"""Per-stage throughput (images/s) of the pipeline's inner loops (CIDD scoring, one NRR refinement step,
relabelling, one student step with online soft labels) for ConvNet and ResNet-18 at 32, 64 and 224 px, on
whichever device runs it; on CUDA also with bf16 autocast and channels-last. Writes
benchmarks/results/throughput_<device>.json. Random inputs and random weights: throughput does not depend on
the values.

    python benchmarks/throughput.py [--device cpu|cuda] [--seconds 5] [--sizes 32 64 224]
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


# (architecture, input side, batch): the DC convention's ConvNet depth per side; ResNet-18 is CIFAR-style up to
# 64 px and ImageNet-style above, as the registry builds it
CONFIGS = [("convnet3", 32, 100), ("resnet18", 32, 100), ("convnet4", 64, 100), ("resnet18", 64, 100),
           ("resnet18", 224, 32)]


def stages(arch: str, device, seconds: float, size: int = 32, batch: int = 100, bf16: bool = False,
           channels_last: bool = False) -> dict:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher = create_model(arch, 10, size).to(device, memory_format=fmt).eval().requires_grad_(False)
    student = create_model(arch, 10, size).to(device, memory_format=fmt).train()
    opt = torch.optim.AdamW(student.parameters(), 1e-3)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    half = batch // 2

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
            t = teacher(x[:half])
        loss = F.kl_div(F.log_softmax(student(x[:half]).float() / 4, 1), F.softmax(t.float() / 4, 1),
                        reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()

    def timed(fn, n):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                fn()
        return rate(run, n, seconds, device)
    return {"cidd_scoring": timed(score, batch), "nrr_refine_step": timed(refine, batch),
            "relabel": timed(relabel, batch), "student_step_sl_online": timed(student_step, half)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 224])
    a = p.parse_args()
    dev = pick_device(a.device)
    t0 = time.time()
    variants = [("fp32", False, False)] + ([("bf16", True, False), ("bf16_channels_last", True, True)]
                                           if dev.type == "cuda" else [])
    results = {}
    for arch, size, batch in (c for c in CONFIGS if c[1] in a.sizes):
        for name, bf16, cl in variants:
            key = f"{arch}@{size}px" + ("" if name == "fp32" else f" {name}")
            results[key] = {"batch": batch, **stages(arch, dev, a.seconds, size, batch, bf16, cl)}
            print(key, results[key], flush=True)
    out = {"kind": "benchmark", "benchmark": "throughput", "units": "images per second",
           "device": provenance()["device"], "load_average_before": os.getloadavg(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "machine": platform.node(), "stages": results}
    out.update(wall_time_s=round(time.time() - t0, 1), load_average_after=os.getloadavg(), **provenance())
    path = REPO / "benchmarks" / "results" / f"throughput_{dev.type}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["stages"], indent=2))


if __name__ == "__main__":
    main()
