"""`nrrdd report` and the pictures: what a reader sees for one seed, one IPC, and an unrefined preset."""
from __future__ import annotations

import matplotlib.axes
import matplotlib.figure
import torch

from nrrdd.report import accuracy_plot, markdown_table
from nrrdd.viz import refinement_panel


def _result(preset: str, ipc: int, seeds: list[float]) -> dict:
    n = len(seeds)
    mean = sum(seeds) / n
    return {"kind": "evaluation", "data": "cifar10", "preset": preset, "ipc": ipc, "seeds": list(range(n)),
            "config": {"student": "convnet3", "label_mode": "sl-online"}, "test_mean": mean, "test_std": 0.0,
            "val_mean": mean, "val_std": 0.0, "wall_time_s": 1.0, "_source": f"runs/{preset}/results.json",
            "per_seed": [{"seed": i, "test_acc": v} for i, v in enumerate(seeds)]}


def test_table_says_one_seed_and_names_the_source():
    table = markdown_table([_result("rded", 10, [57.9]), {**_result("random", 10, [53.0, 54.0]), "test_std": 0.71}])
    assert "57.90 (1 seed)" in table and "57.90 ± 0.00" not in table and "53.50 ± 0.71" in table
    assert "runs/rded/results.json" in table and "runs/random/results.json" in table


def test_one_ipc_is_drawn_as_bars_from_zero_with_seed_dots(tmp_path, monkeypatch):
    bars, limits = [], []
    real_bar, real_save = matplotlib.axes.Axes.bar, matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, *a, **k: bars.append(a) or real_bar(self, *a, **k))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: limits.append(self.axes[0].get_ylim()) or real_save(self, *a, **k))
    accuracy_plot([_result(p, 10, [50.0 + i, 51.0 + i]) for i, p in enumerate(("random", "rded", "nrrdd"))],
                  tmp_path / "p.png")
    assert len(bars) == 3 and limits[0][0] == 0 and (tmp_path / "p.png").stat().st_size > 0
    bars.clear()
    accuracy_plot([_result("rded", 1, [20.0]), _result("rded", 10, [57.0])], tmp_path / "q.png")
    assert bars == []  # several IPCs: lines against IPC


def test_refinement_panel_scales_the_difference_or_says_no_refinement(tmp_path, monkeypatch):
    texts, titles = [], []
    real_text, real_title = matplotlib.axes.Axes.text, matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda self, x, y, s, *a, **k: texts.append(s) or
                        real_text(self, x, y, s, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, s, *a, **k: titles.append(s) or
                        real_title(self, s, *a, **k))
    before = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    cam, mask = torch.rand(2, 8, 8), torch.ones(2, 8, 8)
    refinement_panel(tmp_path / "same.png", before, before.clone(), cam, mask, ["a", "b"])
    assert texts.count("no refinement") == 2 and "no refinement" in titles
    texts.clear(), titles.clear()
    after = before.clone()
    after[0, :, 0, 0] = 3  # a change of 3/255: a fixed gain would leave it near black
    refinement_panel(tmp_path / "changed.png", before, after, cam, mask, ["a", "b"])
    assert "|diff|, max 3/255" in titles and "no refinement" not in texts
