"""torchrun with 2 CPU processes (gloo) must give the same bytes as one process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nrrdd.train import TeacherConfig, train_teacher


def _run(args, env, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", "29517"] if nproc > 1 else [sys.executable]
    r = subprocess.run(launcher + ["-m", "nrrdd", *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NRRDD_CACHE": str(root / "cache")}
    train_teacher(TeacherConfig(data="digits", width=16, epochs=1, batch_size=128), root / "teacher", "cpu",
                  progress=False)
    return root, env, str(root / "teacher" / "teacher.safetensors")


def _files(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and (p.parts[-3] == "images" or p.name.endswith(".safetensors"))}


def test_two_process_distill_matches_single(setup):
    root, env, teacher = setup
    args = ["distill", "--data", "digits", "--teacher", teacher, "--ipc", "2", "--iterations", "4",
            "--refine-batch", "6", "--pool-per-class", "20", "--device", "cpu", "--quiet"]
    _run(args + ["--out", str(root / "one")], env)
    _run(args + ["--out", str(root / "two")], env, nproc=2)
    one, two = _files(root / "one"), _files(root / "two")
    assert len(one) == 21 and one.keys() == two.keys()  # 20 images + synthetic.safetensors
    assert [k for k in one if one[k] != two[k]] == []


def test_two_process_relabel_matches_single(setup):
    root, env, teacher = setup
    if not (root / "one").exists():
        pytest.skip("needs the distilled set of the test above")
    args = ["relabel", "--distilled", str(root / "one"), "--teacher", teacher, "--label-mode", "dbr",
            "--epochs", "3", "--device", "cpu", "--quiet"]
    _run(args + ["--out", str(root / "rl1")], env)
    _run(args + ["--out", str(root / "rl2")], env, nproc=2)
    for name in ("labels_dbr.safetensors", "plan.safetensors"):
        assert (root / "rl1" / name).read_bytes() == (root / "rl2" / name).read_bytes()
