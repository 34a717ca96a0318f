"""The benchmark harness, end to end on the embedded digits with tiny budgets: a grid grown by a seed, free-form
trials beside the random row, and both summaries."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "harness.py"


def run_bench(tmp_path, steps, *args, **fields):
    config = {"results": str(tmp_path / "results" / "digits_bench"), "teacher": fields.pop("teacher"),
              "data": "digits", "work": str(tmp_path / "work"), "device": "cpu",
              "synth": {"iterations": 2, "pool_per_class": 10}, "student": {"epochs": 2, "width": 16},
              "steps": steps, **fields}
    f = tmp_path / "bench.json"
    f.write_text(json.dumps(config))
    r = subprocess.run([sys.executable, str(HARNESS), str(f), *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(config["results"])


def test_grid_then_more_seeds_then_summary(tmp_path, digits_teacher):
    def grid(seeds):
        results = run_bench(tmp_path, [{"do": "grid", "ipc": [1], "presets": ["random", "nrrdd"],
                                        "modes": ["sl-online", "dbr"], "seeds": seeds}, {"do": "summary"}],
                            teacher=str(digits_teacher))
        return results, {p.name: json.loads(p.read_text()) for p in (results / "cells").glob("*.json")}

    _, one = grid(1)
    assert sorted(one) == ["ipc1_nrrdd_dbr_convnet3.json", "ipc1_nrrdd_sl-online_convnet3.json",
                           "ipc1_random_sl-online_convnet3.json"]
    assert all(c["seeds"] == [0] and c["ipc"] == 1 for c in one.values())
    results, two = grid(2)  # extends every cell by seed 1, reusing seed 0
    for name, cell in two.items():
        assert cell["seeds"] == [0, 1] and cell["per_seed"][0] == one[name]["per_seed"][0]
    table = (results.parent / "digits_bench.md").read_text()
    # every cell is a row of the summary, with the accuracy its file holds
    rows = [ln for ln in table.splitlines() if ln.startswith("| digits | convnet3 |")]
    assert len(rows) == len(two) and "digits_bench/cells" in table
    for cell in two.values():
        assert any(f"| {cell['preset']} | {cell['config']['label_mode']} | 1 | {cell['test_mean']:.2f} ± " in r
                   for r in rows), cell["preset"]
    assert (results.parent / "digits_bench.png").stat().st_size > 0


def test_trials_beside_random_and_their_summary(tmp_path, digits_teacher):
    trials = [{"id": "random", "preset": "random", "synth": {"ipc": 2}},
              {"id": "cidd_diverse", "preset": "cidd", "synth": {"ipc": 2, "select": "diverse"}},
              {"id": "cidd_e3", "preset": "cidd", "synth": {"ipc": 2}, "student": {"epochs": 3}}]
    steps = [{"do": "trials", "folder": "screen", "trials": trials},
             {"do": "screen_summary", "folder": "screen", "note": "Digits smoke."}]
    results = run_bench(tmp_path, steps[:1], "--trials", "random", teacher=str(digits_teacher))
    assert [p.name for p in (results / "screen").glob("*.json")] == ["random.json"]  # the others wait
    results = run_bench(tmp_path, steps, teacher=str(digits_teacher))
    recs = {p.stem: json.loads(p.read_text()) for p in (results / "screen").glob("*.json")}
    assert sorted(recs) == ["cidd_diverse", "cidd_e3", "random"]
    assert recs["cidd_diverse"]["distilled_config"]["select"] == "diverse"
    assert recs["cidd_e3"]["config"]["epochs"] == 3 and recs["random"]["config"]["epochs"] == 2
    table = (results / "screen.md").read_text()
    assert "Digits smoke." in table
    row = {r.split(" | ")[-1].rstrip(" |"): r for r in table.splitlines() if r.startswith("| 2 epochs")}
    gain = recs["cidd_diverse"]["val_mean"] - recs["random"]["val_mean"]
    # the smoke pool is a setting in which the set differs from its preset, so it shows too (not the refinement
    # budget: cidd refines nothing)
    assert f"| cidd (pool_per_class 10, select diverse) | 1 | {recs['cidd_diverse']['val_mean']:.2f} |" in row["cidd_diverse.json"]
    assert f"| {gain:+.2f} |" in row["cidd_diverse.json"]
    assert "| 3 epochs" in table and "cidd_e3.json" not in row  # its own recipe: no random row to set against
    sys.path.insert(0, str(HARNESS.parent))
    from screen_summary import write_summary
    (results / "later").mkdir()
    write_summary(results / "later")  # trials not run yet: no table
    assert not (results / "later.md").exists()


def test_workers_share_one_trials_seeds_and_join_them(tmp_path, digits_teacher):
    """An ensemble step makes the config's teacher; two workers, one 2-seed trial: each seed is its own part
    (a record under work/parts/), the trial's one record joins them; a rerun trains nothing, a grown seed count
    only the new seeds."""
    ens = tmp_path / "ens.safetensors"
    steps = [{"do": "ensemble", "members": [str(digits_teacher), str(digits_teacher)]},
             {"do": "trials", "folder": "screen", "trials": [
                 {"id": "random", "preset": "random", "synth": {"ipc": 2}, "student": {"seeds": 2}}]}]
    results = run_bench(tmp_path, steps, teacher=str(ens), workers=2, threads=1)
    rec = json.loads((results / "screen" / "random.json").read_text())
    assert rec["teacher"] == str(ens) and rec["teacher_arch"] == "ensemble"
    parts = [json.loads((tmp_path / "work" / "parts" / f"random.seed{s}.json").read_text()) for s in (0, 1)]
    assert rec["seeds"] == [0, 1] and [p["seeds"] for p in parts] == [[0], [1]]
    assert rec["per_seed"] == parts[0]["per_seed"] + parts[1]["per_seed"]
    assert rec["config"]["seeds"] == 2 and rec["config"]["first_seed"] == 0
    before = (results / "screen" / "random.json").stat().st_mtime_ns
    run_bench(tmp_path, steps, teacher=str(ens), workers=2, threads=1)
    assert (results / "screen" / "random.json").stat().st_mtime_ns == before
    # grown to 4 seeds: only seeds 2 and 3 train, as parts of their own, joined to the record's two
    steps[1]["trials"][0]["student"]["seeds"] = 4
    run_bench(tmp_path, steps, teacher=str(ens), workers=2, threads=1)
    grown = json.loads((results / "screen" / "random.json").read_text())
    assert grown["seeds"] == [0, 1, 2, 3] and grown["per_seed"][:2] == rec["per_seed"]
    assert sorted(p.name for p in (tmp_path / "work" / "parts").iterdir()) == [f"random.seed{s}.json" for s in range(4)]
    assert sorted(d.name.split("@")[0] for d in (tmp_path / "work" / "eval").iterdir()) == [
        f"random.seed{s}" for s in range(4)]


def test_ddranking_check_writes_cifar_pickles_torchvision_reads(tmp_path):
    """The DD-Ranking check hands DD-Ranking our CIFAR-10 copy as torchvision's `cifar-10-batches-py`: every
    pixel and label must come back where torchvision's loader puts it."""
    import importlib.util

    import numpy as np
    import torch
    from torchvision.datasets import CIFAR10
    spec = importlib.util.spec_from_file_location("ddranking_check", HARNESS.parent / "ddranking_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 12))
    test = (rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), np.arange(4))
    names = [f"class{i}" for i in range(10)]
    check.write_cifar_pickles(tmp_path, train, test, names)
    saved = (CIFAR10.train_list, CIFAR10.test_list, CIFAR10.meta)
    try:
        check.accept_local_cifar()
        tr, te = CIFAR10(str(tmp_path), train=True, download=False), CIFAR10(str(tmp_path), train=False)
    finally:
        CIFAR10.train_list, CIFAR10.test_list, CIFAR10.meta = saved
    assert tr.classes == names and tr.targets == train[1].tolist() and te.targets == [0, 1, 2, 3]
    assert np.array_equal(tr.data, train[0].transpose(0, 2, 3, 1))  # torchvision keeps HWC
    img, label = te[2]
    assert label == 2 and torch.equal(torch.from_numpy(np.array(img)), torch.from_numpy(test[0][2]).permute(1, 2, 0))


