"""`nrrdd report` and the pictures: what a reader sees for one seed, one IPC, and an unrefined preset."""
from __future__ import annotations

import shutil
import subprocess

import matplotlib.axes
import matplotlib.figure
import pytest
import torch

from nrrdd.report import accuracy_plot, label_robust_score, markdown_table
from nrrdd.runtime import git_state
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


def test_label_robust_score_hand_value():
    # a = (5 - 45) / 200 = -0.2: (e^-0.2 - e^-1) / (e - e^-1) = 0.450852 / 2.350402
    assert label_robust_score(5.0, 45.0) == 19.18
    assert label_robust_score(0.0, 100.0 * 2) == 0.0  # a = -1: the floor
    assert label_robust_score(100.0, -100.0) == 100.0  # a = 1: the ceiling


def test_table_shows_ior_hlr_and_lrs():
    same = {"teacher": "t.safetensors", "teacher_arch": "convnet3", "teacher_test_acc": 85.0}
    rand = {**_result("random", 10, [53.0]), **same, "inputs": {"images_sha256": "r"}}
    cidd = {**_result("cidd", 10, [58.0]), **same, "inputs": {"images_sha256": "c"}}
    hard = {**_result("cidd", 10, [40.0]), **same, "inputs": {"images_sha256": "c"},
            "config": {"student": "convnet3", "label_mode": "onehot"}}
    own = {**_result("nrrdd", 10, [57.0]), **same, "ior": {"test": 3.0, "val": 2.0}, "inputs": {"images_sha256": "n"}}
    other_recipe = {**_result("rded", 10, [60.0]), **same,
                    "config": {"student": "convnet3", "label_mode": "sl-online", "epochs": 1000}}
    rows = {ln.split(" | ")[2] + "/" + ln.split(" | ")[3]: ln.split(" | ") for ln in
            markdown_table([rand, cidd, hard, own, other_recipe]).splitlines() if ln.startswith("| cifar10")}
    ior, hlr, lrs = 9, 10, 11  # column positions
    assert rows["cidd/sl-online"][ior] == "+5.00ʳ"  # against the random row of the same recipe
    assert rows["cidd/sl-online"][hlr] == "45.00"  # 85 full-data (teacher) - 40 one-hot on the same images
    assert rows["cidd/sl-online"][lrs] == "19.18"
    assert rows["nrrdd/sl-online"][ior] == "+3.00" and rows["nrrdd/sl-online"][hlr] == "-"  # its own baseline
    assert rows["rded/sl-online"][ior] == "-"  # 1,000 epochs: no random row trained so
    assert rows["random/sl-online"][ior] == "-"


def test_bars_carry_the_ior(tmp_path, monkeypatch):
    texts = []
    real_text = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda self, x, y, s, **k: texts.append(s) or
                        real_text(self, x, y, s, **k))
    accuracy_plot([_result("random", 10, [50.0]), _result("cidd", 10, [56.5])], tmp_path / "p.png")
    assert sorted(texts) == ["50.0", "56.5\nIOR +6.5"]


def test_provenance_finds_the_commit_of_a_run_from_a_source_copy(tmp_path, monkeypatch):
    """A package outside any repository (a copy kept apart from edits) records the working directory's HEAD
    and whether its tracked files differ; outside any repository, none."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo, copy = tmp_path / "repo", tmp_path / "copy"
    repo.mkdir(), copy.mkdir()
    monkeypatch.chdir(copy)
    assert git_state(copy) == (None, None)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / "f").write_text("a")
    subprocess.run(git + ["add", "f"], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.chdir(repo)
    assert git_state(copy) == (head, False)
    (repo / "f").write_text("b")
    assert git_state(copy) == (head, True)
