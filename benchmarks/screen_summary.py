"""Ablation table of a folder of evaluation records (one JSON per trial): validation and test top-1 per preset
and student recipe, and each preset's gain over random real images under the same recipe and storage.
Choices are read off the validation column only; test is shown for the record.

    python benchmarks/screen_summary.py benchmarks/results/screen_cifar10_ipc10

(the `screen_summary` step of benchmarks/harness.py calls the same function with its config's note).
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path


# what tells two trials' recipes apart (beyond the preset): student fields, and the stored images' beta
RECIPE = ("epochs", "crop_min", "unstitch", "ema", "temperature", "label_mode", "soft_loss", "hard_ce")


def recipe_of(r: dict) -> tuple:
    """Fields a record predates read as their defaults (it ran without them)."""
    from nrrdd.config import StudentConfig, to_dict
    cfg = {**to_dict(StudentConfig()), **r["config"]}
    beta = (r.get("distilled_config") or {}).get("beta", 1)
    return tuple(cfg[k] for k in RECIPE) + (beta,)


def synthesis_changes(r: dict) -> dict:
    """The synthesis settings in which a record's distilled set differs from its preset (beta is in the recipe)."""
    from nrrdd import NrrddError
    from nrrdd.config import effective_settings, preset_config, to_dict
    made = effective_settings(r.get("distilled_config") or {})
    try:
        preset = to_dict(preset_config(r.get("preset")))
    except NrrddError:  # a plain folder or a preset renamed since: show none
        return {}
    # the synthesis seed draws other images; named so, it is not read as a student seed
    return {("synthesis seed" if k == "seed" else k): v for k, v in sorted(made.items())
            if k not in ("beta", "ipc") and preset.get(k) != v}


def synthesis_of(r: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in synthesis_changes(r).items())


# how a recipe field is named when it differs from StudentConfig's default (epochs and beta are always named)
SHOWN = {"crop_min": "crop {}-1".format, "ema": "EMA {}".format, "temperature": "T {:g}".format,
         "soft_loss": lambda v: f"{v.upper()} loss", "hard_ce": "+ {:g} hard CE".format,
         "label_mode": "{} labels".format}


def describe(key: tuple) -> str:
    from nrrdd.config import StudentConfig, recipe_name
    named = dict(zip(RECIPE + ("beta",), key))
    name = recipe_name(named)
    parts = [(f"{name}: " if name != "custom" else "") + f"{named['epochs']} epochs",
             f"beta {named['beta']}" + (" unstitched" if named["unstitch"] else "")]
    return ", ".join(parts + [fmt(named[k]) for k, fmt in SHOWN.items()
                              if named[k] not in (None, getattr(StudentConfig, k))])


def usual_teachers(records: list[dict]) -> dict:
    """Each data set's teacher: the one most of its records used (a change is what fewer records did)."""
    counts = Counter((r["data"], Path(r["teacher"]).name) for r in records)
    return {data: name for (data, name), _ in sorted(counts.items(), key=lambda kv: (kv[1], kv[0][1]))}


def other_teacher(r: dict, usual: dict) -> str | None:
    """The record's teacher (file stem) when it is not its data set's usual one (`usual_teachers`), else None."""
    name = Path(r["teacher"]).name
    return None if name == usual[r["data"]] else Path(name).stem


def images_of(r: dict) -> str | None:
    """The digest of the images a record's students trained on (None in records from before it was kept)."""
    return (r.get("inputs") or {}).get("images_sha256")


def merge_seeds(trials: list[dict]) -> list[dict]:
    """One row per set of images and recipe: records that trained other seeds of the same students (a
    confirmation's seeds 1-2 beside a screen's seed 0) are joined, their files named together; of two that
    share seeds, the one with more is kept. Records of other images (a set distilled again by changed code)
    stay apart."""
    from nrrdd.evaluate import join_seeds
    rows: dict[tuple, dict] = {}
    for t in trials:
        key = (t.get("data"), t.get("ipc"), recipe_of(t), t.get("preset"), synthesis_of(t),
               images_of(t), Path(t["teacher"]).name, t["config"].get("label_mode"))
        if key not in rows:
            rows[key] = t
            continue
        r = rows[key]
        if set(r["seeds"]) & set(t["seeds"]):  # the same students twice (a cell and its copy): keep the larger
            rows[key] = max(r, t, key=lambda x: len(x["seeds"]))
            continue
        rows[key] = {**join_seeds([r, t]), "_file": f"{r['_file']} + {t['_file']}"}
    return list(rows.values())


