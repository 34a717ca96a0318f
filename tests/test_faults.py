"""Fault injection: SIGKILL at any point then --resume gives bit-identical outputs; a full disk never leaves a
partial file; a folder holding another run is refused; verify finds missing/extra/changed files; a
non-finite loss stops with the step named and the last checkpoint intact; bad inputs give one clear line;
label files and training states never unpickle code.

The kill/resume helpers (commands, markers, SIGKILL, digests) live in benchmarks/kill_resume.py, which runs
the same check at three kill points per command and records it in benchmarks/results/kill_resume.json."""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import nrrdd.checkpoint
import nrrdd.evaluate
import nrrdd.outdir
import nrrdd.refine
import nrrdd.relabel
import nrrdd.teacher
from nrrdd import NrrddError
from nrrdd.checkpoint import load_model, save_model
from nrrdd.cli import build_parser, main
from nrrdd.config import TeacherConfig, build_config, to_dict
from nrrdd.files import load_tensors, save_tensors, verify_dir, write_json
from nrrdd.models import create_model
from nrrdd.outdir import RUN_FILE
from nrrdd.training import TrainState, param_groups
from nrrdd.viz import save_png


_spec = importlib.util.spec_from_file_location(
    "kill_resume", Path(__file__).resolve().parents[1] / "benchmarks" / "kill_resume.py")
