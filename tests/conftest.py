"""Shared fixtures: tiny ImageFolder trees on disk and a private decode cache for every test."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


# One intra-op thread: the test machine has 2 shared cores, and OpenMP threads that spin while other
# processes hold the CPUs make small CPU workloads ten times slower, not faster.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"  # and `--threads auto` of in-process CLI calls keeps that one thread


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Never read or write ~/.cache/nrrdd: each test gets its own empty cache folder."""
    cache = tmp_path_factory.mktemp("nrrdd-cache")
    monkeypatch.setenv("NRRDD_CACHE", str(cache))
    return cache


@pytest.fixture
def cache_path(_private_cache) -> Path:
    return _private_cache


def write_png(path: Path, rng: np.random.Generator, size: int | tuple[int, int] = 8) -> np.ndarray:
    """Write a random RGB PNG (size = side, or (height, width)); return its pixels as (H, W, 3) uint8."""
    h, w = (size, size) if isinstance(size, int) else size
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


@pytest.fixture
def make_folder(tmp_path):
    """make_folder(name="data", classes=("zebra", "ant", "moth"), n=3, size=8, splits=("train", "test"), seed=0)

    Writes <tmp>/<name>/<split>/<class>/<i>.png (random RGB) and returns the root Path. With splits=None
    the classes sit directly under the root (a single ImageFolder tree). `size` may be a callable
    (class_index, i) -> side or (h, w), to mix image sizes.
    """
    def make(name: str = "data", classes=("zebra", "ant", "moth"), n: int = 3, size=8,
             splits=("train", "test"), seed: int = 0) -> Path:
        rng = np.random.default_rng(seed)
        root = tmp_path / name
        for split in (splits or (None,)):
            base = root / split if split else root
            for ci, c in enumerate(classes):
                (base / c).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    s = size(ci, i) if callable(size) else size
                    write_png(base / c / f"{i}.png", rng, s)
        return root
    return make


def read_tree(root: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Independent reference reader: (sorted classes, images (N, 3, H, W) uint8, labels) in sorted file order."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            images.append(np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1))
            labels.append(label)
    return classes, np.stack(images), np.array(labels)


@pytest.fixture(scope="session")
def digits():
    from nrrdd.data import load_dataset
    return load_dataset("digits", progress=False)


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory, digits):
    """A tiny ConvNet-3 teacher (width 16, 2 epochs) on the embedded digits, shared by the whole session."""
    from nrrdd.config import TeacherConfig
    from nrrdd.teacher import train_teacher
    out = tmp_path_factory.mktemp("teacher")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NRRDD_CACHE", str(out / "cache"))
        train_teacher(TeacherConfig(data="digits", width=16, epochs=2, batch_size=128), out / "t", device="cpu",
                      data=digits, progress=False)
    return out / "t" / "teacher.safetensors"

