"""CIFAR-10 / ConvNet-3 benchmark: a validation search for the settings the paper leaves open, then the grid of
presets x label modes x IPC, all with one committed teacher. Resumable: a finished cell is never recomputed.

    python benchmarks/cifar10_convnet.py search --workers 12     # choose settings on the validation split
    python benchmarks/cifar10_convnet.py grid --workers 12       # every cell, 3 seeds, using the chosen settings
    python benchmarks/cifar10_convnet.py summary                 # markdown table + plot from committed cells

Selection uses only `val_mean` (5,000 training images held out, never distilled from); test accuracy is
recorded but never read by this script's choices.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]

# Environment overrides exist for the smoke test (tests/test_benchmark.py): tiny data, teacher and budgets.
# The teacher without label smoothing, whose students scored ~10 points higher on validation than those of
# teachers/cifar10_convnet3.safetensors (label smoothing 0.1; its cells are in results/cifar10_convnet/).
RESULTS = Path(os.environ.get("BENCH_RESULTS", REPO / "benchmarks" / "results" / "cifar10_convnet_nols15"))
WORK = Path(os.environ.get("BENCH_WORK", REPO / "runs" / "bench_nols15"))
TEACHER = Path(os.environ.get("BENCH_TEACHER", REPO / "teachers" / "cifar10_convnet3_nols15.safetensors"))
DATA = os.environ.get("BENCH_DATA", "cifar10")
SMOKE = json.loads(os.environ.get("BENCH_SMOKE", "{}"))  # e.g. {"synth": {"iterations": 2}, "student": {"epochs": 1}}


# ---------------------------------------------------------------- jobs (run in worker processes)

def distill_job(name: str, preset: str, overrides: dict, device: str) -> str:
    from nrrdd.config import preset_config
    from nrrdd.distill import distill
    out = WORK / "distilled" / name
    distill(DATA, TEACHER, preset_config(preset, overrides, SMOKE.get("synth")), out, preset=preset, device=device, resume=True,
            progress=False)
    return str(out)


def eval_key(distilled: str) -> str:
    import hashlib
    return hashlib.sha256(Path(distilled).name.encode()).hexdigest()[:8]


def eval_job(cell: str, distilled: str, student: dict, dest: str, device: str) -> dict:
    from nrrdd.config import StudentConfig
    from nrrdd.evaluate import evaluate
    from nrrdd.files import write_json
    work = WORK / "eval" / f"{cell}@{eval_key(distilled)}"  # a changed distilled set starts afresh
    r = evaluate(distilled, StudentConfig(**{**student, **SMOKE.get("student", {})}), work, device=device, resume=True,
                 progress=False)
    write_json(dest, r)
    return r


_POOL: ProcessPoolExecutor | None = None


def run_all(jobs: list[tuple], workers: int) -> list:
    """Run (fn, args) jobs on one spawn pool kept for the whole script (workers import torch once);
    a failed job is reported and the others carry on."""
    global _POOL
    if workers <= 1:
        return [fn(*args) for fn, args in jobs]
    _POOL = _POOL or ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    out = []
    futs = {_POOL.submit(fn, *args): args for fn, args in jobs}
    for f in as_completed(futs):
        try:
            out.append(f.result())
        except Exception as e:  # keep the grid going; the missing cell shows in the summary
            print(f"FAILED {futs[f][0]}: {type(e).__name__}: {e}", flush=True)
    return out


def distill_name(preset: str, ipc: int, overrides: dict) -> str:
    extra = "_".join(f"{k}{v}" for k, v in sorted(overrides.items()) if k != "ipc")
    return f"{preset}_ipc{ipc}" + (f"_{extra}" if extra else "")


def done(cell: dict) -> bool:
    """A cell's results file exists, made with the cell's synthesis settings (a new chosen.json redoes it), with
    at least the seeds asked for (more seeds extend it: evaluate resumes)."""
    dest = Path(cell["dest"])
    if not dest.exists():
        return False
    r = json.loads(dest.read_text())
    same = Path(r["teacher"]).name == TEACHER.name and all(
        (r["distilled_config"] or {}).get(k) == v for k, v in cell["overrides"].items())
    return same and len(r["seeds"]) >= cell["student"].get("seeds", 3)


def evaluate_cells(cells: list[dict], workers: int, device: str, distill_only: bool = False) -> list[dict]:
    """cells: {id, preset, overrides, student, dest}. Distils what is missing, then evaluates what is missing."""
    todo = cells if distill_only else [c for c in cells if not done(c)]
    sets = {distill_name(c["preset"], c["overrides"]["ipc"], c["overrides"]): c for c in todo}
    run_all([(distill_job, (n, c["preset"], c["overrides"], device)) for n, c in sets.items()], workers)
    if distill_only:
        return []
    run_all([(eval_job, (c["id"], str(WORK / "distilled" / distill_name(c["preset"], c["overrides"]["ipc"],
                                                                           c["overrides"])),
                         c["student"], c["dest"], device)) for c in todo], workers)
    return [json.loads(Path(c["dest"]).read_text()) for c in cells if Path(c["dest"]).exists()]


# ---------------------------------------------------------------- search (validation only)

def load_chosen() -> dict:
    """The settings chosen on validation so far (empty before any search)."""
    f = RESULTS / "chosen.json"
    return json.loads(f.read_text()) if f.exists() else {}


def save_chosen(chosen: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "chosen.json").write_text(json.dumps(chosen, indent=2))


def best(trials: list[dict], keys: list[str]) -> dict:
    top = max(trials, key=lambda r: r["val_mean"])
    return {k: top["_params"][k] for k in keys}


def search_round(name: str, grid: dict, chosen: dict, workers: int, device: str, seeds: int) -> tuple[dict, dict]:
    """Every combination of `grid` on top of `chosen` (nrrdd preset, IPC 10, soft labels); returns the values
    of the best validation accuracy and the round's log entry."""
    keys, cells = list(grid), []
    for values in itertools.product(*grid.values()):
        params = {**chosen, **dict(zip(keys, values)), "ipc": 10}
        tid = f"search_{name}_" + "_".join(f"{k}{v}" for k, v in zip(keys, values))
        cells.append({"id": tid, "preset": "nrrdd", "overrides": params, "_params": params,
                      "student": {"seeds": seeds, "data": DATA}, "dest": str(RESULTS / "search" / f"{tid}.json")})
    results = evaluate_cells(cells, workers, device)
    for c, r in zip([c for c in cells if Path(c["dest"]).exists()], results):
        r["_params"] = c["_params"]
    winner = best(results, [k for k in keys if k != "refine"])  # a "none" round must not fix refine=none
    print(f"round {name}: chosen {winner} (val {max(r['val_mean'] for r in results):.2f})", flush=True)
    return winner, {"round": name, "grid": grid, "chosen": winner, "seeds_per_trial": seeds,
                    "trials": [{"params": r["_params"], "val_mean": r["val_mean"], "val_std": r["val_std"]}
                               for r in results]}


