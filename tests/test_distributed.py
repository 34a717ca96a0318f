"""torchrun with 2 CPU processes (gloo) must give the same bytes as one process."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nrrdd.config import TeacherConfig
from nrrdd.teacher import train_teacher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(_free_port())]


def _run(args, env, nproc=1):
    launcher = _torchrun(nproc) if nproc > 1 else [sys.executable]
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


DISTILL = ["distill", "--data", "digits", "--ipc", "2", "--iterations", "4", "--refine-batch", "6",
           "--pool-per-class", "20", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def distilled(setup) -> Path:
    """One process's distilled set, which the relabel and evaluate tests read (they fail, not skip, without it)."""
    root, env, teacher = setup
    _run(DISTILL + ["--teacher", teacher, "--out", str(root / "one")], env)
    return root / "one"


def test_two_process_distill_matches_single(setup, distilled):
    root, env, teacher = setup
    _run(DISTILL + ["--teacher", teacher, "--out", str(root / "two")], env, nproc=2)
    one, two = _files(root / "one"), _files(root / "two")
    assert len(one) == 21 and one.keys() == two.keys()  # 20 images + synthetic.safetensors
    assert [k for k in one if one[k] != two[k]] == []


def test_two_process_relabel_matches_single(setup, distilled):
    root, env, teacher = setup
    args = ["relabel", "--distilled", str(root / "one"), "--teacher", teacher, "--label-mode", "dbr",
            "--epochs", "3", "--device", "cpu", "--quiet"]
    _run(args + ["--out", str(root / "rl1")], env)
    _run(args + ["--out", str(root / "rl2")], env, nproc=2)
    for name in ("labels_dbr.safetensors", "plan.safetensors"):
        assert (root / "rl1" / name).read_bytes() == (root / "rl2" / name).read_bytes()


def test_sharded_labels_from_two_ranks_teach_the_same_students(setup, distilled):
    """With shards of one epoch (20 images x 2 fp16 distances = 80 bytes), each of 2 ranks writes its own;
    a student reading them one at a time trains bit for bit as one reading a single file."""
    root, env, teacher = setup
    args = ["relabel", "--distilled", str(root / "one"), "--teacher", teacher, "--label-mode", "dbr",
            "--epochs", "3", "--device", "cpu", "--quiet"]
    _run(args + ["--out", str(root / "single")], env)
    _run(args + ["--out", str(root / "shards"), "--shard-mb", str(100 / (1 << 20))], env, nproc=2)
    shards = sorted(p.name for p in (root / "shards").glob("labels_dbr*.safetensors"))
    assert shards == [f"labels_dbr.e{e:05d}-{e + 1:05d}.safetensors" for e in range(3)]
    whole = load_file(str(root / "single" / "labels_dbr.safetensors"))
    for e, name in enumerate(shards):
        part = load_file(str(root / "shards" / name))
        assert all(torch.equal(part[k][0], whole[k][e]) for k in whole)
    ev = ["evaluate", "--distilled", str(root / "one"), "--teacher", teacher, "--label-mode", "dbr", "--epochs",
          "3", "--seeds", "1", "--width", "16", "--device", "cpu", "--quiet"]
    for labels in ("single", "shards"):
        _run(ev + ["--labels", str(root / labels), "--out", str(root / f"ev_{labels}")], env)
    one, two = (json.loads((root / f"ev_{d}" / "results.json").read_text()) for d in ("single", "shards"))
    assert one["per_seed"][0]["weights_sha256"] == two["per_seed"][0]["weights_sha256"]
    assert two["labels"]["label_shards"] == 3 and two["labels"]["payload_bytes"] == one["labels"]["payload_bytes"]


def test_two_process_evaluate_splits_seeds_bit_identically(setup, distilled):
    root, env, teacher = setup
    args = ["evaluate", "--distilled", str(root / "one"), "--teacher", teacher, "--seeds", "3", "--epochs", "2",
            "--width", "16", "--device", "cpu", "--quiet"]
    _run(args + ["--out", str(root / "ev1")], env)
    _run(args + ["--out", str(root / "ev2")], env, nproc=2)
    one, two = (json.loads((root / d / "results.json").read_text()) for d in ("ev1", "ev2"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert [r["seed"] for r in two["per_seed"]] == [0, 1, 2]
    drop_time = [{k: v for k, v in r.items() if k != "time_s"} for r in one["per_seed"]]
    assert drop_time == [{k: v for k, v in r.items() if k != "time_s"} for r in two["per_seed"]]
    assert len({r["weights_sha256"] for r in one["per_seed"]}) == 3  # the seeds really differ


def test_ddp_student_matches_one_process(setup, tmp_path):
    """DDP splits every batch across 2 ranks and averages their gradients: the same steps as one process taking
    the whole batch, up to float rounding (ConvNet without BatchNorm, whose per-rank statistics would differ)."""
    root, env, teacher = setup
    worker = str(Path(__file__).with_name("ddp_worker.py"))
    torchrun = _torchrun(2)
    for cmd in (torchrun + [worker, teacher, str(tmp_path / "ddp"), "--ddp"],
                [sys.executable, worker, teacher, str(tmp_path / "one")]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    ddp, rank1, one, init = (load_file(tmp_path / f"{n}.safetensors") for n in
                             ("ddp_rank0", "ddp_rank1", "one_rank0", "one_init"))
    assert all(torch.equal(ddp[k], rank1[k]) for k in ddp)  # DDP keeps the ranks' replicas identical
    rows = [safe_open(tmp_path / f"{n}.safetensors", "pt").metadata()["rows"] for n in ("one_rank0", "ddp_rank0",
                                                                                         "ddp_rank1")]
    assert rows == ["80", "40", "40"]  # 2 epochs of 40 images, halved per rank
    assert max((one[k] - init[k]).abs().max().item() for k in one) > 1e-3  # training moved the weights
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=1e-4, atol=1e-5)
