"""One row per change and its measured effect, as airbench comments each of its tricks: every screened
setting against the record it builds on (same data, IPC and preset, with the most settings, the teacher
among them, in common), and each preset against the one it adds to (the refinement: nrrdd over cidd), under the same
settings. Effects are validation points on the student seeds both records trained, the figure choices are
read from; test is beside for the record.

    python benchmarks/ablation.py benchmarks/results/screen_cifar10_ipc10 benchmarks/results/screen_cifar10_ipc1 ...
"""
from __future__ import annotations

import argparse
from pathlib import Path

from screen_summary import (RECIPE, evaluation_records, images_of, merge_seeds, recipe_of, other_teacher,
                            synthesis_changes, usual_teachers)


# what each preset adds to the one it is measured against
PARENT = {"rded": ("random", "RDED's selection (crops scored by teacher cross-entropy) over random real images"),
          "sre2l": ("random", "SRe2L's synthesis from noise over random real images"),
          "cidd": ("rded", "CIDD's selection (CAM-ratio scoring) over RDED's"),
          "nrrdd": ("cidd", "the non-critical region refinement over unrefined CIDD"),
          "nrrdd-lr": ("nrrdd", "label refinement over NRR-DD"),
          "cidd-whole": ("cidd", "whole images, the teacher's most confident, over CIDD's patches")}


def changes(r: dict, usual: dict) -> dict:
    """Where a record departs from its preset under the rded-300 recipe and its data set's usual teacher:
    synthesis and student settings, and the teacher (an ensemble)."""
    from nrrdd.config import StudentConfig, to_dict
    default = {**to_dict(StudentConfig()), "beta": 1}
    student = {k: v for k, v in zip(RECIPE + ("beta",), recipe_of(r)) if v != default[k]}
    if other_teacher(r, usual):
        student["teacher"] = other_teacher(r, usual)
    return {**synthesis_changes(r), **student}


def words(settings: dict) -> str:
    return ", ".join(k if v is True else f"{k} {v}" for k, v in sorted(settings.items())) or "its preset, rded-300"


def rows(records: list[dict]) -> list[dict]:
    """Each record against its base: the record of the same preset whose changes are the largest strict subset
    of its own (a setting's effect), and the parent preset's record with the same changes (a preset's)."""
    from nrrdd.report import matched_difference
    best: dict[tuple, dict] = {}  # of two records of one setting (a 3-seed cell, a 1-seed screen): more seeds
    merged = merge_seeds(records)
    usual = usual_teachers(merged)
    for r in merged:
        key = (r["data"], r["ipc"], r["preset"], tuple(sorted(changes(r, usual).items())))
        if key not in best or len(r["seeds"]) > len(best[key]["seeds"]):
            best[key] = r
    out = []

    def add(r: dict, base: dict, change: str, on: str) -> None:
        common = len(set(r["seeds"]) & set(base["seeds"]))
        out.append({"data": r["data"], "ipc": r["ipc"], "preset": r["preset"], "change": change, "on": on,
                    "val": matched_difference(r, base, "val_acc"), "test": matched_difference(r, base),
                    "seeds": common, "files": f"{r['_file']} vs {base['_file']}"})

    for (data, ipc, preset, mine), r in sorted(best.items(), key=lambda kv: str(kv[0])):
        mine = dict(mine)
        bases = [(k[3], b) for k, b in best.items() if k[:3] == (data, ipc, preset)
                 and set(k[3]) < set(mine.items())]
        if bases:
            theirs, base = max(bases, key=lambda kb: (len(kb[0]), len(kb[1]["seeds"])))
            change = {k: v for k, v in mine.items() if (k, v) not in theirs}
            # a student setting leaves the images as they were: where they differ, the set was distilled again
            # (float sums vary with threads and machines), so the row measures that as well
            again = not set(change) & (set(synthesis_changes(r)) | {"beta", "teacher"}) and \
                None not in (images_of(r), images_of(base)) and images_of(r) != images_of(base)
            add(r, base, words(change) + (" (other images: the same set distilled again)" if again else ""),
                words(dict(theirs)))
        if preset == "random":
            continue
        # against the preset it adds to, else (a screen that ran only the two) against random real images
        for parent, what in (PARENT.get(preset, ("random", "")), ("random", f"{preset} over random real images")):
            base = best.get((data, ipc, parent, tuple(sorted(mine.items()))))
            if base:
                add(r, base, what or f"{preset} over random real images", words(mine))
                break
    return out


def table(found: list[dict]) -> str:
    lines = ["| data | IPC | preset | change | on top of | effect, val (same seeds) | effect, test | seeds "
             "| records |", "|" + "---|" * 9]
    for a in found:
        lines.append(f"| {a['data']} | {a['ipc']} | {a['preset']} | {a['change']} | {a['on']} | {a['val']:+.2f} | "
                     f"{a['test']:+.2f} | {a['seeds'] or 'none (means)'} | {a['files']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="folders of evaluation records")
    ap.add_argument("--out", default="benchmarks/results/ablation.md")
    a = ap.parse_args()
    head = ("# Ablation: each change and its measured effect\n\nGenerated by `python benchmarks/ablation.py "
            f"{' '.join(a.folders)}` from the committed evaluation records. "
            f"{' '.join(__doc__.split(chr(10) + chr(10))[0].split())} "
            "A setting is named as the record's config names it (`epochs 1000`, `beta 4, unstitch`); 'on top of' "
            "is what both records share. One seed is a screen: a difference under 1 point needs 3 seeds.\n\n")
    Path(a.out).write_text(head + table(rows(evaluation_records(a.folders))))
    print(Path(a.out).read_text())


if __name__ == "__main__":
    main()
