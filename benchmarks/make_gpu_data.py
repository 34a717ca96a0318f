"""Pack the CIFAR-10 folders into two stored zips under .gpu/ (git-ignored), each small enough for one call of
the device tool (64 MiB with the working tree), for benchmarks/gpu_run.sh.

    python benchmarks/make_gpu_data.py [--root ../shared/datasets]
"""
import argparse
import os
import zipfile
from pathlib import Path


PARTS = {"c10x.zip": ["train/airplane", "train/automobile", "train/bird", "train/cat", "train/deer", "train/dog"],
         "c10y.zip": ["train/frog", "train/horse", "train/ship", "train/truck", "test"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="../shared/datasets", help="folder holding cifar10/")
    a = p.parse_args()
    out = Path(__file__).resolve().parents[1] / ".gpu"
    out.mkdir(exist_ok=True)
    for name, dirs in PARTS.items():
        with zipfile.ZipFile(out / name, "w", zipfile.ZIP_STORED) as z:
            for d in dirs:
                for root, _, files in os.walk(Path(a.root) / "cifar10" / d):
                    for f in sorted(files):
                        path = Path(root) / f
                        z.write(path, path.relative_to(a.root))
        print(f"{out / name}: {(out / name).stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
