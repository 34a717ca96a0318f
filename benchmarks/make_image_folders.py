"""Generated image folders for memory and speed benchmarks: <out>/train/<class>/*.jpg and <out>/test/...,
random smooth textures (a per-class colour and frequency, so a teacher has something to tell apart).

    python benchmarks/make_image_folders.py runs/folders/c1000 --classes 1000 --train 50 --test 2 --size 256
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm


def texture(rng: np.random.Generator, size: int, tint: np.ndarray, cells: int) -> Image.Image:
    """Low-resolution noise upsampled bicubically: JPEG-typical smooth content, not incompressible noise."""
    low = rng.random((cells, cells, 3)) * 0.6 + tint * 0.4
    img = Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return img


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--train", type=int, default=50, help="images per class in train/")
    p.add_argument("--test", type=int, default=2, help="images per class in test/")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    if out.exists():
        raise SystemExit(f"{out}: exists; give a new folder")
    rng = np.random.default_rng(a.seed)
    for c in tqdm(range(a.classes), desc="classes"):
        tint, cells = rng.random(3), int(rng.integers(4, 32))
        name = f"n{c:08d}"  # WordNet-like folder names, as ImageNet has
        for split, n in (("train", a.train), ("test", a.test)):
            d = out / split / name
            d.mkdir(parents=True)
            for i in range(n):
                texture(rng, a.size, tint, cells).save(d / f"{name}_{i}.jpg", quality=90)


if __name__ == "__main__":
    main()
