"""The headline table: per data set, IPC and student recipe, each preset's accuracy and its improvement over
random real images (same teacher, recipe, labels and seeds), the paper's figure beside, and what one result
cost (distillation, and one student). Built from the committed evaluation records only, and only from rows
whose synthesis is the preset's own (the screens' variants stay in their ablation tables).

    python benchmarks/headline.py benchmarks/results/screen_cifar10_ipc1 benchmarks/results/screen_cifar10_ipc10 \
        benchmarks/results/cifar10_convnet_nols15/cells benchmarks/results/screen_cifar100_ipc1 \
        benchmarks/results/cifar100_transfer/ipc10 --readme README.md
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from screen_summary import (describe, evaluation_records, merge_seeds, other_teacher, random_rows, recipe_of,
                            synthesis_of, usual_teachers)

from nrrdd.config import recipe_name


ORDER = ("random", "rded", "sre2l", "cidd", "nrrdd", "nrrdd-lr", "cidd-whole")
# the best published ConvNet-3 figure per data set and IPC (../shared/docs/anchors.md; protocols differ)
ANCHORS = {("cifar10", 1): "NCFM 49.5", ("cifar10", 10): "NCFM 71.8", ("cifar10", 50): "NCFM 77.4",
           ("cifar100", 1): "NRR-DD 27.3", ("cifar100", 10): "NRR-DD 55.7", ("cifar100", 50): "NRR-DD 61.1"}


def load(folders: list[str]) -> list[dict]:
    """Evaluation records with soft labels, the preset's own synthesis and a named student recipe (other
    recipes are ablations, in the screens' tables). Seeds of one row kept in two files are joined; of two
    records of the same row on different images (a 3-seed cell and a 1-seed screen), the one with more seeds."""
    records = [r for r in evaluation_records(folders) if r["config"].get("label_mode") == "sl-online" and
               not synthesis_of(r) and recipe_name(r["config"]) != "custom"]
    best: dict[tuple, dict] = {}
    for r in with_settings(merge_seeds(records)):
        key = (r["data"], r["ipc"], r["_setting"], r["preset"])
        if key not in best or len(r["seeds"]) > len(best[key]["seeds"]):
            best[key] = r
    return list(best.values())


def with_settings(records: list[dict]) -> list[dict]:
    """Each record's `_setting`: its student recipe, and its teacher where that is not the data set's usual
    one (an ensemble), so that a row and its random row share both."""
    usual = usual_teachers(records)
    for r in records:
        r["_setting"] = recipe_of(r), other_teacher(r, usual)
    return records


def setting(r: dict) -> str:
    """A record's `_setting` in words."""
    recipe, teacher = r["_setting"]
    return describe(recipe) + (f", teacher {teacher}" if teacher else "")


def table(records: list[dict]) -> str:
    from nrrdd.report import PAPER, matched_difference
    lines = ["| data | IPC | student recipe | preset | seeds | val top-1 | test top-1 | over random (test / val, same "
             "seeds) | paper (test) | distill (s) | one student (s) | record |", "|" + "---|" * 12]
    def row_key(r: dict) -> tuple:
        return r["data"], r["ipc"], r["_setting"]
    random = random_rows(records, row_key)
    rows = sorted(records, key=lambda r: (r["data"], r["ipc"], r["_setting"][0], r["_setting"][1] or "",
                                          ORDER.index(r["preset"]) if r["preset"] in ORDER else 99))
    for r in rows:
        base = random.get(row_key(r))
        gain = "—" if base is None or base is r else \
            f"{matched_difference(r, base):+.2f} / {matched_difference(r, base, 'val_acc'):+.2f}"
        paper = PAPER.get((r["data"], r["config"]["student"], r["preset"], "sl-online", r["ipc"]))
        t = r.get("distill_timings") or {}
        std = f" ± {r['test_std']:.2f}" if len(r["seeds"]) > 1 else ""
        distill = f"{t['total_s']:.0f}" if t else "–"
        lines.append(f"| {r['data']} | {r['ipc']} | {setting(r)} | {r['preset']} | {len(r['seeds'])} | "
                     f"{r['val_mean']:.2f} | {r['test_mean']:.2f}{std} | {gain} | {paper or '–'} | {distill} | "
                     f"{statistics.mean(s['time_s'] for s in r['per_seed']):.0f} ({r.get('device', 'cpu')}) | "
                     f"{r['_file']} |")
    return "\n".join(lines) + "\n"