def search(workers: int, device: str, seeds: int) -> dict:
    """Coordinate-wise search at IPC 10 with soft labels; each round keeps the best validation accuracy."""
    chosen = {}
    rounds = [
        ("init", {"select": ["highest", "lowest"], "crop_score": ["cam_ratio", "cam_mean"], "refine": ["none"]}),
        ("mask", {"epsilon": [0.3, 0.5, 0.7], "lr": [0.01, 0.05, 0.2], "refine": ["masked"]}),
        ("refine_aug", {"refine_crop_min": [0.5, 1.0], "alpha_bn": [0.0, 0.01, 0.1], "iterations": [300]}),
        ("label_refine", {"alpha_lr": [0.0, 0.1, 1.0], "lr_threshold": [0.3, 0.6931]}),
    ]
    log = []
    for name, grid in rounds:
        winner, entry = search_round(name, grid, chosen, workers, device, seeds)
        chosen.update(winner)
        log.append(entry)
        save_chosen({"synth": chosen, "rounds": log, "partial": True})
    # Student side: DBR weight and threshold, on the images chosen above.
    cells = []
    for a_dbr, r in itertools.product([0.1, 1.0, 10.0], [0.3, 0.6931]):
        tid = f"search_dbr_alpha{a_dbr}_r{r}"
        cells.append({"id": tid, "preset": "nrrdd", "overrides": {**chosen, "ipc": 10},
                      "student": {"seeds": seeds, "data": DATA, "label_mode": "dbr", "alpha_dbr": a_dbr, "r": r},
                      "dest": str(RESULTS / "search" / f"{tid}.json"), "_params": {"alpha_dbr": a_dbr, "r": r}})
    results = evaluate_cells(cells, workers, device)
    top = max(results, key=lambda x: x["val_mean"])
    student = {"alpha_dbr": top["config"]["alpha_dbr"], "r": top["config"]["r"]}
    log.append({"round": "dbr", "trials": [{"params": {"alpha_dbr": x["config"]["alpha_dbr"], "r": x["config"]["r"]},
                                             "val_mean": x["val_mean"], "val_std": x["val_std"]} for x in results],
                "chosen": student})
    out = {"synth": chosen, "student_dbr": student, "rounds": log, "selection": "max val_mean (5,000 held-out "
           "training images); test accuracy never consulted", "seeds_per_trial": seeds}
    save_chosen(out)
    return out


