"""What refinement changes (issue 14, item 4), measured on distilled sets already made: each refined set
against the unrefined set its refinement started from (same selection: cidd is nrrdd's starting point),
through `nrrdd.refine.refinement_effect`: the pixels' |change| inside and outside the mask, and the
teacher's accuracy, confidence and BN-statistic distance before and after. Writes
benchmarks/results/refinement_effect.json and .md.

    python benchmarks/refinement_effect.py runs/x/distilled/cidd_ipc1:runs/x/distilled/nrrdd_ipc1 ...
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from nrrdd.cam import class_activation_maps
from nrrdd.checkpoint import load_model
from nrrdd.config import SynthConfig
from nrrdd.files import load_tensors, read_json, write_json
from nrrdd.refine import refinement_effect
from nrrdd.runtime import provenance


REPO = Path(__file__).resolve().parents[1]


def measure(initial: Path, refined: Path) -> dict:
    rec, start = read_json(refined / "distill.json"), read_json(initial / "distill.json")
    if read_json(initial / "selection.json") != read_json(refined / "selection.json"):
        raise SystemExit(f"{initial} and {refined} selected different patches: not a refinement's start and end")
    teacher, _ = load_model(rec["teacher"]["path"], classes=rec["classes"])
    if start["teacher"]["sha256"] != rec["teacher"]["sha256"]:
        raise SystemExit(f"{initial} and {refined} were made with different teachers")
    x0, x = (load_tensors(d / "synthetic.safetensors") for d in (initial, refined))
    y = x["labels"]
    cfg = SynthConfig(**rec["config"])
    cam = class_activation_maps(teacher.eval(), x0["images"], y)
    return {"initial": str(initial), "refined": str(refined), "preset": rec["preset"], "data": rec["data"]["spec"],
            "ipc": rec["ipc"], "beta": cfg.beta, "refine": cfg.refine, "epsilon": cfg.epsilon,
            "iterations": cfg.iterations, "lr": cfg.lr, "alpha_bn": cfg.alpha_bn, "alpha_lr": cfg.alpha_lr,
            **refinement_effect(teacher, x0["images"], x["images"], y, cam, cfg)}


def table(rows: list[dict]) -> str:
    head = ("| data | IPC | beta | refined | \\|change\\| inside (mean / max) | outside | inside share "
            "| teacher acc before → after | p(label) | BN distance |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        px, b, a = r["pixels_255"], r["teacher_before"], r["teacher_after"]
        bn = f", alpha_bn {r['alpha_bn']}" if r["alpha_bn"] else ""
        lines.append(f"| {r['data']} | {r['ipc']} | {r['beta']} | {r['preset']} ({r['refine']}, eps {r['epsilon']}, "
                     f"{r['iterations']} it, lr {r['lr']}{bn}) "
                     f"| {px['inside']['mean']:.2f} / {px['inside']['max']:.0f} "
                     f"| {px['outside']['mean']:.2f} / {px['outside']['max']:.0f} | {r['inside_fraction']:.2f} "
                     f"| {b['acc']:.1f} → {a['acc']:.1f} | {b['label_prob']:.3f} → {a['label_prob']:.3f} "
                     f"| {b['bn_distance']:.2f} → {a['bn_distance']:.2f} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", help="INITIAL:REFINED distilled folders")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "refinement_effect"))
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.time()
    rows = [measure(*map(Path, p.split(":", 1))) for p in a.pairs]
    out = Path(a.out)
    write_json(out.with_suffix(".json"), {"kind": "benchmark", "benchmark": "refinement_effect", "rows": rows,
                                          "wall_time_s": round(time.time() - t0, 1), **provenance()})
    out.with_suffix(".md").write_text(
        "# What refinement changes\n\nEach refined set against the unrefined set it started from (the same "
        "selected patches), measured by `nrrdd.refine.refinement_effect`: |change| of the stored 0-255 pixels "
        "inside the refinement mask and outside it, the mask's share of pixels, and the teacher on the images "
        "before and after (top-1 %, mean probability of the labelled class, BN-statistic distance of Eq. 3 per "
        f"refinement batch). Written by `python benchmarks/refinement_effect.py {' '.join(a.pairs)}`.\n\n"
        + table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
