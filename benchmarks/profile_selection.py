"""Where the time of one class's selection and one refinement batch goes at 64 px (ConvNet-4, random weights,
random pool images): cProfile of the real `select_patches` (RDED's and CIDD's settings) and `refine_batch`,
summed into the teacher's forward/backward passes, crop resizing, CAM/box arithmetic and the rest.
Writes benchmarks/results/profile_selection_<device>.json.

    python benchmarks/profile_selection.py [--size 64] [--pool 300] [--iterations 5]
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import torch

from nrrdd.config import preset_config
from nrrdd.models import create_model
from nrrdd.refine import refine_batch, refinement_mask
from nrrdd.runtime import pick_device, provenance
from nrrdd.selection import select_patches


REPO = Path(__file__).resolve().parents[1]
# cumulative time of these functions, by (file suffix, name); the teacher's passes hold the conv layers
BUCKETS = {"teacher forward": ("torch/nn/modules/module.py", "_call_impl"),
           "backward": ("torch/_tensor.py", "backward"),
           "crop_resize": ("nrrdd/augment.py", "crop_resize"),
           "box_mass": ("nrrdd/augment.py", "box_mass")}


def profile(fn) -> dict:
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.runcall(fn)
    wall = time.perf_counter() - t
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, ncalls, tottime, cumtime, callers)
    shares = {}
    for bucket, (suffix, name) in BUCKETS.items():
        cum = max((v[3] for (f, _, n), v in stats.items() if f.endswith(suffix) and n == name), default=0.0)
        shares[bucket] = round(cum / wall, 3)
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:8]
    return {"wall_s": round(wall, 2), "share_of_wall": shares,
            "top_self_time": [{"function": f"{Path(f).name}:{n}", "self_s": round(v[2], 2)} for (f, _, n), v in top]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--pool", type=int, default=300)
    p.add_argument("--iterations", type=int, default=5, help="refinement steps profiled (one batch of 100)")
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    dev = pick_device(a.device)
    torch.manual_seed(0)
    arch = "convnet4" if a.size == 64 else "convnet3" if a.size == 32 else "resnet18"
    teacher = create_model(arch, 200, a.size).set_stats((0.5,) * 3, (0.25,) * 3).to(dev).eval().requires_grad_(False)
    pool = torch.randint(0, 256, (a.pool, 3, a.size, a.size), dtype=torch.uint8)
    out = {"arch": arch, "size": a.size, "pool": a.pool, "device": str(dev), "torch_threads": torch.get_num_threads()}
    for preset in ("rded", "cidd"):
        cfg = preset_config(preset, {"ipc": 10, "pool_per_class": a.pool})
        out[f"select_{preset}"] = profile(lambda: select_patches(teacher, pool, 0, cfg, dev))
        out[f"select_{preset}"]["images_through_teacher"] = (
            a.pool * cfg.crops_per_image + a.pool * cfg.top_t if cfg.crop_score == "ce" else a.pool + a.pool * cfg.top_t)
    cfg = preset_config("nrrdd", {"iterations": a.iterations})
    x0 = teacher.normalize(torch.randint(0, 256, (100, 3, a.size, a.size), dtype=torch.uint8).to(dev))
    y = torch.arange(100, device=dev) % 200
    from nrrdd.cam import class_activation_maps
    mask = refinement_mask(class_activation_maps(teacher, x0, y), cfg)
    lo, hi = teacher.normalize(torch.zeros(1, 3, 1, 1, device=dev)), teacher.normalize(torch.ones(1, 3, 1, 1, device=dev))
    out["refine_batch100"] = profile(lambda: refine_batch(teacher, x0, y, mask, cfg, lo, hi,
                                                          torch.Generator().manual_seed(0)))
    out["refine_batch100"]["s_per_step"] = round(out["refine_batch100"]["wall_s"] / a.iterations, 2)
    out.update(provenance())
    dest = REPO / "benchmarks" / "results" / f"profile_selection_{dev.type}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k.startswith(("select", "refine"))}, indent=1))


if __name__ == "__main__":
    main()
