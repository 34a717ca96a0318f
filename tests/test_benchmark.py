"""The CIFAR-10 benchmark script, end to end on the embedded digits with tiny budgets."""
import json
import os
import subprocess
import sys
from pathlib import Path


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cifar10_convnet.py"


def test_grid_then_more_seeds_then_summary(tmp_path, digits_teacher):
    results = tmp_path / "results" / "digits_bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_DATA": "digits", "BENCH_TEACHER": str(digits_teacher),
           "BENCH_RESULTS": str(results), "BENCH_WORK": str(tmp_path / "work"),
           "BENCH_SMOKE": json.dumps({"synth": {"iterations": 2, "pool_per_class": 10},
                                      "student": {"epochs": 2, "width": 16}})}

    def grid(seeds):
        r = subprocess.run([sys.executable, str(SCRIPT), "grid", "--ipc", "1", "--presets", "random", "nrrdd",
                            "--modes", "sl-online", "dbr", "--grid-seeds", str(seeds), "--device", "cpu"],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return {p.name: json.loads(p.read_text()) for p in (results / "cells").glob("*.json")}

    one = grid(1)
    assert sorted(one) == ["ipc1_nrrdd_dbr_convnet3.json", "ipc1_nrrdd_sl-online_convnet3.json",
                           "ipc1_random_sl-online_convnet3.json"]
    assert all(c["seeds"] == [0] and c["ipc"] == 1 for c in one.values())
    two = grid(2)  # extends every cell by seed 1, reusing seed 0
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
