"""The `nrrdd` command: help texts, exit codes, one tiny teacher run through the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nrrdd.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SCRIPT = Path(sys.executable).parent / "nrrdd"
MISSING = "/nonexistent/nrrdd-test-folder"
# The sub-process runs (each imports torch, seconds) start together and are awaited once.
COMMANDS = {
    "module_help": [sys.executable, "-m", "nrrdd", "--help"],
    "script_help": [str(SCRIPT), "train-teacher", "--help"],
    "verify_missing": [str(SCRIPT), "verify", MISSING],
}


@pytest.fixture(scope="module")
def runs():
    if not SCRIPT.exists():
        pytest.skip("console script `nrrdd` not installed in this environment")
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for k, c in COMMANDS.items()}
    done = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=180)
        done[k] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


def test_module_help(runs):
    r = runs["module_help"]
    assert r.returncode == 0, r.stderr
    for word in ("train-teacher", "verify", "models", "--version"):
        assert word in r.stdout


def test_script_train_teacher_help(runs):
    r = runs["script_help"]
    assert r.returncode == 0, r.stderr
    for flag in ("--data", "--arch", "--width", "--epochs", "--batch-size", "--lr", "--label-smoothing",
                 "--out", "--resume", "--overwrite", "--device", "--config", "--quiet"):
        assert flag in r.stdout, flag
    assert "(default: 15)" in " ".join(r.stdout.split())  # field defaults are shown (argparse wraps lines)


def test_verify_missing_folder_exits_nonzero(runs, tmp_path):
    r = runs["verify_missing"]
    assert r.returncode != 0
    assert MISSING in r.stdout and "manifest.json" in r.stdout
    assert main(["verify", str(tmp_path / "nope")]) == 1


def test_missing_out_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-teacher", "--data", "digits"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_train_teacher_via_cli(tmp_path, capsys):
    out = tmp_path / "t"
    argv = ["train-teacher", "--data", "digits", "--width", "8", "--epochs", "1", "--batch-size", "256",
            "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    assert "teacher.safetensors" in capsys.readouterr().out
    cfg = json.loads((out / "results.json").read_text())["config"]
    assert (cfg["width"], cfg["epochs"], cfg["batch_size"], cfg["data"]) == (8, 1, 256, "digits")
    assert main(["verify", str(out)]) == 0
    # a second run into the same folder is a user error: message, no traceback, exit 2
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    (out / "results.json").write_text("{}")
    assert main(["verify", str(out)]) == 1
    assert "changed: results.json" in capsys.readouterr().out


def test_config_file_and_bad_config(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"width": 8, "epochs": 1, "batch_size": 512, "bogus": 1}))
    argv = ["train-teacher", "--data", "digits", "--device", "cpu", "--quiet", "--config", str(cfg),
            "--out", str(tmp_path / "t")]
    assert main(argv) == 2
    assert "bogus" in capsys.readouterr().err
    cfg.write_text("{oops")
    assert main(argv) == 2
    assert "not valid JSON" in capsys.readouterr().err
