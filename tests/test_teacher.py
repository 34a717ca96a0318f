"""Teacher training end to end on the embedded digits set: outputs, manifest, reload, exact resume."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import nrrdd.teacher as T
from nrrdd import NrrddError
from nrrdd.checkpoint import load_model
from nrrdd.config import TeacherConfig
from nrrdd.data import load_dataset
from nrrdd.files import verify_dir
from nrrdd.teacher import train_teacher
from nrrdd.training import TrainState, accuracy, one_cycle


def tiny(**kw) -> TeacherConfig:
    return TeacherConfig(**{"data": "digits", "width": 16, "epochs": 2, "batch_size": 128, **kw})


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", progress=False)


def _tensors(path):
    return load_file(str(path))


def _assert_same_weights(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"tensor {k} differs"


def test_train_teacher_outputs(tmp_path, digits):
    out = tmp_path / "teacher"
    r = train_teacher(tiny(), out, device="cpu", progress=False)  # loads digits itself
    names = {p.name for p in out.iterdir()}
    assert names == {"teacher.safetensors", "results.json", "manifest.json"}  # state.pt is cleaned up
    assert verify_dir(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "teacher" and set(manifest["files"]) == {"teacher.safetensors", "results.json"}

    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "teacher" and results["config"]["epochs"] == 2 and results["config"]["width"] == 16
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    assert all(math.isfinite(h["loss"]) for h in results["history"])
    assert results["test_acc"] == r["test_acc"] and results["val_acc"] == results["history"][-1]["val_acc"]
    assert results["data"]["sizes"] == {"train": len(digits.train), "val": len(digits.val), "test": len(digits.test)}
    assert 40 < results["test_acc"] <= 100  # it learned something (chance is 10%)

    model, meta = load_model(out / "teacher.safetensors", arch="convnet3", classes=digits.classes)
    assert meta["classes"] == [str(i) for i in range(10)] and meta["image_size"] == 32
    assert tuple(meta["mean"]) == digits.mean and tuple(meta["std"]) == digits.std
    assert meta["test_acc"] == results["test_acc"] and meta["recipe"] == results["config"]
    # the reloaded teacher scores exactly what results.json says, using only what the checkpoint records
    assert accuracy(model, digits.test, "cpu") == results["test_acc"]
    assert accuracy(model, digits.val, "cpu") == results["val_acc"]


def test_same_seed_same_teacher_other_seed_other_teacher(tmp_path, digits):
    cfg = tiny(epochs=1)
    train_teacher(cfg, tmp_path / "a", device="cpu", data=digits, progress=False)
    train_teacher(cfg, tmp_path / "b", device="cpu", data=digits, progress=False)
    _assert_same_weights(tmp_path / "a" / "teacher.safetensors", tmp_path / "b" / "teacher.safetensors")
    train_teacher(tiny(epochs=1, seed=1), tmp_path / "c", device="cpu", data=digits, progress=False)
    ta, tc = _tensors(tmp_path / "a" / "teacher.safetensors"), _tensors(tmp_path / "c" / "teacher.safetensors")
    assert not torch.equal(ta["classifier.weight"], tc["classifier.weight"])


def test_refuses_to_mix_runs(tmp_path, digits):
    out = tmp_path / "t"
    train_teacher(tiny(epochs=1), out, device="cpu", data=digits, progress=False)
    before = (out / "teacher.safetensors").read_bytes()
    with pytest.raises(NrrddError, match="--resume"):
        train_teacher(tiny(epochs=1), out, device="cpu", data=digits, progress=False)
    assert (out / "teacher.safetensors").read_bytes() == before


def test_resume_after_kill_is_bit_identical(tmp_path, digits, monkeypatch):
    """Kill a 2-epoch run right after its epoch-1 checkpoint, resume it: same weights as an uninterrupted run."""
    cfg = tiny()
    full = train_teacher(cfg, tmp_path / "full", device="cpu", data=digits, progress=False)

    real_save = TrainState.save

    def save_then_die(self, *a, **kw):
        real_save(self, *a, **kw)
        raise KeyboardInterrupt  # as if killed just after the checkpoint was written

    monkeypatch.setattr(TrainState, "save", save_then_die)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train_teacher(cfg, out, device="cpu", data=digits, progress=False)
    monkeypatch.setattr(TrainState, "save", real_save)
    assert (out / "state.pt").exists()
    assert not (out / "teacher.safetensors").exists() and not (out / "manifest.json").exists()
    assert verify_dir(out)  # an interrupted folder does not verify

    # count the training steps the resumed call takes: only epoch 2's
    steps = []
    real_aug = T.random_crop_flip
    monkeypatch.setattr(T, "random_crop_flip", lambda *a, **k: steps.append(1) or real_aug(*a, **k))
    resumed = train_teacher(cfg, out, device="cpu", data=digits, progress=False, resume=True)
    assert len(steps) == math.ceil(len(digits.train) / cfg.batch_size)

    _assert_same_weights(tmp_path / "full" / "teacher.safetensors", out / "teacher.safetensors")
    assert resumed["test_acc"] == full["test_acc"]
    for h_full, h_res in zip(full["history"], resumed["history"], strict=True):
        assert (h_full["epoch"], h_full["loss"], h_full["val_acc"]) == (h_res["epoch"], h_res["loss"], h_res["val_acc"])
    assert not (out / "state.pt").exists()
    assert verify_dir(out) == []


def test_resume_without_state_starts_afresh(tmp_path, digits):
    """--resume on an empty folder is a normal run."""
    a = train_teacher(tiny(epochs=1), tmp_path / "a", device="cpu", data=digits, progress=False, resume=True)
    assert [h["epoch"] for h in a["history"]] == [1]


def test_one_cycle_schedule():
    total, warm = 100, 0.1
    lrs = [one_cycle(s, total, warm) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert min(lrs) >= 0


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_imported_torchvision_teacher_computes_what_torchvision_computes(tmp_path, arch):
    """A randomly initialised torchvision model saved as a plain state dict, imported, loads back as a Net
    whose outputs equal torchvision's on the same inputs."""
    import torchvision

    from nrrdd.cli import main
    torch.manual_seed(0)
    ref = getattr(torchvision.models, arch)(weights=None, num_classes=4).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    (tmp_path / "classes.txt").write_text("ant\nbee\ncat\ndog\n")
    assert main(["import-teacher", "--arch", arch, "--weights", str(tmp_path / "w.pth"), "--classes",
                 str(tmp_path / "classes.txt"), "--image-size", "64", "--out", str(tmp_path / "t.safetensors")]) == 0
    net, meta = load_model(tmp_path / "t.safetensors", classes=["ant", "bee", "cat", "dog"])
    assert meta["image_size"] == 64 and meta["mean"] == [0.485, 0.456, 0.406]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x))