def shared(trials: list[dict]) -> str:
    """What the trials have in common, read off their records: data, IPC, students, labels, teacher."""
    def values(get) -> str:
        return " / ".join(str(v) for v in sorted({get(t) for t in trials}, key=str))
    return (f"Data {values(lambda t: t.get('data'))}, IPC {values(lambda t: t.get('ipc'))}, "
            f"{values(lambda t: t['config'].get('student'))} students, labels "
            f"{values(lambda t: t['config'].get('label_mode'))} "
            f"(T = {values(lambda t: t['config'].get('temperature'))}) "
            f"from teacher `{values(lambda t: Path(t['teacher']).name)}`; each row's seeds are its own, and the gain "
            f"over random is taken on the seeds both rows trained, against random real images of the same synthesis "
            f"seed where that row exists (they are the first images of the pool that seed draws). Wall times are "
            f"per record, of one thread beside another job; a record joined from parts (seeds trained side by side or in separate runs) sums its "
            f"parts' times, so it reads as one-thread seconds for all its students, not as elapsed time.")


def evaluation_records(folders: list[str]) -> list[dict]:
    """Every evaluation record in the folders, named by folder/file for the tables."""
    records = []
    for folder in folders:
        for f in sorted(Path(folder).glob("*.json")):
            r = json.loads(f.read_text())
            if r.get("kind") == "evaluation":
                records.append({**r, "_file": f"{Path(folder).name}/{f.name}"})
    return records


def draw_of(r: dict) -> int:
    """The synthesis seed of a record's set (the presets' is 0). Random real images of seed s are the first images
    of the candidate pool that a selection of seed s draws, so a selection is compared with those of its draw."""
    return synthesis_changes(r).get("synthesis seed", 0)


def recipe_and_draw(r: dict) -> tuple:
    return recipe_of(r), draw_of(r)


def random_rows(rows: list[dict], key=recipe_and_draw) -> dict:
    """The random-real-images row of each key (by default each recipe and draw), the baseline of every row with
    that key: random real images as the preset makes them but for the synthesis seed, of the most seeds."""
    found: dict = {}
    for r in rows:
        if r.get("preset") == "random" and set(synthesis_changes(r)) <= {"synthesis seed"}:
            k = key(r)
            if k not in found or len(r["seeds"]) > len(found[k]["seeds"]):
                found[k] = r
    return found


def shown(path: Path) -> str:
    """A path as the command a reader reruns names it: relative to the working folder when inside it (the
    harness passes absolute ones, which name the machine the table was made on)."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def write_summary(folder: Path, note: str = "") -> None:
    """<folder>.md beside the folder: one row per record, each preset's gain over the random row of its recipe."""
    from nrrdd.report import matched_difference
    trials = [{**json.loads(f.read_text()), "_file": f.name} for f in sorted(folder.glob("*.json"))]
    trials = merge_seeds([t for t in trials if t.get("kind") == "evaluation"])
    if not trials:  # a step whose trials have not run yet: no table rather than an empty one
        print(f"{shown(folder)}: no evaluation records yet, no table written")
        return
    random = random_rows(trials)
    lines = ["| recipe | preset | seeds | val top-1 | val, seed 0 | gain over random (val, same seeds) | test top-1 "
             "| wall (s) | file |", "|" + "---|" * 9]
    for t in sorted(trials, key=lambda t: (recipe_of(t), t.get("preset") != "random", t.get("preset"))):
        base = random.get(recipe_and_draw(t)) or random.get((recipe_of(t), 0))
        gain = "—" if base is None or base is t else f"{matched_difference(t, base, 'val_acc'):+.2f}"
        seed0 = next((f"{r['val_acc']:.2f}" for r in t["per_seed"] if r["seed"] == 0), "–")
        preset = t.get("preset") + (f" ({synthesis_of(t)})" if synthesis_of(t) else "")
        lines.append(f"| {describe(recipe_of(t))} | {preset} | {len(t['seeds'])} | {t['val_mean']:.2f} | "
                     f"{seed0} | {gain} | {t['test_mean']:.2f} | {t['wall_time_s']:.0f} | {t['_file']} |")
    out = folder.with_suffix(".md")
    head = (f"# {folder.name}: screen on the validation split\n\nGenerated by `python benchmarks/screen_summary.py "
            f"{shown(folder)}` from the evaluation records in `{folder.name}/` (each holds its command, config, seeds, "
            f"machine, commit or source digest and wall time). {shared(trials)}" + (f" {note}" if note else "")
            + "\n\n")
    out.write_text(head + "\n".join(lines) + "\n")
    print(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--note", default="", help="what to add under the title to what the records say they share")
    a = ap.parse_args()
    write_summary(Path(a.folder), a.note)


if __name__ == "__main__":
    main()
