"""The benchmark harness: a named config under benchmarks/configs/ says which data, teacher, results folder and
steps (teacher, an ensemble of teachers, search rounds, grid of presets x label modes x IPC, free-form trials, summaries); this script runs
them. Resumable: a finished cell is never recomputed, a grown seed count extends a cell.

    python benchmarks/harness.py benchmarks/configs/cifar10_nols15.json                 # every step in order
    python benchmarks/harness.py benchmarks/configs/cifar10_nols15.json --steps summary # only the summary
    python benchmarks/harness.py benchmarks/configs/gpu_grid.json --set workers=14 device=cuda

Settings are chosen on `val_mean` only (5,000 training images held out, never distilled from); test accuracy is
recorded but never read by this script's choices. Every record carries its provenance (command, git commit or,
without .git, a digest of the package source, seeds, machine, wall time); see docs/results.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Bench:
    """One benchmark: a JSON file of these fields. Paths are relative to the repository root."""
    results: str  # committed records: cells/, search/, trials' folders, chosen.json
    teacher: str  # the teacher every cell distils and relabels with
    title: str = ""
    data: str = "cifar10"
    work: str = "runs/bench"  # distilled sets and unfinished evaluations (git-ignored)
    device: str = "auto"
    workers: int = 1  # student and distillation processes at once
    threads: int = 0  # OMP_NUM_THREADS for the workers (0: leave it; an exported value always wins)
    synth: dict = dataclasses.field(default_factory=dict)  # overrides for every distillation (e.g. smoke budgets)
    student: dict = dataclasses.field(default_factory=dict)  # overrides for every student
    steps: list = dataclasses.field(default_factory=list)  # [{"do": step name, ...its arguments}]

    def path(self, p: str) -> Path:
        return REPO / p if not Path(p).is_absolute() else Path(p)


def load_bench(file, sets: list[str] = ()) -> Bench:
    """The config file, with `key=value` overrides of its top-level fields (values parsed as JSON when they
    parse)."""
    raw = json.loads(Path(file).read_text())
    for kv in sets:
        k, _, v = kv.partition("=")
        try:
            raw[k] = json.loads(v)
        except json.JSONDecodeError:
            raw[k] = v
    known = {f.name for f in dataclasses.fields(Bench)}
    unknown = sorted(set(raw) - known - {"about"})
    if unknown:
        raise SystemExit(f"{file}: unknown fields {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return Bench(**{k: v for k, v in raw.items() if k in known})


# ---------------------------------------------------------------- jobs (run in worker processes)

def distill_name(preset: str, overrides: dict) -> str:
    extra = "_".join(f"{k}{v}" for k, v in sorted(overrides.items()) if k != "ipc")
    return f"{preset}_ipc{overrides['ipc']}" + (f"_{extra}" if extra else "")


def distilled_dir(b: Bench, cell: dict) -> Path:
    if cell.get("distilled"):  # a trial of an existing distilled folder
        return b.path(cell["distilled"])
    return b.path(b.work) / "distilled" / distill_name(cell["preset"], cell["overrides"])


def distill_job(b: Bench, cell: dict) -> str:
    from nrrdd.config import preset_config
    from nrrdd.distill import distill
    out = distilled_dir(b, cell)
    distill(b.data, b.path(b.teacher), preset_config(cell["preset"], cell["overrides"], b.synth), out,
            preset=cell["preset"], device=b.device, resume=True, progress=False)
    return str(out)


def student_settings(b: Bench, cell: dict) -> dict:
    """The cell's StudentConfig fields: its named "recipe" (default rded-300) under the config's and the cell's
    own student settings."""
    from nrrdd import NrrddError
    from nrrdd.config import recipe_fields
    merged = {**b.student, **cell["student"]}
    try:
        return {**recipe_fields(merged.pop("recipe", "rded-300")), **merged}
    except NrrddError as e:
        raise SystemExit(f"{cell['id']}: {e}")


def eval_job(b: Bench, cell: dict) -> dict:
    import hashlib

    from nrrdd.config import StudentConfig
    from nrrdd.evaluate import evaluate
    from nrrdd.files import write_json
    distilled = distilled_dir(b, cell)
    key = hashlib.sha256(distilled.name.encode()).hexdigest()[:8]  # a changed distilled set starts afresh
    work = b.path(b.work) / "eval" / f"{cell['id']}@{key}"
    r = evaluate(distilled, StudentConfig(**{"data": b.data, **student_settings(b, cell)}), work,
                 device=b.device, resume=True, progress=False)
    write_json(cell["dest"], r)
    return r


_POOL: ProcessPoolExecutor | None = None
PLAN = False  # --plan: list the cells a step would compute, compute nothing
ONLY: set[str] = set()  # --trials: the trial ids to run (none given: all)


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
            print(f"FAILED {futs[f][1]['id']}: {type(e).__name__}: {e}", flush=True)
    return out


def record_of(b: Bench, cell: dict) -> dict | None:
    """A cell's record if it was made with this teacher and the cell's synthesis and student settings (a new
    chosen.json redoes it), whatever its seeds; else None."""
    dest = Path(cell["dest"])
    if not dest.exists():
        return None
    r = json.loads(dest.read_text())
    student = {k: v for k, v in student_settings(b, cell).items() if k not in ("seeds", "data")}
    same = (Path(r["teacher"]).name == Path(b.teacher).name
            and all((r["distilled_config"] or {}).get(k) == v for k, v in cell["overrides"].items())
            and all(r["config"].get(k) == v for k, v in student.items()))
    return r if same else None


def done(b: Bench, cell: dict) -> bool:
    """A cell's record exists with at least the seeds asked for (more seeds extend it: evaluate resumes)."""
    r = record_of(b, cell)
    return r is not None and len(r["seeds"]) >= cell["student"].get("seeds", 3)


