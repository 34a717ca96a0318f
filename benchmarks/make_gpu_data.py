"""Pack CIFAR-10 and CIFAR-100 for the GPU machine: each set as one stored zip cut into byte parts under .gpu/
(git-ignored), every part small enough to travel in one call of the device tool (64 MiB a call, the working
tree included). benchmarks/gpu_run.sh joins the parts there and lays each set out as ../shared/datasets does,
so that records name the set (cifar10), not the path it was read from.

    python benchmarks/make_gpu_data.py [--data cifar10 cifar100] [--root ../shared/datasets]

A warm machine keeps what an earlier call carried, so the parts travel one per call (carry [".gpu/cifar10.zip.0"],
then [".gpu/cifar10.zip.1"], ...) and the last call runs the benchmark.
"""
import argparse
import math
import os
import subprocess
import zipfile
from pathlib import Path


OUT = Path(__file__).resolve().parents[1] / ".gpu"
# The zip each set travels as: CIFAR-100 ships as one (its members are cifar100/train/..., as the device needs);
# CIFAR-10 is a folder, stored here without compression (lossless WebP does not compress further).
ZIPPED = {"cifar100": "cifar100/cifar100.zip"}


def folder_zip(root: Path, name: str, dest: Path) -> None:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as z:
        for folder, _, files in sorted(os.walk(root / name)):
            for f in sorted(files):
                path = Path(folder) / f
                z.write(path, path.relative_to(root))


def split_bytes(src: Path, part_bytes: int, dest: Path | None = None) -> list[Path]:
    """Cut `src` into the fewest equal parts of at most `part_bytes` (dest.0, dest.1, ...; dest: src by
    default): `cat` joins them."""
    dest = dest or src
    size = src.stat().st_size
    n = max(1, math.ceil(size / part_bytes))
    step = math.ceil(size / n)
    parts = []
    with open(src, "rb") as f:
        for i in range(n):
            parts.append(dest.with_name(f"{dest.name}.{i}"))
            parts[-1].write_bytes(f.read(step))
    return parts


def tree_mib() -> float:
    """What travels with every call besides the carried parts: the tracked files."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=OUT.parent, capture_output=True, check=True).stdout
    return sum(os.path.getsize(OUT.parent / p) for p in files.decode().split("\0") if p) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["cifar10"], choices=["cifar10", "cifar100"])
    p.add_argument("--root", default="../shared/datasets", help="folder holding cifar10/ and cifar100/")
    p.add_argument("--part-mib", type=float, default=56.0, help="largest part (parts are cut equal); with the "
                   "working tree each must stay under the device tool's 64 MiB a call")
    a = p.parse_args()
    tree, source = tree_mib(), {n: Path(a.root) / ZIPPED.get(n, n) for n in a.data}
    missing = [str(p) for p in source.values() if not p.exists()]
    if missing:  # before anything under .gpu/ is replaced
        raise SystemExit(f"not found: {', '.join(missing)} (--root names the folder that holds the data sets)")
    OUT.mkdir(exist_ok=True)
    for name in a.data:
        whole = OUT / f"{name}.zip"
        for old in OUT.glob(f"{name}.zip*"):  # this script's own output only
            old.unlink()
        if name in ZIPPED:  # cut the shipped zip as it is, with no copy of it first
            parts = split_bytes(source[name], int(a.part_mib * 2**20), whole)
        else:
            folder_zip(Path(a.root), name, whole)
            parts = split_bytes(whole, int(a.part_mib * 2**20))
            whole.unlink()
        for part in parts:
            mib = part.stat().st_size / 2**20
            print(f"{part.relative_to(OUT.parent)}: {mib:.1f} MiB")
            if mib + tree > 63.5:
                raise SystemExit(f"{part.name} and the {tree:.1f} MiB working tree exceed one call's 64 MiB: lower "
                                 "--part-mib")
    print(f"working tree: {tree:.1f} MiB; carry one part per call (a warm machine keeps the earlier ones)")


if __name__ == "__main__":
    main()