def search_temperature(workers: int, device: str, seeds: int, temps=(1.0, 2.0, 4.0, 8.0, 20.0)) -> dict:
    """Student soft-label temperature on RDED-preset IPC 10 images (method-neutral), by validation accuracy.
    The committed teacher was trained with label smoothing, whose compressed logits make T = 20 labels nearly flat."""
    cells = [{"id": f"search_temperature_T{t}", "preset": "rded", "overrides": {"ipc": 10},
              "student": {"seeds": seeds, "data": DATA, "temperature": t},
              "dest": str(RESULTS / "search" / f"search_temperature_T{t}.json")} for t in temps]
    results = evaluate_cells(cells, workers, device)
    top = max(results, key=lambda r: r["val_mean"])
    chosen = load_chosen()
    chosen["student"] = {"temperature": top["config"]["temperature"]}
    chosen.setdefault("rounds", []).append({"round": "student_temperature", "trials": [
        {"params": {"temperature": r["config"]["temperature"]}, "val_mean": r["val_mean"], "val_std": r["val_std"]}
        for r in results], "chosen": chosen["student"]})
    save_chosen(chosen)
    return chosen["student"]


# ---------------------------------------------------------------- grid

def grid_cells(chosen: dict, ipcs: list[int], students: list[str], presets=None, modes=None, seeds=3) -> list[dict]:
    synth = chosen.get("synth", {})
    dbr = chosen.get("student_dbr", {})
    common = chosen.get("student", {})
    cells = []
    for ipc in ipcs:
        rows = [(p, "sl-online") for p in ("random", "rded", "sre2l", "cidd", "nrrdd")]
        rows += [(p, m) for p in ("nrrdd", "nrrdd-lr") for m in ("dbr", "onehot", "compact")]
        rows += [("nrrdd-lr", "sl-online")]
        for student in students:
            for preset, mode in rows:
                if (student != "convnet3" and mode != "sl-online") or (presets and preset not in presets) or \
                        (modes and mode not in modes):
                    continue
                ov = {"ipc": ipc}
                if preset in ("nrrdd", "nrrdd-lr", "cidd"):
                    ov.update({k: v for k, v in synth.items() if preset != "cidd" or k in ("select", "crop_score")})
                    if preset == "nrrdd":
                        ov["alpha_lr"] = 0.0
                    if preset == "nrrdd-lr" and not synth.get("alpha_lr"):
                        ov["alpha_lr"] = 0.1
                st = {"seeds": seeds, "data": DATA, "label_mode": mode, "student": student, **common,
                      **(dbr if mode == "dbr" else {})}
                cid = f"ipc{ipc}_{preset}_{mode}_{student}"
                cells.append({"id": cid, "preset": preset, "overrides": ov, "student": st,
                              "dest": str(RESULTS / "cells" / f"{cid}.json")})
    return cells


