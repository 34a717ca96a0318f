"""The `nrrdd` command: one sub-command per pipeline stage, each a thin wrapper over one library function."""
from __future__ import annotations

import argparse
import sys

from nrrdd import NrrddError, __version__
from nrrdd.config import add_config_args, build_config, load_config_file


def _common(p: argparse.ArgumentParser, out: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when visible, else CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--config", help="JSON file of config fields, applied under the command-line flags")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if out:
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--resume", action="store_true", help="continue a killed run in --out from its last checkpoint")
        p.add_argument("--overwrite", action="store_true", help="replace whatever --out holds")


def cmd_train_teacher(a) -> int:
    from nrrdd.train import TeacherConfig, train_teacher
    cfg = build_config(TeacherConfig, load_config_file(a.config) if a.config else None, a)
    r = train_teacher(cfg, a.out, a.device, resume=a.resume, overwrite=a.overwrite, progress=not a.quiet)
    print(f"teacher {cfg.arch} on {cfg.data}: val {r['val_acc']:.2f}%  test {r['test_acc']:.2f}%  "
          f"({r['wall_time_s']:.0f} s) -> {a.out}/teacher.safetensors")
    return 0


def cmd_models(a) -> int:
    from nrrdd.models import model_names
    print("\n".join(model_names()))
    return 0


def cmd_verify(a) -> int:
    from nrrdd.io import verify_dir
    bad = 0
    for d in a.dirs:
        problems = verify_dir(d)
        print(f"{d}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        for p in problems:
            print(f"  {p}")
        bad += bool(problems)
    return 1 if bad else 0


def cmd_export_arrays(a) -> int:
    from nrrdd.data import save_arrays
    save_arrays(a.out, a.data, a.image_size)
    print(f"wrote {a.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nrrdd.train import TeacherConfig
    p = argparse.ArgumentParser(prog="nrrdd", description=__doc__.split("\n")[0] + "\n\nDistil a labelled image "
                                "set into a few synthetic images per class (NRR-DD, RDED, SRe2L presets), relabel "
                                "them and measure how well fresh students learn from them.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"nrrdd {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("train-teacher", help="train a teacher classifier (hard labels) and save it as safetensors",
                       description="Train a teacher on the training split (minus validation); writes "
                       "teacher.safetensors (weights + classes + normalisation + recipe), results.json, manifest.json.")
    add_config_args(s, TeacherConfig, "teacher recipe")
    _common(s)
    s.set_defaults(fn=cmd_train_teacher)

    s = sub.add_parser("models", help="list registered model names")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("verify", help="check every file of an output folder against its manifest",
                       description="Recompute sha256 of every file and compare with manifest.json; exit 1 on any "
                       "missing, extra or changed file.")
    s.add_argument("dirs", nargs="+", help="output folders (distilled sets, results, teachers)")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("export-arrays", help="save a data set's splits as one uint8 .npz (portable copy)")
    s.add_argument("data", help="digits, cifar10, cifar100 or a folder with train/ and test/")
    s.add_argument("--out", required=True, help="output .npz")
    s.add_argument("--image-size", type=int, default=None)
    s.set_defaults(fn=cmd_export_arrays)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except NrrddError as e:
        print(f"nrrdd {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nrrdd {args.cmd}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