def evaluate_cells(b: Bench, cells: list[dict], distill_only: bool = False) -> list[tuple[dict, dict]]:
    """cells: {id, preset, overrides (synthesis), student, dest}. Distils what is missing, then evaluates what
    is missing; returns (cell, record) of every cell that has a record."""
    todo = cells if distill_only else [c for c in cells if not done(b, c)]
    if PLAN:
        print(f"{len(cells) - len(todo)} of {len(cells)} cells done" + "".join(f"\n  to run: {c['id']}" for c in todo))
        return [(c, json.loads(Path(c["dest"]).read_text())) for c in cells if done(b, c)]
    sets = {distilled_dir(b, c): c for c in todo if not c.get("distilled")}
    run_all([(distill_job, (b, c)) for c in sets.values()], b.workers)
    if distill_only:
        return []
    # the seeds a cell lacks are trained as parts, one record each, joined below to the seeds its record has
    # (whose students may have trained in parts of their own, so the cell's work folder cannot extend them);
    # with several workers a new cell's seeds are parts too, trained side by side
    split = {}
    for c in todo:
        have = record_of(b, c)
        first, n = c["student"].get("first_seed", 0), c["student"].get("seeds", 3)
        missing = [s for s in range(first, first + n) if not have or s not in have["seeds"]]
        if have or (b.workers > 1 and len(missing) > 1):
            split[c["id"]] = ([have] if have else [], seed_parts(b, c, missing))
    jobs = [p for c in todo for p in (split[c["id"]][1] if c["id"] in split else [c]) if p is c or not done(b, p)]
    run_all([(eval_job, (b, c)) for c in jobs], b.workers)
    from nrrdd.evaluate import join_seeds
    from nrrdd.files import write_json
    for c in todo:
        have, parts = split.get(c["id"], ([], []))
        if parts and all(Path(p["dest"]).exists() for p in parts):
            write_json(c["dest"], join_seeds(have + [json.loads(Path(p["dest"]).read_text()) for p in parts]))
    return [(c, json.loads(Path(c["dest"]).read_text())) for c in cells if Path(c["dest"]).exists()]


def seed_parts(b: Bench, cell: dict, seeds: list[int]) -> list[dict]:
    """The cell's `seeds` as cells of one seed each, their records under work/parts/ (a killed run keeps the
    finished ones), so that the workers share one cell's students."""
    return [{**cell, "id": f"{cell['id']}.seed{s}", "student": {**cell["student"], "first_seed": s, "seeds": 1},
             "dest": str(b.path(b.work) / "parts" / f"{cell['id']}.seed{s}.json")}
            for s in seeds]