def test_ablation_sets_each_change_against_the_record_it_builds_on():
    """Hand-made records: a setting is measured against the same preset with the most settings in common, a
    preset against the one it adds to under the same settings (or random when that one is missing), each on
    the seeds both trained."""
    sys.path.insert(0, str(HARNESS.parent))
    import ablation

    def rec(name, preset, val, epochs=300, beta=1, unstitch=False, seeds=(0,), teacher="t"):
        per_seed = [{"seed": s, "val_acc": val + s, "test_acc": val + s + 1} for s in seeds]
        return {"kind": "evaluation", "_file": name, "data": "d", "ipc": 1, "teacher": f"{teacher}.safetensors",
                "preset": preset, "seeds": list(seeds), "per_seed": per_seed, "wall_time_s": 1.0,
                "config": {"epochs": epochs, "unstitch": unstitch}, "distilled_config": {"beta": beta},
                "val_mean": val, "test_mean": val + 1}

    records = [rec("r300", "random", 20.0, seeds=(0, 1)), rec("c300", "cidd", 25.0, seeds=(0, 1, 2)),
               rec("c1000", "cidd", 30.0), rec("c1000b4", "cidd", 37.0, epochs=1000, beta=4, unstitch=True),
               rec("n300", "nrrdd", 24.5), rec("c300ens", "cidd", 26.5, teacher="ens"),
               rec("r300d1", "random", 19.0)]
    records[2]["config"]["epochs"] = 1000
    records[-1]["distilled_config"]["seed"] = 1  # another draw of random images
    found = {(a["preset"], a["change"]): a for a in ablation.rows(records)}
    # a teacher fewer records used is a change like a setting: against the usual teacher's record
    assert (found["cidd", "teacher ens"]["on"], found["cidd", "teacher ens"]["val"]) == ("its preset, rded-300", 1.5)
    assert found["cidd", "epochs 1000"]["on"] == "its preset, rded-300" and found["cidd", "epochs 1000"]["val"] == 5.0
    mf = found["cidd", "beta 4, unstitch"]
    assert (mf["on"], mf["val"], mf["test"], mf["seeds"]) == ("epochs 1000", 7.0, 7.0, 1)
    refine = found["nrrdd", ablation.PARENT["nrrdd"][1]]
    assert (refine["val"], refine["files"]) == (-0.5, "n300 vs c300")
    # no rded record: cidd is measured against random, on seeds 0 and 1 (25 - 20 each)
    assert found["cidd", "cidd over random real images"]["val"] == 5.0
    assert found["cidd", "cidd over random real images"]["seeds"] == 2 and len(found) == 6
    # the synthesis seed is named as such, not read as a student seed
    assert found["random", "synthesis seed 1"]["val"] == -1.0