def summary() -> None:
    from nrrdd.report import PAPER_LABELS_IMAGENETTE, accuracy_plot, markdown_table
    results = [json.loads(p.read_text()) for p in sorted((RESULTS / "cells").glob("*.json"))]
    cell = {(r["ipc"], r["preset"], r["config"]["label_mode"], r["config"]["student"]): r for r in results}

    def acc(ipc, preset, mode="sl-online", student="convnet3"):
        r = cell.get((ipc, preset, mode, student))
        return r["test_mean"] if r else None

    def fmt(v):
        return "not run" if v is None else f"{v:.2f}"

    lines = ["## Targets (IPC 10 unless stated; ConvNet-3 student)", "",
             "| target | measured | met |", "|---|---|---|"]
    for ipc, paper in ((1, 48.4), (10, 66.7), (50, 73.1)):
        v, r = acc(ipc, "nrrdd"), cell.get((ipc, "nrrdd", "sl-online", "convnet3"))
        n = f" ({len(r['seeds'])} seed{'s' * (len(r['seeds']) > 1)})" if r else ""
        lines.append(f"| NRR-DD soft labels, IPC {ipc} >= paper {paper} | {fmt(v)}{n} | "
                     f"{'-' if v is None else 'yes' if v >= paper else f'no ({v - paper:+.1f})'} |")
    n, rd, ci = acc(10, "nrrdd"), acc(10, "rded"), acc(10, "cidd")
    if None not in (n, rd, ci):
        lines += [f"| NRR-DD >= RDED + 15 | {n - rd:+.2f} | {'yes' if n - rd >= 15 else 'no'} |",
                  f"| CIDD > RDED | {ci - rd:+.2f} | {'yes' if ci > rd else 'no'} |",
                  f"| CIDD+NRR > CIDD | {n - ci:+.2f} | {'yes' if n > ci else 'no'} |"]
    for preset in ("nrrdd", "nrrdd-lr"):
        sl, oh, dbr = acc(10, preset), acc(10, preset, "onehot"), acc(10, preset, "dbr")
        if None not in (sl, oh, dbr):
            rate = (dbr - oh) / (sl - oh) * 100
            lines.append(f"| DBR recover rate ({preset}) >= 68 % | {rate:.0f} % | {'yes' if rate >= 68 else 'no'} |")
    lines += ["", "Ablation (Table 4, IPC 10): paper RDED 50.2 / CIDD 51.3 / CIDD+NRR 66.7; here "
              f"{fmt(rd)} / {fmt(ci)} / {fmt(n)}.", ""]
    name = RESULTS.name
    (RESULTS.parent / f"{name}.md").write_text(
        f"# CIFAR-10, ConvNet-3 teacher: every cell\n\nGenerated by `python benchmarks/cifar10_convnet.py summary` "
        f"from `benchmarks/results/{name}/cells/*.json` (each holds its command, config, seeds, device and "
        "wall time). Test top-1 of the final epoch, mean ± std over the student seeds listed per cell. Settings were "
        f"chosen on the validation split (`{name}/chosen.json`); test accuracy was never consulted.\n\n"
        + "\n".join(lines) + "\n## All cells\n\n" + table_note(results) + markdown_table(results) +
        f"\nPaper's label-mode figures (Table 2) are on ImageNette, not CIFAR-10: {PAPER_LABELS_IMAGENETTE}.\n")
    accuracy_plot(results, RESULTS.parent / f"{name}.png")
    print("\n".join(lines))


def table_note(results: list[dict]) -> str:
    runs = sorted({(Path(r["teacher"]).name, r.get("device") or "cpu", r.get("git_commit") or "no .git")
                   for r in results})
    note = "Cells by teacher, device and commit: " + "; ".join(" / ".join(x) for x in runs) + ". "
    if any(not r.get("git_commit") for r in results):
        note += ("Cells without a commit ran in a copy without .git: those on the NVIDIA H200 of 2026-11-26 came "
                 "from commit 54ab193; later runs record source_sha256, a digest of the package source. ")
    if any(r["config"]["student"] != "convnet3" for r in results):
        note += ("ResNet-18 rows are students of the ConvNet-3 teacher (cross-architecture); the paper's ResNet-18 "
                 "figures used a ResNet-18 teacher, so they are shown for reference only.")
    return note + "\n\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["search", "search-round", "search-temperature", "grid", "summary"])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--seeds", type=int, default=1, help="student seeds per search trial")
    p.add_argument("--ipc", type=int, nargs="+", default=[10, 1, 50])
    p.add_argument("--students", nargs="+", default=["convnet3"])
    p.add_argument("--presets", nargs="+", help="only these presets (default: all)")
    p.add_argument("--modes", nargs="+", help="only these label modes (default: all)")
    p.add_argument("--distill-only", action="store_true", help="make the distilled sets, train no student")
    p.add_argument("--round", nargs=2, metavar=("NAME", "JSON"), help="search-round: one more round on top of "
                   "chosen.json's synthesis settings, e.g. lr '{\"lr\": [0.003, 0.01, 0.03]}' (include the current "
                   "value: the best validation accuracy wins and is written back)")
    p.add_argument("--grid-seeds", type=int, default=3, help="student seeds per grid cell (a rerun with more "
                   "extends the cells, reusing the seeds already trained)")
    a = p.parse_args()
    t0 = time.time()
    if a.phase == "search":
        print(json.dumps(search(a.workers, a.device, a.seeds)["synth"]))
    elif a.phase == "search-round":
        chosen = load_chosen()
        winner, entry = search_round(a.round[0], json.loads(a.round[1]), chosen["synth"], a.workers, a.device, a.seeds)
        chosen["synth"].update(winner)
        chosen["rounds"].append(entry)
        save_chosen(chosen)
    elif a.phase == "search-temperature":
        print(json.dumps(search_temperature(a.workers, a.device, a.seeds)))
    elif a.phase == "grid":
        chosen = load_chosen()
        evaluate_cells(grid_cells(chosen, a.ipc, a.students, a.presets, a.modes, a.grid_seeds), a.workers, a.device,
                       a.distill_only)
    summary() if a.phase == "summary" or (a.phase == "grid" and not a.distill_only) else None
    print(f"{a.phase} done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
