"""Safetensors checkpoints (no pickles, ever) and crash-safe output folders (atomic writes, manifests)."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from nrrdd import NrrddError
from nrrdd.checkpoint import load_model, read_meta, save_model
from nrrdd.files import _UMASK, atomic_path, read_json, verify_dir, write_bytes, write_json, write_manifest
from nrrdd.models import create_model


CLASSES = ["cat", "dog", "emu"]


def _meta(**extra):
    return {"arch": "convnet3", "classes": CLASSES, "image_size": 32, "channels": 3,
            "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25], "model_kwargs": {"width": 8, "norm": "batch"}, **extra}


def _trained_model():
    torch.manual_seed(0)
    m = create_model("convnet3", 3, 32, width=8)
    with torch.no_grad():  # non-default BN buffers must survive the round trip too
        m.train()
        m(torch.randn(16, 3, 32, 32))
    return m.eval()


# ---------------------------------------------------------------- checkpoints

def test_round_trip_same_outputs_and_meta(tmp_path):
    m = _trained_model()
    path = tmp_path / "t.safetensors"
    save_model(path, m, _meta(test_acc=91.5, recipe={"lr": 0.1}))
    loaded, meta = load_model(path, arch="convnet3", classes=CLASSES)
    assert not loaded.training
    assert meta == _meta(test_acc=91.5, recipe={"lr": 0.1})
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    sd, lsd = m.state_dict(), loaded.state_dict()
    assert sd.keys() == lsd.keys() and all(torch.equal(sd[k], lsd[k]) for k in sd)
    assert read_meta(path) == meta
    assert not list(tmp_path.glob(".*.tmp"))


def test_round_trip_without_optional_args(tmp_path):
    m = _trained_model()
    save_model(tmp_path / "t.safetensors", m, _meta())
    loaded, _ = load_model(tmp_path / "t.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))


def test_save_requires_metadata(tmp_path):
    meta = _meta()
    del meta["std"]
    with pytest.raises(ValueError, match="std"):
        save_model(tmp_path / "t.safetensors", _trained_model(), meta)
    assert not (tmp_path / "t.safetensors").exists()


def test_wrong_arch_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_model(path, _trained_model(), _meta())
    with pytest.raises(NrrddError) as e:
        load_model(path, arch="resnet18")
    msg = str(e.value)
    assert str(path) in msg and "convnet3" in msg and "resnet18" in msg


def test_wrong_classes_are_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_model(path, _trained_model(), _meta())
    for classes in (["cat", "dog"], ["dog", "cat", "emu"], ["cat", "dog", "emu", "fox"]):
        with pytest.raises(NrrddError) as e:
            load_model(path, classes=classes)
        msg = str(e.value)
        assert str(path) in msg and "classes" in msg and "cat" in msg and "match" in msg


def test_weights_of_another_shape_are_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_model(path, _trained_model(), _meta(model_kwargs={"width": 16, "norm": "batch"}))  # meta lies about width
    with pytest.raises(NrrddError, match="do not fit"):
        load_model(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(NrrddError, match="not found") as e:
        load_model(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(e.value)


def test_safetensors_without_nrrdd_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(NrrddError, match="without nrrdd metadata"):
        load_model(path)


def test_torch_pickle_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(_trained_model().state_dict(), path)
    with pytest.raises(NrrddError) as e:
        load_model(path)
    assert str(path) in str(e.value) and "not a safetensors checkpoint" in str(e.value)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_malicious_pickle_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    payload = {"w": _Evil(marker)}
    if how == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    # sanity: the payload really would run if unpickled (done on a copy, then the marker is removed)
    pickle.loads(pickle.dumps(_Evil(tmp_path / "control")))
    assert (tmp_path / "control").exists()
    for fn in (load_model, read_meta):
        with pytest.raises(NrrddError, match="not a safetensors checkpoint"):
            fn(path)
    assert not marker.exists()


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_model(path, _trained_model(), _meta())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NrrddError):
        load_model(path)


# ---------------------------------------------------------------- atomic writes

def test_atomic_path_success_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_atomic_path_gives_files_the_umask_mode_not_0600(tmp_path):
    """Outputs must be as readable as any file the user creates (0644 under the usual umask 022)."""
    with atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"x")
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o666 & ~_UMASK


def test_atomic_path_failure_keeps_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half-written")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "fresh.bin") as tmp:
            tmp.write_bytes(b"x")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_path_disk_full_becomes_nrrdd_error(tmp_path):
    with pytest.raises(NrrddError, match="disk full"):
        with atomic_path(tmp_path / "big.bin"):
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_write_json_round_trip(tmp_path):
    import numpy as np
    write_json(tmp_path / "r.json", {"a": np.int64(3), "b": np.float32(0.5), "t": torch.tensor([1, 2]),
                                     "p": tmp_path})
    assert read_json(tmp_path / "r.json") == {"a": 3, "b": 0.5, "t": [1, 2], "p": str(tmp_path)}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(NrrddError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(NrrddError, match="not found"):
        read_json(tmp_path / "missing.json")


# ---------------------------------------------------------------- manifests

def _filled(out):
    out.mkdir()
    write_bytes(out / "a.bin", b"aaa")
    (out / "sub").mkdir()
    write_bytes(out / "sub" / "b.txt", b"bbb")
    return write_manifest(out, {"kind": "test"})


def test_manifest_clean(tmp_path):
    out = tmp_path / "out"
    man = _filled(out)
    assert man["kind"] == "test" and set(man["files"]) == {"a.bin", "sub/b.txt"}
    assert read_json(out / "manifest.json") == man
    assert verify_dir(out) == []


def test_verify_detects_missing_extra_changed(tmp_path):
    out = tmp_path / "out"
    _filled(out)
    (out / "a.bin").unlink()
    assert verify_dir(out) == ["missing: a.bin"]
    write_bytes(out / "a.bin", b"aaa")
    write_bytes(out / "sub" / "c.txt", b"ccc")
    assert verify_dir(out) == ["extra: sub/c.txt"]
    (out / "sub" / "c.txt").unlink()
    write_bytes(out / "sub" / "b.txt", b"bbX")  # same size, other bytes
    assert verify_dir(out) == ["changed: sub/b.txt"]
    (out / "a.bin").unlink()
    write_bytes(out / "new.bin", b"n")
    problems = verify_dir(out)
    assert sorted(problems) == ["changed: sub/b.txt", "extra: new.bin", "missing: a.bin"]


def test_verify_without_manifest(tmp_path):
    (tmp_path / "x").mkdir()
    problems = verify_dir(tmp_path / "x")
    assert len(problems) == 1 and "manifest.json" in problems[0]


def test_train_state_adds_the_resumed_runs_seconds(tmp_path, monkeypatch):
    """A run saved after 30 s of training and resumed for 5 s more reports 35 s, not 5."""
    from nrrdd import training
    clock = iter([100.0, 130.0, 500.0, 500.0, 505.0])  # first: start, save; second: start, load, report
    monkeypatch.setattr(training.time, "time", lambda: next(clock))
    model = torch.nn.Linear(2, 2)
    opt, gen = torch.optim.SGD(model.parameters(), lr=0.1), torch.Generator().manual_seed(0)
    training.TrainState(tmp_path / "s.pt").save(model, opt, gen, epoch=1)
    resumed = training.TrainState(tmp_path / "s.pt")
    assert resumed.load(model, opt, gen) == {"epoch": 1}  # the seconds are the state's own, not a counter
    assert resumed.elapsed() == pytest.approx(35.0)