def test_headline_chooses_among_confirmed_rows_before_screens():
    """A 1-seed screen that tops a 3-seed row on validation does not become the row's best preset: the gain
    over random is that of the confirmed preset, on the seeds it shares with random (hand-computed: 2.0)."""
    sys.path.insert(0, str(HARNESS.parent))
    import headline

    def rec(preset, vals, teacher="t"):
        per_seed = [{"seed": s, "val_acc": v, "test_acc": v, "time_s": 1.0} for s, v in enumerate(vals)]
        return {"data": "d", "ipc": 1, "preset": preset, "seeds": list(range(len(vals))), "per_seed": per_seed,
                "config": {"epochs": 1000}, "distilled_config": {"beta": 1}, "teacher": f"{teacher}.safetensors",
                "val_mean": sum(vals) / len(vals), "test_mean": sum(vals) / len(vals)}

    records = [rec("random", [60.0, 61.0, 62.0]), rec("cidd", [62.0, 63.0, 64.0]), rec("nrrdd-lr", [66.0])]
    row = headline.chosen(headline.with_settings(records)).splitlines()[2]
    assert "| +2.00 / +2.00 (cidd) |" in row and "66.0 (1 seed)" in row
    records[2] = rec("nrrdd-lr", [66.0, 66.0, 66.0])  # confirmed on 3 seeds, it outranks cidd
    assert "(nrrdd-lr) |" in headline.chosen(headline.with_settings(records)).splitlines()[2]
    # another teacher's rows are set against the random row of that teacher, not the usual one's
    records += [rec("random", [70.0] * 3, "ens"), rec("cidd", [71.0] * 3, "ens")]
    row = headline.chosen(headline.with_settings(records)).splitlines()[2]
    assert "teacher ens" in row and "| +1.00 / +1.00 (cidd) |" in row


def test_headline_replaces_only_the_readme_table_under_its_mark():
    sys.path.insert(0, str(HARNESS.parent))
    import headline
    text = "intro\n<!-- headline -->\n| a |\n|---|\n| old |\n\nafter | not a row\n"
    assert headline.into_readme(text, "| a |\n|---|\n| new |\n") == \
        "intro\n<!-- headline -->\n| a |\n|---|\n| new |\n\nafter | not a row\n"
    with pytest.raises(SystemExit):
        headline.into_readme("no mark\n", "| a |\n")


def test_the_random_baseline_is_random_real_images_of_the_same_draw():
    """Each synthesis seed's random images are the baseline of its own draw (the one of most seeds, whatever the
    order); a random set changed in anything else (here: refined) is never one."""
    sys.path.insert(0, str(HARNESS.parent))
    from screen_summary import random_rows

    def rec(seed, n, **synth):
        return {"preset": "random", "seeds": list(range(n)), "config": {"epochs": 1000},
                "distilled_config": {"init": "random", "refine": "none", "seed": seed, **synth}}
    own, draw, fewer, other = rec(0, 3), rec(1, 3), rec(0, 1), rec(0, 5, refine="masked")
    for rows in ([own, draw, fewer, other], [other, draw, fewer, own]):
        found = random_rows(rows)
        assert [found[k] for k in sorted(found, key=lambda k: k[1])] == [own, draw]


def test_gpu_data_parts_are_equal_cuts_that_join_back(tmp_path):
    """10 bytes in parts of at most 4: the fewest parts (3), cut as equal as bytes allow (4, 4, 2), and their
    concatenation is the file."""
    sys.path.insert(0, str(HARNESS.parent))
    from make_gpu_data import split_bytes
    src = tmp_path / "set.zip"
    src.write_bytes(bytes(range(10)))
    parts = split_bytes(src, 4)
    assert [p.name for p in parts] == ["set.zip.0", "set.zip.1", "set.zip.2"]
    assert [p.stat().st_size for p in parts] == [4, 4, 2]
    assert b"".join(p.read_bytes() for p in parts) == bytes(range(10))
    assert [p.stat().st_size for p in split_bytes(src, 5)] == [5, 5]