# ---------------------------------------------------------------- search (validation only)

def load_chosen(b: Bench) -> dict:
    """The settings chosen on validation so far (empty before any search)."""
    f = b.path(b.results) / "chosen.json"
    return json.loads(f.read_text()) if f.exists() else {}


def save_chosen(b: Bench, chosen: dict) -> None:
    from nrrdd.files import write_json
    write_json(b.path(b.results) / "chosen.json", {"kind": "chosen_settings", "schema_version": 1, **chosen})


def search_round(b: Bench, name: str, grid: dict, seeds: int = 1, chosen: dict | None = None) -> dict:
    """Every combination of `grid` on top of the chosen synthesis settings (nrrdd preset, IPC 10, soft labels);
    the values of the best validation accuracy are written back to chosen.json and returned."""
    saved = load_chosen(b)
    base = saved.get("synth", {}) if chosen is None else chosen
    keys, cells = list(grid), []
    for values in itertools.product(*grid.values()):
        params = {**base, **dict(zip(keys, values)), "ipc": 10}
        tid = f"search_{name}_" + "_".join(f"{k}{v}" for k, v in zip(keys, values))
        cells.append({"id": tid, "preset": "nrrdd", "overrides": params, "student": {"seeds": seeds},
                      "dest": str(b.path(b.results) / "search" / f"{tid}.json")})
    trials = evaluate_cells(b, cells)
    top_cell, top = max(trials, key=lambda t: t[1]["val_mean"])
    winner = {k: top_cell["overrides"][k] for k in keys if k != "refine"}  # a "none" round must not fix refine=none
    print(f"round {name}: chosen {winner} (val {top['val_mean']:.2f})", flush=True)
    entry = {"round": name, "grid": grid, "chosen": winner, "seeds_per_trial": seeds,
             "trials": [{"params": c["overrides"], "val_mean": r["val_mean"], "val_std": r["val_std"]}
                        for c, r in trials]}
    saved.setdefault("synth", {}).update({**base, **winner})
    saved.setdefault("rounds", []).append(entry)
    save_chosen(b, saved)
    return {**base, **winner}


def search(b: Bench, rounds: list, dbr: dict, seeds: int = 1) -> dict:
    """Coordinate-wise search at IPC 10 with soft labels, each round on top of the previous rounds' winners;
    then the DBR weight and threshold on the images chosen."""
    save_chosen(b, {"synth": {}, "rounds": [], "partial": True})
    chosen = {}
    for name, grid in rounds:
        chosen = search_round(b, name, grid, seeds, chosen)
    cells = []
    for a_dbr, r in itertools.product(dbr["alpha_dbr"], dbr["r"]):
        tid = f"search_dbr_alpha{a_dbr}_r{r}"
        cells.append({"id": tid, "preset": "nrrdd", "overrides": {**chosen, "ipc": 10},
                      "student": {"seeds": seeds, "label_mode": "dbr", "alpha_dbr": a_dbr, "r": r},
                      "dest": str(b.path(b.results) / "search" / f"{tid}.json")})
    results = [r for _, r in evaluate_cells(b, cells)]
    top = max(results, key=lambda x: x["val_mean"])
    student = {"alpha_dbr": top["config"]["alpha_dbr"], "r": top["config"]["r"]}
    saved = load_chosen(b)
    saved["rounds"].append({"round": "dbr", "chosen": student, "trials": [
        {"params": {"alpha_dbr": x["config"]["alpha_dbr"], "r": x["config"]["r"]}, "val_mean": x["val_mean"],
         "val_std": x["val_std"]} for x in results]})
    saved.pop("partial", None)
    save_chosen(b, {**saved, "student_dbr": student, "seeds_per_trial": seeds, "selection":
                    "max val_mean (5,000 held-out training images); test accuracy never consulted"})
    return chosen