def test_import_teacher_refuses_code_and_misfits_in_one_line(tmp_path, capsys):
    import torchvision

    from nrrdd.cli import main
    classes = tmp_path / "data" / "train"
    for c in ("a", "b"):
        (classes / c).mkdir(parents=True)
    torch.save({"model": torchvision.models.resnet18(weights=None, num_classes=3).state_dict()}, tmp_path / "w3.pth")
    torch.save({"fn": print}, tmp_path / "code.pth")  # unpickling it would need arbitrary globals
    out = tmp_path / "t.safetensors"
    for weights, why in (("w3.pth", "does not fit a torchvision resnet18 with 2 classes"),
                         ("code.pth", "not a plain state dict"), ("absent.pth", "file not found")):
        assert main(["import-teacher", "--arch", "resnet18", "--weights", str(tmp_path / weights), "--classes",
                     str(tmp_path / "data"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    (tmp_path / "mine.safetensors").write_text("not a checkpoint")
    assert main(["import-teacher", "--arch", "resnet18", "--weights", str(tmp_path / "w3.pth"), "--classes",
                 str(tmp_path / "data"), "--out", str(tmp_path / "mine.safetensors"), "--overwrite"]) == 2
    assert (tmp_path / "mine.safetensors").read_text() == "not a checkpoint"


def test_a_folder_too_large_to_decode_is_streamed_and_trains_the_same_teacher(make_folder, tmp_path, monkeypatch):
    """Past NRRDD_DECODE_MB the training folder is listed and decoded batch by batch by a worker process (a
    zipped folder too: workers open their own archive); the teacher is the one the decoded folder trains."""
    import shutil

    import nrrdd.data
    root = make_folder(classes=("a", "b", "c"), n=6, size=16)
    shutil.make_archive(str(tmp_path / "z"), "zip", root.parent, root.name)
    monkeypatch.setattr(nrrdd.data, "decode_workers", lambda: 1)
    cfg = dict(width=8, epochs=2, batch_size=4, image_size=16, val_fraction=0.2)
    eager = train_teacher(tiny(data=str(root), **cfg), tmp_path / "eager", device="cpu", progress=False)
    monkeypatch.setenv("NRRDD_DECODE_MB", "0.001")  # 1 kB: every folder streams
    seen = []
    real = nrrdd.data.image_batches
    monkeypatch.setattr(T, "image_batches", lambda images, *a: seen.append(type(images).__name__) or real(images, *a))
    for name, data in (("stream", str(root)), ("zip", f"{tmp_path / 'z.zip'}/{root.name}")):
        r = train_teacher(tiny(data=data, **cfg), tmp_path / name, device="cpu", progress=False)
        assert r["history"] == [{**h, "time_s": r["history"][i]["time_s"]} for i, h in enumerate(eager["history"])]
        _assert_same_weights(tmp_path / "eager" / "teacher.safetensors", tmp_path / name / "teacher.safetensors")
    assert set(seen) == {"LazyImages"}
