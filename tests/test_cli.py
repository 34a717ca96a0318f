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
    for word in ("train-teacher", "verify", "models", "export", "--version"):
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


def test_help_and_flag_errors_do_not_import_torch():
    """`nrrdd --help` and errors about flags answer without importing torch (seconds) or numpy."""
    code = ("import sys; from nrrdd.cli import build_parser, main\n"
            "for argv in (['distill', '--help'], ['evaluate', '--ipc'], ['--help']):\n"
            "    try: main(argv)\n"
            "    except SystemExit: pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'torchvision')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_texts_say_what_each_command_reads(capsys):
    evaluate = _help(capsys, "evaluate")
    assert "(default: )" not in evaluate and "--no-verify" in evaluate and "--threads" in evaluate
    relabel = _help(capsys, "relabel")
    assert "--epochs" in relabel and "--plan-seed" in relabel and "--label-mode" in relabel
    assert not any(f in relabel for f in ("--seeds", "--lr ", "--ddp", "--width", "--temperature"))
    assert "model registry" in _help(capsys, "models")
    export = _help(capsys, "export-arrays")
    assert "portable copy" in export and "resize every image" in export
    assert "60 steps instead of the default 300" in _help(capsys, "demo")
    ddr = _help(capsys, "export")
    assert "image_tensor or image_path" in ddr and "--mean" in ddr and "ddranking" in ddr
    assert "--baseline {none,random}" in evaluate and "IOR" in evaluate
    assert "--recipe" in evaluate and "rded-1000" in evaluate and "--recipe" in relabel


def test_recipes_name_the_training_not_the_labels():
    """A config reads as the recipe whose training fields it has; labels, seeds and data do not change the name,
    any training change makes it custom; the named recipe's flags still override it."""
    from nrrdd.config import recipe_config, recipe_name, to_dict
    assert recipe_name(to_dict(recipe_config("rded-300"))) == "rded-300"
    assert recipe_name({"epochs": 1000, "label_mode": "dbr", "seeds": 5, "data": "cifar100"}) == "rded-1000"
    assert recipe_name(to_dict(recipe_config("rded-1000", {"lr": 0.002}))) == "custom"
    assert recipe_config("rded-1000", {"epochs": 50}).epochs == 50
    # multi-formation: the same schedule on the decoded tiles
    assert recipe_name({"epochs": 1000, "unstitch": True, "temperature": 20.0}) == "mf-1000"
    assert recipe_config("mf-1000").unstitch and recipe_config("mf-1000", {"unstitch": False}).epochs == 1000
    assert recipe_name({"epochs": 2000, "unstitch": True}) == "mf-2000"
    assert recipe_name({"epochs": 4000, "unstitch": True}) == "mf-4000"
    assert recipe_name(to_dict(recipe_config("rded-300", {"epochs": 2000}))) == "rded-2000"
    assert recipe_name(to_dict(recipe_config("rded-300", {"epochs": 4000}))) == "custom"
    # random-resized crops in the student: the crop floor is a training field, so it names its own recipe
    assert recipe_name({"epochs": 1000, "crop_min": 0.5}) == "crop-1000"
    assert recipe_name({"epochs": 2000, "crop_min": 0.25}) == "custom"
