"""`nrrdd export --format ddranking`: the tensors and folders DD-Ranking's compute_metrics loads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nrrdd import NrrddError
from nrrdd.cli import main
from nrrdd.config import preset_config
from nrrdd.distill import distill
from nrrdd.export import export
from nrrdd.files import verify_dir


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, digits, digits_teacher):
    out = tmp_path_factory.mktemp("export") / "d"
    distill(digits, digits_teacher, preset_config("random", {"ipc": 3}), out, preset="random", device="cpu",
            progress=False)
    return out


def test_ddranking_layout_round_trips_to_the_pngs(tmp_path, small_set):
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
    info = export(small_set, tmp_path / "x", mean=mean, std=std)
    images = torch.load(tmp_path / "x" / "images.pt", weights_only=True)
    labels = torch.load(tmp_path / "x" / "labels.pt", weights_only=True)
    n_classes = len(info["classes"])
    assert images.dtype == torch.float32 and images.shape == (3 * n_classes, 3, 32, 32)
    # DD-Ranking's own labelling of a tensor: block i of ipc images is class i
    assert torch.equal(labels, torch.arange(n_classes).repeat_interleave(3))
    folders = sorted(p.name for p in (tmp_path / "x" / "image_folder").iterdir())
    assert folders == [f"{i:05d}" for i in range(n_classes)]
    for k in (0, 4, 3 * n_classes - 1):  # the k-th tensor is the k-th PNG of the folder route, denormalised
        png = sorted((tmp_path / "x" / "image_folder" / f"{k // 3:05d}").iterdir())[k % 3]
        pixels = torch.from_numpy(np.array(Image.open(png).convert("RGB"))).permute(2, 0, 1).float() / 255
        assert torch.allclose(images[k] * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None],
                              pixels, atol=1e-6)
        assert json.loads((small_set / "distill.json").read_text())["images"][k].startswith(
            f"images/{info['classes'][k // 3]}/")
    assert info["ipc"] == 3 and verify_dir(tmp_path / "x") == []


def test_export_defaults_to_the_sets_normalisation_and_refuses_foreign_folders(tmp_path, small_set, capsys):
    record = json.loads((small_set / "distill.json").read_text())
    assert export(small_set, tmp_path / "x")["mean"] == record["mean"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["export", "--distilled", str(small_set), "--out", str(foreign), "--overwrite"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep"
    with pytest.raises(NrrddError, match="1 and 1 values for 3 channels"):
        export(small_set, tmp_path / "y", mean=[0.1], std=[1.0])
    assert not (tmp_path / "y").exists()


def test_uneven_classes_are_refused(tmp_path, small_set):
    import shutil
    plain = tmp_path / "plain"
    shutil.copytree(small_set / "images", plain)
    next(next(plain.iterdir()).iterdir()).unlink()
    with pytest.raises(NrrddError, match="different numbers of images"):
        export(plain, tmp_path / "x", mean=[0.5] * 3, std=[0.25] * 3, verify=False)