def search_temperature(b: Bench, temperatures: list[float], seeds: int = 1) -> dict:
    """Student soft-label temperature on RDED-preset IPC 10 images (method-neutral), by validation accuracy."""
    cells = [{"id": f"search_temperature_T{t}", "preset": "rded", "overrides": {"ipc": 10},
              "student": {"seeds": seeds, "temperature": t},
              "dest": str(b.path(b.results) / "search" / f"search_temperature_T{t}.json")} for t in temperatures]
    results = [r for _, r in evaluate_cells(b, cells)]
    top = max(results, key=lambda r: r["val_mean"])
    chosen = load_chosen(b)
    chosen["student"] = {"temperature": top["config"]["temperature"]}
    chosen.setdefault("rounds", []).append({"round": "student_temperature", "trials": [
        {"params": {"temperature": r["config"]["temperature"]}, "val_mean": r["val_mean"], "val_std": r["val_std"]}
        for r in results], "chosen": chosen["student"]})
    save_chosen(b, chosen)
    return chosen["student"]


# ---------------------------------------------------------------- grid, trials, teacher

GRID_ROWS = [(p, "sl-online") for p in ("random", "rded", "sre2l", "cidd", "nrrdd")] + \
    [(p, m) for p in ("nrrdd", "nrrdd-lr") for m in ("dbr", "onehot", "compact")] + [("nrrdd-lr", "sl-online")]


def grid(b: Bench, ipc: list[int], presets=None, modes=None, students=("convnet3",), seeds: int = 3,
         distill_only: bool = False) -> None:
    """Presets x label modes x IPC x student architectures (ConvNet-3 students get every label mode, others
    soft labels only), with the synthesis and student settings of chosen.json."""
    chosen = load_chosen(b)
    synth, dbr, common = chosen.get("synth", {}), chosen.get("student_dbr", {}), chosen.get("student", {})
    cells = []
    for n, student, (preset, mode) in itertools.product(ipc, students, GRID_ROWS):
        if (student != "convnet3" and mode != "sl-online") or (presets and preset not in presets) or \
                (modes and mode not in modes):
            continue
        ov = {"ipc": n}
        if preset in ("nrrdd", "nrrdd-lr", "cidd"):
            ov.update({k: v for k, v in synth.items() if preset != "cidd" or k in ("select", "crop_score")})
            if preset == "nrrdd":
                ov["alpha_lr"] = 0.0
            if preset == "nrrdd-lr" and not synth.get("alpha_lr"):
                ov["alpha_lr"] = 0.1
        st = {"seeds": seeds, "label_mode": mode, "student": student, **common, **(dbr if mode == "dbr" else {})}
        cid = f"ipc{n}_{preset}_{mode}_{student}"
        cells.append({"id": cid, "preset": preset, "overrides": ov, "student": st,
                      "dest": str(b.path(b.results) / "cells" / f"{cid}.json")})
    evaluate_cells(b, cells, distill_only)


def trials(b: Bench, folder: str, trials: list[dict]) -> None:
    """Free-form cells, one record each in results/<folder>/<id>.json: {id, preset, synth: {...} (ipc 10
    unless given), student: {...} (seeds 1 unless given)}, or {id, distilled: folder, student} to evaluate an
    existing distilled set. For screens and ablations beside the random row."""
    trials = [t for t in trials if not ONLY or t["id"] in ONLY]
    cells = [{"id": t["id"], "preset": t.get("preset"), "overrides": {"ipc": 10, **t.get("synth", {})},
              "student": {"seeds": 1, **t.get("student", {})}, "distilled": t.get("distilled"),
              "dest": str(b.path(b.results) / folder / f"{t['id']}.json")} for t in trials]
    evaluate_cells(b, cells)


def teacher(b: Bench, recipe: dict, dest: str | None = None) -> None:
    """Train a teacher with `recipe` (TeacherConfig fields) unless its file exists: the config's teacher, or
    `dest` (a member of an ensemble). Its record goes to results/teacher.json (results/teacher/<dest's name>.json)."""
    from nrrdd.config import TeacherConfig
    from nrrdd.files import write_json
    from nrrdd.teacher import train_teacher
    target = b.path(dest or b.teacher)
    if target.exists():
        return
    run = b.path(b.work) / ("teacher" if dest is None else f"teacher_{target.stem}")
    r = train_teacher(TeacherConfig(**{"data": b.data, **recipe}), run, device=b.device, resume=run.exists(),
                      progress=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "teacher.safetensors", target)
    write_json(b.path(b.results) / ("teacher.json" if dest is None else f"teacher/{target.stem}.json"), r)