KR = sys.modules.setdefault("kill_resume", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(KR)
Marker = KR.Marker

# Two kill points per command, one after the other: killed at the first marker, resumed and killed again at
# the second (a new version since that resume), resumed to the end.
CHAINS = {
    "train-teacher": [Marker("state.pt"), Marker("state.pt", 2)],  # after epoch 1, then after epoch 3
    "distill": [Marker(".work/init.safetensors"), Marker(".work/refined_00002.safetensors")],
    "evaluate": [Marker("seeds/.state_0.pt"), Marker("seeds/.state_1.pt")],  # seed 0 epoch 2, seed 1 epoch 2
}


def argv(name: str, out, **inputs) -> list[str]:
    """The benchmark's command line without `python -m nrrdd`, for the in-process entry point."""
    return KR.command(name, out, **inputs)[3:]


def one_error_line(capsys, cmd: str) -> str:
    """stderr must be exactly one line `nrrdd <cmd>: error: ...`, no traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"nrrdd {cmd}: error: "), err
    return lines[0]


class _Evil:
    """A pickle whose loading would create the folder `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _write_evil(path: Path, marker: Path, how: str) -> None:
    payload = {"x": _Evil(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Uninterrupted runs of train-teacher -> distill -> evaluate through the CLI entry point, in this process."""
    root = tmp_path_factory.mktemp("faults")
    r = types.SimpleNamespace(root=root, env=KR.cli_env(root / "cache"), teacher_dir=root / "teacher",
                              distilled=root / "distilled", evaluation=root / "evaluation")
    r.teacher = r.teacher_dir / "teacher.safetensors"
    r.inputs = {"train-teacher": {}, "distill": {"teacher": r.teacher}, "evaluate": {"distilled": r.distilled}}
    r.out = {"train-teacher": r.teacher_dir, "distill": r.distilled, "evaluate": r.evaluation}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NRRDD_CACHE", str(root / "cache"))
        for name in ("train-teacher", "distill", "evaluate"):
            assert main(argv(name, r.out[name], **r.inputs[name])) == 0
    return r


@pytest.fixture(scope="module")
def chains(refs):
    """Each command as a real sub-process killed with SIGKILL at its first marker, resumed as a sub-process and
    killed again at the second, then resumed to the end (in this process, to spare a third start of torch).
    The sub-processes of the three commands run side by side."""
    def killed_twice(name):
        out = refs.root / f"killed-{name}"
        return out, [KR.kill_at(KR.command(name, out, resume=i > 0, **refs.inputs[name]), refs.env, out, m)
                     for i, m in enumerate(CHAINS[name])]
    with ThreadPoolExecutor(len(CHAINS)) as pool:
        done = dict(zip(CHAINS, pool.map(killed_twice, CHAINS)))
    with pytest.MonkeyPatch.context() as mp:  # one after the other: the runs set torch's global RNG
        mp.setenv("NRRDD_CACHE", str(refs.root / "cache"))
        for name, (out, _) in done.items():
            assert main(argv(name, out, **refs.inputs[name]) + ["--resume"]) == 0
    return done


# ---------------------------------------------------------------- SIGKILL + --resume

@pytest.mark.parametrize("name", list(CHAINS))
def test_sigkill_then_resume_is_bit_identical(name, refs, chains):
    out, kills = chains[name]
    # the first marker leaves most of the run to do: that kill always lands (later ones may race the end)
    assert kills[0]["marker_seen"] and kills[0]["killed"], kills
    assert KR.OUTPUT[name](out) == KR.OUTPUT[name](refs.out[name])
    assert verify_dir(out) == []
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or p.name == "state.pt"]
    assert leftovers == []  # no work folder, checkpoint or temp file stays behind


def test_reference_outputs_are_complete(refs):
    assert len(KR.distilled_files(refs.distilled)) == 20 + 2 + 1  # images, two pictures, synthetic.safetensors
    assert [r["seed"] for r in KR.evaluation_values(refs.evaluation)] == [0, 1]
    for d in refs.out.values():
        assert verify_dir(d) == []


# ---------------------------------------------------------------- atomic writes under a full disk

def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_then_enospc(path_arg: int):
    """A writer that puts a few bytes into its target (the temporary file) and then finds the disk full."""
    def write(*a, **_k):
        Path(a[path_arg]).write_bytes(b"\x00partial")
        _enospc()
    return write


def _model(width=8):
    torch.manual_seed(0)
    return create_model("convnet3", 3, 32, width=width).eval()


META = {"arch": "convnet3", "classes": ["a", "b", "c"], "image_size": 32, "channels": 3, "mean": [0.5] * 3,
        "std": [0.25] * 3, "model_kwargs": {"width": 8, "norm": "batch"}}


def _state(path):
    m = _model()
    opt = torch.optim.SGD(param_groups(m, 0.0), lr=0.1)
    return TrainState(path), m, opt


# name: (write the file once, patch that makes the next write hit a full disk, write it again, read it back)
DISK_FULL = {
    "write_json": (lambda p: write_json(p, {"v": 1}), lambda mp: mp.setattr(os, "fsync", _enospc),
                   lambda p: write_json(p, {"v": 2}), lambda p: json.loads(p.read_text())),
    "save_model": (lambda p: save_model(p, _model(), META),
                   lambda mp: mp.setattr(nrrdd.checkpoint, "save_file", _half_then_enospc(1)),
                   lambda p: save_model(p, _model(), {**META, "test_acc": 1.0}),
                   lambda p: load_model(p)[1]),
    "TrainState.save": (lambda p: (lambda s, m, o: s.save(m, o, torch.Generator(), epoch=1))(*_state(p)),
                        lambda mp: mp.setattr(torch, "save", _half_then_enospc(1)),
                        lambda p: (lambda s, m, o: s.save(m, o, torch.Generator(), epoch=2))(*_state(p)),
                        lambda p: (lambda s, m, o: s.load(m, o, torch.Generator()))(*_state(p))),
    "save_tensors": (lambda p: save_tensors(p, {"d": torch.ones(3)}),
                     lambda mp: mp.setattr(safetensors.torch, "save_file", _half_then_enospc(1)),
                     lambda p: save_tensors(p, {"d": torch.zeros(3)}), lambda p: load_tensors(p)["d"].tolist()),
    "save_png": (lambda p: save_png(p, torch.zeros(3, 4, 4, dtype=torch.uint8)),
                 lambda mp: mp.setattr(Image.Image, "save", _half_then_enospc(1)),
                 lambda p: save_png(p, torch.full((3, 4, 4), 255, dtype=torch.uint8)),
                 lambda p: Image.open(p).getpixel((0, 0))),
}


@pytest.mark.parametrize("writer", list(DISK_FULL))
def test_disk_full_keeps_the_previous_file_and_no_temp(writer, tmp_path, monkeypatch):
    first, fill_disk, second, read = DISK_FULL[writer]
    path = tmp_path / "out" / "file.bin"
    first(path)
    before, content = path.read_bytes(), read(path)
    with monkeypatch.context() as mp:
        fill_disk(mp)
        with pytest.raises(NrrddError, match="disk full") as e:
            second(path)
    assert str(path) in str(e.value) and "--resume" in str(e.value)
    assert path.read_bytes() == before and read(path) == content  # the old file, whole and readable
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]  # no temporary file left behind


# ---------------------------------------------------------------- a folder holding another run

@pytest.mark.parametrize("name", list(CHAINS))
def test_folder_with_another_run_is_refused_and_kept(name, refs, tmp_path, capsys):
    out = tmp_path / "used"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("someone's run")
    (out / "sub" / "state.pt").write_bytes(b"\x01\x02")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(argv(name, out, **refs.inputs[name])) == 2
    line = one_error_line(capsys, name)
    assert str(out) in line and "--resume" in line and "--overwrite" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- nrrdd verify

def test_verify_exit_codes_on_a_distilled_folder(refs, tmp_path, capsys):
    d = tmp_path / "d"
    shutil.copytree(refs.distilled, d)
    assert main(["verify", str(d)]) == 0
    assert f"{d}: OK" in capsys.readouterr().out
    png = d / "images" / "3" / "0001.png"
    original = png.read_bytes()

    data = bytearray(original)
    data[len(data) // 2] ^= 0x01  # one bit of one byte
    png.write_bytes(bytes(data))
    assert main(["verify", str(d)]) == 1
    assert "changed: images/3/0001.png" in capsys.readouterr().out
    png.write_bytes(original)

    png.unlink()
    assert main(["verify", str(d)]) == 1
    assert "missing: images/3/0001.png" in capsys.readouterr().out
    png.write_bytes(original)

    (d / "images" / "3" / "0002.png").write_bytes(original)
    assert main(["verify", str(d)]) == 1
    out = capsys.readouterr().out
    assert "extra: images/3/0002.png" in out and "1 problem(s)" in out
    (d / "images" / "3" / "0002.png").unlink()
    assert main(["verify", str(d)]) == 0


# ---------------------------------------------------------------- non-finite losses

def _poison_after_first_save(monkeypatch) -> list:
    """Return a flag list that becomes non-empty once the first checkpoint has been written."""
    saved: list = []
    real = TrainState.save

    def save(self, *a, **k):
        real(self, *a, **k)
        saved.append(1)
    monkeypatch.setattr(TrainState, "save", save)
    return saved


def test_nan_in_teacher_training_names_the_epoch_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    saved = _poison_after_first_save(monkeypatch)
    nan_after_save = types.SimpleNamespace(
        cross_entropy=lambda *a, **k: F.cross_entropy(*a, **k) * (float("nan") if saved else 1.0))
    monkeypatch.setattr(nrrdd.teacher, "F", nan_after_save)
    out = tmp_path / "t"
    assert main(["train-teacher", "--data", "digits", "--width", "8", "--epochs", "3", "--batch-size", "256",
                 "--device", "cpu", "--quiet", "--out", str(out)]) == 2
    line = one_error_line(capsys, "train-teacher")
    assert "non-finite loss" in line and "teacher epoch 2" in line and "--resume" in line
    assert not (out / "teacher.safetensors").exists() and not (out / "manifest.json").exists()
    model = create_model("convnet3", 10, 32, 3, width=8, norm="batch")
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.08, momentum=0.9, nesterov=True)
    counters = TrainState(out / "state.pt").load(model, opt, torch.Generator())
    assert counters["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_nan_in_refinement_names_the_step_and_keeps_finished_batches(refs, tmp_path, monkeypatch, capsys):
    calls = []
    real = nrrdd.refine.bn_stat_loss

    def nan_in_second_batch(*a, **k):  # one call per step (alpha_bn > 0), 5 per batch: call 8 = batch 1 step 3
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) >= 8 else 1.0)
    monkeypatch.setattr(nrrdd.refine, "bn_stat_loss", nan_in_second_batch)
    out = tmp_path / "d"
    assert main(["distill", "--data", "digits", "--teacher", str(refs.teacher), "--ipc", "2", "--iterations", "5",
                 "--refine-batch", "10", "--alpha-bn", "0.01", "--device", "cpu", "--quiet", "--out", str(out)]) == 2
    line = one_error_line(capsys, "distill")
    assert "non-finite loss" in line and "refinement step 3" in line
    done = load_file(str(out / ".work" / "refined_00000.safetensors"))["x"]
    assert done.shape == (10, 3, 32, 32) and torch.isfinite(done).all()
    assert not (out / ".work" / "refined_00001.safetensors").exists() and not (out / "manifest.json").exists()


def test_nan_in_student_training_names_seed_and_epoch(refs, tmp_path, monkeypatch, capsys):
    saved = _poison_after_first_save(monkeypatch)
    real = nrrdd.evaluate.student_loss
    monkeypatch.setattr(nrrdd.evaluate, "student_loss",
                        lambda *a, **k: real(*a, **k) * (float("nan") if saved else 1.0))
    out = tmp_path / "e"
    assert main(["evaluate", "--distilled", str(refs.distilled), "--epochs", "4", "--seeds", "1", "--width", "8",
                 "--checkpoint-every", "2", "--device", "cpu", "--quiet", "--out", str(out)]) == 2
    line = one_error_line(capsys, "evaluate")
    assert "non-finite loss" in line and "student seed 0 epoch 4" in line
    state = torch.load(out / "seeds" / ".state_0.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "seeds" / "seed_0.json").exists()


# ---------------------------------------------------------------- bad inputs: one clear line, exit 2

def test_unknown_model_names_list_the_valid_ones(refs, tmp_path, capsys):
    assert main(["train-teacher", "--data", "digits", "--arch", "resnet19", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "t")]) == 2
    line = one_error_line(capsys, "train-teacher")
    assert "resnet19" in line and all(m in line for m in ("convnet3", "resnet18", "mobilenet_v2"))
    assert main(["evaluate", "--distilled", str(refs.distilled), "--student", "convnet9", "--epochs", "1",
                 "--seeds", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / "e")]) == 2
    line = one_error_line(capsys, "evaluate")
    assert "convnet9" in line and "convnet3" in line and "resnet18" in line


def test_teacher_with_another_class_count_is_refused_by_distill(tmp_path, capsys):
    five = tmp_path / "five.safetensors"
    torch.manual_seed(0)
    save_model(five, create_model("convnet3", 5, 32, width=8), {**META, "classes": list("01234")})
    assert main(["distill", "--data", "digits", "--teacher", str(five), "--ipc", "1", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "d")]) == 2
    line = one_error_line(capsys, "distill")
    assert str(five) in line and "(5)" in line and "(10)" in line and "classes" in line


def test_labels_of_another_distilled_set_are_refused(refs, tmp_path, capsys):
    other, labels = tmp_path / "other", tmp_path / "labels"
    assert main(["distill", "--data", "digits", "--teacher", str(refs.teacher), "--preset", "random", "--ipc", "2",
                 "--device", "cpu", "--quiet", "--out", str(other)]) == 0
    recipe = ["--label-mode", "dbr", "--epochs", "2", "--device", "cpu", "--quiet"]
    assert main(["relabel", "--distilled", str(other), "--teacher", str(refs.teacher), *recipe,
                 "--out", str(labels)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--distilled", str(refs.distilled), "--labels", str(labels), "--seeds", "1", *recipe,
                 "--width", "8", "--out", str(tmp_path / "e")]) == 2
    line = one_error_line(capsys, "evaluate")
    assert "labels_dbr.safetensors" in line and "other images" in line


def test_ipc_larger_than_available_via_cli(refs, tmp_path, capsys):
    assert main(["distill", "--data", "digits", "--teacher", str(refs.teacher), "--preset", "random", "--ipc", "500",
                 "--device", "cpu", "--quiet", "--out", str(tmp_path / "d")]) == 2
    line = one_error_line(capsys, "distill")
    assert "ipc" in line and "500" in line and "training images" in line


def test_resume_with_another_teacher_recipe_is_refused(refs, tmp_path, capsys, monkeypatch):
    # finished folder: --resume must not hand back a teacher trained with another recipe
    assert main(argv("train-teacher", refs.teacher_dir) + ["--epochs", "5", "--resume"]) == 2
    line = one_error_line(capsys, "train-teacher")
    assert str(refs.teacher_dir) in line and "--overwrite" in line
    # unfinished folder (killed after epoch 1): resuming with other settings would mix two runs
    real = TrainState.save

    def save_then_die(self, *a, **k):
        real(self, *a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(TrainState, "save", save_then_die)
    out = tmp_path / "t"
    tiny = ["train-teacher", "--data", "digits", "--width", "8", "--batch-size", "256", "--device", "cpu", "--quiet",
            "--out", str(out)]
    assert main(tiny + ["--epochs", "2"]) == 130
    monkeypatch.setattr(TrainState, "save", real)
    capsys.readouterr()
    state = (out / "state.pt").read_bytes()
    assert main(tiny + ["--epochs", "3", "--resume"]) == 2
    line = one_error_line(capsys, "train-teacher")
    assert str(out) in line and "--overwrite" in line
    assert (out / "state.pt").read_bytes() == state


# ---------------------------------------------------------------- files that would run code if unpickled

@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_malicious_label_file_and_training_state_never_run(how, tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Evil(tmp_path / "control")))  # the payload is live when unpickled
    assert (tmp_path / "control").is_dir()

    label_file = tmp_path / "labels_dbr.safetensors"
    _write_evil(label_file, marker, how)
    with pytest.raises(NrrddError, match="not a readable safetensors file") as e:
        load_tensors(label_file)
    assert str(label_file) in str(e.value)

    state_file = tmp_path / "state.pt"
    _write_evil(state_file, marker, how)
    with pytest.raises(Exception):  # what TrainState.load relies on: no code runs at all
        torch.load(state_file, map_location="cpu", weights_only=True)
    state, model, opt = _state(state_file)
    with pytest.raises(NrrddError, match="not a readable training state") as e:
        state.load(model, opt, torch.Generator())
    assert str(state_file) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_bad_inputs_as_a_user_sees_them(refs, tmp_path, capsys):
    """A resumed train-teacher whose state.pt is a malicious pickle, as a real process (stderr exactly as a user
    sees it, warnings included); meanwhile, in this process, evaluate --labels with a malicious label file and
    an unknown preset."""
    marker = tmp_path / "pwned"
    teacher = tmp_path / "t"
    teacher.mkdir()
    _write_evil(teacher / "state.pt", marker, "pickle")
    # an unfinished run of this very command, so --resume goes on to read the state
    args = build_parser().parse_args(KR.command("train-teacher", teacher, resume=True)[3:])
    write_json(teacher / RUN_FILE, {"command": "train-teacher", "settings": to_dict(build_config(TeacherConfig, args))})
    proc = subprocess.Popen(KR.command("train-teacher", teacher, resume=True), env=refs.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    labels = tmp_path / "labels"
    labels.mkdir()
    _write_evil(labels / "labels_dbr.safetensors", marker, "torch.save")
    assert main(["evaluate", "--distilled", str(refs.distilled), "--labels", str(labels), "--label-mode", "dbr",
                 "--epochs", "2", "--seeds", "1", "--width", "8", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "e")]) == 2
    line = one_error_line(capsys, "evaluate")
    assert str(labels / "labels_dbr.safetensors") in line and "not a readable safetensors file" in line

    assert main(["distill", "--data", "digits", "--teacher", str(refs.teacher), "--preset", "nrrd",
                 "--out", str(tmp_path / "d")]) == 2
    line = one_error_line(capsys, "distill")
    assert "unknown preset 'nrrd'" in line
    assert all(p in line for p in ("nrrdd", "nrrdd-lr", "cidd", "rded", "sre2l", "random"))
    assert not (tmp_path / "d").exists()

    assert main(["evaluate", "--distilled", str(refs.distilled), "--recipe", "rded-30", "--out",
                 str(tmp_path / "e2")]) == 2
    line = one_error_line(capsys, "evaluate")
    assert "unknown student recipe 'rded-30'" in line and "rded-300, rded-1000" in line
    assert not (tmp_path / "e2").exists()

    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nrrdd train-teacher: error: "), err
    assert str(teacher / "state.pt") in lines[0] and "not a readable training state" in lines[0]
    assert not marker.exists()


# ---------------------------------------------------------------- never lose a user's files (every case below
# failed before output folders were checked ahead of any write)

def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _distill_argv(refs, out, *extra) -> list[str]:
    return ["distill", "--data", "digits", "--teacher", str(refs.teacher), "--preset", "random", "--ipc", "1",
            "--device", "cpu", "--quiet", "--out", str(out), *extra]


def test_overwrite_with_a_bad_input_keeps_the_old_run(refs, tmp_path, capsys):
    out = tmp_path / "x"
    shutil.copytree(refs.distilled, out)
    before = _files(out)
    assert main(["distill", "--data", str(tmp_path / "typo"), "--teacher", str(refs.teacher), "--out", str(out),
                 "--overwrite", "--quiet", "--device", "cpu"]) == 2
    line = one_error_line(capsys, "distill")
    assert "typo" in line and "train/ and test/" in line
    assert _files(out) == before and verify_dir(out) == []


def test_overwrite_of_the_working_folder_is_refused(refs, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    shutil.copytree(refs.distilled, work)  # even an nrrdd run is not replaced when it is where the user stands
    before = _files(work)
    monkeypatch.chdir(work)
    assert main(_distill_argv(refs, ".", "--overwrite")) == 2
    assert "refusing to replace" in one_error_line(capsys, "distill")
    assert _files(work) == before


def test_overwrite_and_resume_never_touch_foreign_files(refs, tmp_path, capsys):
    out = tmp_path / "x"
    shutil.copytree(refs.distilled, out)
    (out / "thesis.txt").write_text("years of work")
    (out / "sub").mkdir()
    (out / "sub" / "data.csv").write_text("1,2")
    before = _files(out)
    for flag in ("--overwrite", "--resume"):
        assert main(_distill_argv(refs, out, flag)) == 2
        line = one_error_line(capsys, "distill")
        assert "thesis.txt" in line and "sub/data.csv" in line
    assert _files(out) == before
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for flag in ("--overwrite", "--resume"):
        assert main(_distill_argv(refs, user, flag)) == 2
        assert str(user) in one_error_line(capsys, "distill")
    assert (user / "notes.txt").read_text() == "mine" and len(list(user.iterdir())) == 1


def test_overwrite_replaces_an_nrrdd_run_completely(refs, tmp_path, capsys):
    out = tmp_path / "x"
    shutil.copytree(refs.distilled, out)  # an nrrdd preset with IPC 2, replaced by random IPC 1
    assert main(_distill_argv(refs, out, "--overwrite")) == 0
    assert json.loads((out / "distill.json").read_text())["ipc"] == 1 and verify_dir(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # the old run was not left aside


def test_resume_refuses_a_run_of_another_command(refs, tmp_path, capsys):
    out = tmp_path / "t"
    shutil.copytree(refs.teacher_dir, out)
    before = _files(out)
    assert main(_distill_argv(refs, out, "--resume")) == 2
    assert "nrrdd train-teacher" in one_error_line(capsys, "distill")
    assert _files(out) == before


@pytest.mark.parametrize("field,value,expected", [("refine_flip", "no", "true or false"),
                                                  ("ipc", "three", "a whole number"),
                                                  ("ipc", 3.7, "a whole number"),
                                                  ("init", "noize", "patches, noise, random"),
                                                  ("ipc", 0, "at least 1")])
def test_config_file_values_are_type_checked(field, value, expected, refs, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({field: value}))
    out = tmp_path / "d"
    argv = [a for a in _distill_argv(refs, out, "--config", str(cfg)) if a not in ("--ipc", "1")]  # flags win
    assert main(argv) == 2
    line = one_error_line(capsys, "distill")
    assert field in line and json.dumps(value) in line and expected in line
    assert not out.exists()


def test_a_changed_distilled_folder_is_refused_unless_no_verify(refs, tmp_path, capsys):
    d = tmp_path / "d"
    shutil.copytree(refs.distilled, d)
    f = d / "synthetic.safetensors"
    f.write_bytes(f.read_bytes()[:100])  # truncated
    student = ["--epochs", "1", "--seeds", "1", "--width", "8", "--device", "cpu", "--quiet"]
    for cmd, extra in (("evaluate", student), ("relabel", ["--label-mode", "dbr", "--epochs", "1", "--quiet"])):
        out = tmp_path / f"out-{cmd}"
        assert main([cmd, "--distilled", str(d), *extra, "--out", str(out)]) == 2
        line = one_error_line(capsys, cmd)
        assert "changed: synthetic.safetensors" in line and "nrrdd verify" in line and "--no-verify" in line
        assert not out.exists()
    assert main(["evaluate", "--distilled", str(d), *student, "--no-verify", "--out", str(tmp_path / "e")]) == 0


def test_report_verifies_results_folders(refs, tmp_path, capsys):
    ev = tmp_path / "ev"
    shutil.copytree(refs.evaluation, ev)
    r = json.loads((ev / "results.json").read_text())
    (ev / "results.json").write_text(json.dumps({**r, "test_mean": 99.0}))
    assert main(["report", str(ev), "--out", str(tmp_path / "r.md")]) == 2
    assert "changed: results.json" in one_error_line(capsys, "report")
    assert main(["report", str(ev), "--out", str(tmp_path / "r.md"), "--no-verify"]) == 0


@pytest.mark.skipif(os.access("/proc/sys", os.W_OK), reason="/proc/sys is writable here")
def test_read_only_destination_is_one_line(refs, tmp_path, capsys):
    assert main(_distill_argv(refs, "/proc/sys/nrrdd-out")) == 2
    assert "not writable" in one_error_line(capsys, "distill")
    assert main(["evaluate", "--distilled", str(refs.distilled), "--epochs", "1", "--seeds", "1", "--quiet",
                 "--out", "/proc/sys/nrrdd-out"]) == 2
    assert "not writable" in one_error_line(capsys, "evaluate")


def test_os_errors_while_writing_are_one_line(refs, tmp_path, monkeypatch, capsys):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "d" / "x"))
    monkeypatch.setattr(nrrdd.outdir.Path, "mkdir", denied)
    assert main(_distill_argv(refs, tmp_path / "d")) == 2
    line = one_error_line(capsys, "distill")
    assert "Permission denied" in line and str(tmp_path / "d") in line


def test_unknown_device_is_one_line(refs, tmp_path, capsys):
    assert main(_distill_argv(refs, tmp_path / "d", "--device", "tpu")) == 2
    line = one_error_line(capsys, "distill")
    assert "--device tpu" in line and "cpu" in line
    assert not (tmp_path / "d").exists()


def test_corrupt_jpeg_names_the_file_not_a_python_object(tmp_path, capsys):
    root = tmp_path / "data"
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True)
        save_png(root / split / "cat" / "0.png", torch.zeros(3, 8, 8, dtype=torch.uint8))
    (root / "train" / "cat" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "t"
    assert main(["train-teacher", "--data", str(root), "--epochs", "1", "--device", "cpu", "--quiet",
                 "--out", str(out)]) == 2
    line = one_error_line(capsys, "train-teacher")
    assert "1.jpg" in line and "BytesIO" not in line and "0x" not in line
    assert not out.exists()


def test_missing_data_leaves_no_out_folder_and_names_the_layout(refs, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["distill", "--data", str(tmp_path / "nowhere"), "--teacher", str(refs.teacher), "--quiet",
                 "--out", str(out)]) == 2
    line = one_error_line(capsys, "distill")
    assert "not found" in line and "train/ and test/" in line
    assert not out.exists()


def test_too_large_ipc_names_the_class(refs, tmp_path, capsys):
    for preset in ("random", "nrrdd"):
        assert main(["distill", "--data", "digits", "--teacher", str(refs.teacher), "--preset", preset,
                     "--ipc", "1000", "--device", "cpu", "--quiet", "--out", str(tmp_path / preset)]) == 2
        line = one_error_line(capsys, "distill")
        assert "class '0'" in line and "1000" in line and "training images" in line
        assert not (tmp_path / preset).exists()


def test_export_arrays_and_report_never_replace_a_users_file(refs, tmp_path, capsys):
    mine = tmp_path / "mine.npz"
    mine.write_bytes(b"my own file")
    assert main(["export-arrays", "digits", "--out", str(mine)]) == 2
    assert "--overwrite" in one_error_line(capsys, "export-arrays")
    assert main(["export-arrays", "digits", "--out", str(mine), "--overwrite"]) == 2
    one_error_line(capsys, "export-arrays")
    notes = tmp_path / "notes.md"
    notes.write_text("my notes")
    assert main(["report", str(refs.evaluation), "--out", str(notes)]) == 2
    assert "not written by nrrdd" in one_error_line(capsys, "report")
    assert mine.read_bytes() == b"my own file" and notes.read_text() == "my notes"
    report = tmp_path / "r.md"
    assert main(["report", str(refs.evaluation), "--out", str(report)]) == 0
    assert main(["report", str(refs.evaluation), "--out", str(report)]) == 0  # its own file: replaced
    table = report.read_text()
    assert "± 0.00" not in table and table.count("| digits |") == 1 and "results.json" in table