def confirmed_first(r: dict) -> tuple:
    """Rank of a row for choosing: seeds up to the 3 that confirm a screen, then validation accuracy."""
    return min(len(r["seeds"]), 3), r["val_mean"]


def chosen(records: list[dict]) -> str:
    """One row per data set and IPC under the recipe chosen on validation (the one in which some preset scores
    highest), every preset's test top-1 in it, and the best preset's gain over random. A row confirmed on 3
    seeds outranks a 1-seed screen, whose mean is too noisy to choose by (screen with 1 seed, confirm with 3)."""
    from nrrdd.report import PAPER, matched_difference
    lines = ["| data | IPC | recipe (chosen on val) | " + " | ".join(ORDER) + " | best over random (test / val) "
             "| paper (NRR-DD) | best published | one student (s) |", "|" + "---|" * (len(ORDER) + 7)]
    for data, ipc in sorted({(r["data"], r["ipc"]) for r in records}):
        mine = [r for r in records if (r["data"], r["ipc"]) == (data, ipc)]
        top = max((r for r in mine if r["preset"] != "random"), key=confirmed_first, default=None)
        if top is None:
            continue
        row = {r["preset"]: r for r in mine if r["_setting"] == top["_setting"]}
        cells = [f"{row[p]['test_mean']:.1f}" + ("" if len(row[p]["seeds"]) >= 3 else f" ({len(row[p]['seeds'])} "
                 "seed)") if p in row else "–" for p in ORDER]
        base = row.get("random")
        gain = "–" if base is None else \
            f"{matched_difference(top, base):+.2f} / {matched_difference(top, base, 'val_acc'):+.2f} ({top['preset']})"
        paper = PAPER.get((data, "convnet3", "nrrdd", "sl-online", ipc), "–")
        lines.append(f"| {data} | {ipc} | {setting(top)} | " + " | ".join(cells) + f" | {gain} | "
                     f"{paper} | {ANCHORS.get((data, ipc), '–')} | "
                     f"{statistics.mean(s['time_s'] for s in top['per_seed']):.0f} |")
    return "\n".join(lines) + "\n"


MARK = "<!-- headline -->"


def into_readme(text: str, table: str) -> str:
    """`text` with the table that follows its MARK line replaced by `table` (the README keeps no hand copy)."""
    if MARK not in text:
        raise SystemExit(f"no '{MARK}' line to put the table under")
    head, rest = text.split(MARK + "\n", 1)
    lines = rest.split("\n")
    n = next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))
    return head + MARK + "\n" + table.rstrip("\n") + "\n" + "\n".join(lines[n:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="folders of evaluation records")
    ap.add_argument("--out", default="benchmarks/results/headline.md")
    ap.add_argument("--readme", help=f"also put the chosen-recipe table under the '{MARK}' line of this file")
    a = ap.parse_args()
    head = ("# Headline: accuracy and improvement over random real images\n\nGenerated by `python "
            f"benchmarks/headline.py {' '.join(a.folders)}`. Test top-1 of the final epoch (mean ± std over "
            "student seeds), ConvNet-3 students, online soft labels (T = 20); 'over random' is the mean difference "
            "on the seeds both rows trained, test / validation. Settings were chosen on validation only, "
            "and the best preset of a row among those confirmed on 3 seeds where any are. Times: "
            "distillation (selection + refinement + writing) and one student's training (mean over seeds, on the "
            "device named; `cpu x1`: one thread beside another job on a 2-core machine); relabelling is online, "
            "inside each student. The paper "
            "column: NRR-DD's Table 1 (ConvNet) for nrrdd and for rded (the RDED figure it quotes), its CIDD "
            "ablation for cidd.\n\n")
    records = load(a.folders)
    best = chosen(records)
    Path(a.out).write_text(head + "## Under the recipe chosen on validation\n\n" + best +
                           "\n## Every preset under every named recipe\n\n" + table(records))
    if a.readme:
        Path(a.readme).write_text(into_readme(Path(a.readme).read_text(), best))
    print(Path(a.out).read_text())


if __name__ == "__main__":
    main()