def ensemble(b: Bench, members: list[str]) -> None:
    """The config's teacher as the mean of `members`' logits (`nrrdd ensemble-teachers`) unless it exists;
    its validation and test accuracy are measured into it."""
    from nrrdd.teacher import ensemble_teachers
    if b.path(b.teacher).exists():
        return
    meta = ensemble_teachers([b.path(m) for m in members], b.path(b.teacher), b.data, device=b.device,
                             progress=False)
    print(f"ensemble of {len(members)}: val {meta['val_acc']:.2f}  test {meta['test_acc']:.2f}", flush=True)


# ---------------------------------------------------------------- summaries

def summary(b: Bench) -> None:
    """Markdown table of the grid's cells against the paper's targets, and the accuracy plot."""
    from nrrdd.report import PAPER_LABELS_IMAGENETTE, accuracy_plot, markdown_table
    results_dir = b.path(b.results)
    results = [json.loads(p.read_text()) for p in sorted((results_dir / "cells").glob("*.json"))]
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
    name = results_dir.name
    (results_dir.parent / f"{name}.md").write_text(
        f"# {b.title or name}\n\nGenerated by the `summary` step of `python benchmarks/harness.py` "
        f"from `benchmarks/results/{name}/cells/*.json` (each holds its command, config, seeds, device and "
        "wall time). Test top-1 of the final epoch, mean ± std over the student seeds listed per cell. Settings were "
        f"chosen on the validation split (`{name}/chosen.json`); test accuracy was never consulted.\n\n"
        + "\n".join(lines) + "\n## All cells\n\n" + table_note(results) + markdown_table(results) +
        f"\nPaper's label-mode figures (Table 2) are on ImageNette, not CIFAR-10: {PAPER_LABELS_IMAGENETTE}.\n")
    accuracy_plot(results, results_dir.parent / f"{name}.png")
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


def screen_summary(b: Bench, folder: str, note: str | None = None) -> None:
    """Ablation table of a trials folder: each trial's gain over the random row of its recipe."""
    from screen_summary import write_summary  # beside this script
    write_summary(b.path(b.results) / folder, note or "")


STEPS = {"teacher": teacher, "ensemble": ensemble, "search": search, "search_round": search_round,
         "search_temperature": search_temperature, "grid": grid, "trials": trials, "summary": summary,
         "screen_summary": screen_summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a benchmark config (JSON), e.g. benchmarks/configs/cifar10_nols15.json")
    p.add_argument("--steps", nargs="+", help="run only the steps of these kinds (default: all, in order)")
    p.add_argument("--plan", action="store_true", help="list each grid and trials step's cells still to run, and "
                   "run nothing")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override top-level config fields, "
                   "e.g. workers=14 device=cuda data=cifar100")
    p.add_argument("--trials", nargs="+", default=[], metavar="ID", help="run only these trials of the trials steps "
                   "(so that two processes can share a config's trials without running one twice)")
    a = p.parse_args()
    b = load_bench(a.config, a.set)
    for step in b.steps:
        if step.get("do") not in STEPS:
            raise SystemExit(f"{a.config}: unknown step {step.get('do')!r}; steps: {', '.join(STEPS)}")
    if b.threads and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(b.threads)  # spawned workers read it when torch loads
    unknown = set(a.trials) - {t["id"] for step in b.steps for t in step.get("trials", [])}
    if unknown:
        raise SystemExit(f"{a.config}: no trials {', '.join(sorted(unknown))}")
    global PLAN, ONLY
    PLAN, ONLY, t0 = a.plan, set(a.trials), time.time()
    for step in b.steps:
        if (a.steps and step["do"] not in a.steps) or (a.plan and step["do"] not in ("grid", "trials")):
            continue
        print(f"-- {step['do']}", flush=True)
        STEPS[step["do"]](b, **{k: v for k, v in step.items() if k != "do"})
    print(f"{Path(a.config).name} done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
