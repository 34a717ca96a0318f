"""Output folders: what --overwrite may replace, what --resume may continue, and that checking touches nothing."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nrrdd import NrrddError
from nrrdd.outdir import MANIFEST, RUN_FILE, check_out, differences, finish_out, foreign_files, open_out, read_run


SETTINGS = {"config": {"ipc": 2, "lr": 0.01}}


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _finished_run(out: Path, command="distill", settings=SETTINGS) -> Path:
    open_out(out, command, settings, check_out(out, command, settings))
    (out / "images" / "a").mkdir(parents=True)
    (out / "images" / "a" / "0000.png").write_bytes(b"png")
    (out / "distill.json").write_text("{}")
    finish_out(out, command, settings, {"kind": "distilled"})
    return out


def test_new_and_empty_folders(tmp_path):
    assert check_out(tmp_path / "a" / "b", "distill", SETTINGS) == "new"
    assert not (tmp_path / "a").exists()  # checking creates nothing
    (tmp_path / "empty").mkdir()
    assert check_out(tmp_path / "empty", "distill", SETTINGS) == "new"


def test_a_finished_run_records_command_and_settings(tmp_path):
    out = _finished_run(tmp_path / "run")
    run = read_run(out)
    assert (run.command, run.settings, run.finished) == ("distill", SETTINGS, True)
    assert not (out / RUN_FILE).exists() and set(json.loads((out / MANIFEST).read_text())["sizes"]) == {
        "images/a/0000.png", "distill.json"}
    assert check_out(out, "distill", SETTINGS, resume=True) == "finished"


def test_foreign_files_block_overwrite_and_resume_and_are_named(tmp_path):
    out = _finished_run(tmp_path / "run")
    (out / "thesis.txt").write_text("years of work")
    (out / "sub").mkdir()
    (out / "sub" / "data.csv").write_text("1,2")
    before = _snapshot(tmp_path)
    assert foreign_files(out, read_run(out)) == ["sub/data.csv", "thesis.txt"]
    for kw in ({"overwrite": True}, {"resume": True}, {"overwrite": True, "resume": True}):
        with pytest.raises(NrrddError) as e:
            check_out(out, "distill", SETTINGS, **kw)
        assert "thesis.txt" in str(e.value) and "sub/data.csv" in str(e.value)
    assert _snapshot(tmp_path) == before


def test_a_folder_of_user_files_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for kw in ({"overwrite": True}, {"resume": True}, {}):
        with pytest.raises(NrrddError) as e:
            check_out(out, "evaluate", SETTINGS, **kw)
        assert str(out) in str(e.value)
    with pytest.raises(NrrddError, match="notes.txt"):
        check_out(out, "evaluate", SETTINGS, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["cwd", "parent_of_cwd", "home", "root", "input_parent"])
def test_overwrite_refuses_folders_above_what_matters(where, tmp_path, monkeypatch):
    run = _finished_run(tmp_path / "run")
    inner = run / "images" / "a"
    monkeypatch.chdir(inner if where == "parent_of_cwd" else run)
    monkeypatch.setenv("HOME", str(run))
    target = {"cwd": Path("."), "parent_of_cwd": run, "home": run, "root": Path("/"), "input_parent": run}[where]
    inputs = [inner / "0000.png"] if where == "input_parent" else []
    if where in ("home", "input_parent"):
        monkeypatch.chdir(tmp_path)
    if where == "input_parent":
        monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    before = _snapshot(tmp_path)
    with pytest.raises(NrrddError, match="refusing to replace"):
        check_out(target, "distill", SETTINGS, overwrite=True, inputs=inputs)
    assert _snapshot(tmp_path) == before


def test_overwrite_moves_the_old_run_aside_then_deletes_it(tmp_path):
    out = _finished_run(tmp_path / "run")
    other = {"config": {"ipc": 3}}
    state = check_out(out, "distill", other, overwrite=True)
    assert state == "replace"
    open_out(out, "distill", other, state)
    assert sorted(p.name for p in out.iterdir()) == [RUN_FILE]  # the old run is gone, the new one has begun
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing left aside
    assert read_run(out).settings == other and not read_run(out).finished


def test_resume_needs_the_same_command_and_settings(tmp_path):
    out = tmp_path / "run"
    open_out(out, "evaluate", SETTINGS, "new")
    assert check_out(out, "evaluate", SETTINGS, resume=True) == "resume"
    with pytest.raises(NrrddError, match=r"other settings \(differing: config.lr\)"):
        check_out(out, "evaluate", {"config": {"ipc": 2, "lr": 0.1}}, resume=True)
    with pytest.raises(NrrddError, match="a run of `nrrdd evaluate`"):
        check_out(out, "distill", SETTINGS, resume=True)


def test_unwritable_destinations(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NrrddError, match="is a file"):
        check_out(f / "sub", "distill", SETTINGS)
    if os.access("/proc/sys", os.W_OK):
        pytest.skip("/proc/sys is writable here")
    with pytest.raises(NrrddError, match="not writable"):
        check_out("/proc/sys/nrrdd-out", "distill", SETTINGS)


def test_differences_name_nested_keys():
    assert differences({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 5}}) == ["b.c", "b.d"]
    assert differences({"a": 1}, {"a": 1}) == []
