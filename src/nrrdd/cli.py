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


def cmd_distill(a) -> int:
    from nrrdd.distill import distill
    from nrrdd.synth import preset_config
    cfg = preset_config(a.preset, load_config_file(a.config) if a.config else None, a)
    r = distill(a.data, a.teacher, cfg, a.out, preset=a.preset, device=a.device, resume=a.resume,
                overwrite=a.overwrite, progress=not a.quiet)
    if not r:  # a torchrun rank other than 0: rank 0 reports
        return 0
    t = r["timings"]
    print(f"{a.preset}: {len(r['images'])} images ({r['ipc']} per class) in {t['total_s']:.0f} s "
          f"(select {t['select_s']:.0f} s, refine {t['refine_s']:.0f} s) -> {a.out}")
    return 0


def _student_cfg(a):
    from nrrdd.evaluate import StudentConfig
    return build_config(StudentConfig, load_config_file(a.config) if a.config else None, a)


def cmd_evaluate(a) -> int:
    from nrrdd.evaluate import evaluate
    cfg = _student_cfg(a)
    r = evaluate(a.distilled, cfg, a.out, teacher_path=a.teacher, labels_dir=a.labels, device=a.device,
                 resume=a.resume, overwrite=a.overwrite, progress=not a.quiet)
    if not r:  # a torchrun rank other than 0: rank 0 reports
        return 0
    lab = r["labels"]
    extra = f"  labels {lab['payload_bytes']} B ({lab['ratio_vs_sl']}x smaller than SL)" if lab else ""
    print(f"{cfg.student} / {cfg.label_mode}: test {r['test_mean']:.2f} +- {r['test_std']:.2f}  "
          f"val {r['val_mean']:.2f} +- {r['val_std']:.2f}  over seeds {r['seeds']}{extra} -> {a.out}/results.json")
    return 0


def cmd_relabel(a) -> int:
    from pathlib import Path
    from nrrdd.checkpoint import load_model
    from nrrdd.evaluate import STORED_MODES, load_distilled, plan_spec, store_labels
    from nrrdd.io import pick_device, prepare_out_dir, write_json, write_manifest
    cfg = _student_cfg(a)
    if cfg.label_mode not in STORED_MODES:
        raise NrrddError(f"--label-mode {cfg.label_mode}: relabel stores {', '.join(STORED_MODES)}")
    from nrrdd.dist import barrier, init_from_env, is_main
    dev = pick_device(a.device)
    init_from_env(dev)
    split, classes, record = load_distilled(a.distilled)
    teacher, meta = load_model(a.teacher, classes=classes, device=dev)
    out = Path(a.out)
    if is_main():
        prepare_out_dir(out, overwrite=a.overwrite, resume=a.resume)
    barrier()
    spec = plan_spec(cfg, len(split), record.get("ipc") or len(split) // len(classes), len(classes),
                     split.images.shape[-1])
    info = store_labels(out, teacher, split.images.to(dev), split.labels.to(dev), spec, cfg, meta["mean"],
                        meta["std"], progress=not a.quiet and is_main())
    if not is_main():
        return 0
    write_json(out / "labels.json", {"distilled": a.distilled, "teacher": a.teacher, "config": vars(cfg), **info})
    write_manifest(out, {"kind": "labels", "mode": cfg.label_mode})
    print(f"{cfg.label_mode}: {info['payload_bytes']} B payload ({info['ratio_vs_sl']}x smaller than soft labels), "
          f"{info['bookkeeping_bytes']} B plan -> {a.out}")
    return 0


def cmd_report(a) -> int:
    from nrrdd.io import write_bytes
    from nrrdd.report import accuracy_plot, load_results, markdown_table
    results = load_results(a.results)
    if not results:
        raise NrrddError(f"no evaluation results.json found in {a.results}")
    table = markdown_table(results)
    write_bytes(a.out, table.encode())
    accuracy_plot(results, a.plot or str(a.out).rsplit(".", 1)[0] + ".png")
    print(table)
    return 0


def cmd_demo(a) -> int:
    """The whole pipeline on the embedded digits: teacher, three distilled sets, students, report."""
    from pathlib import Path
    from nrrdd.data import load_dataset
    from nrrdd.distill import distill
    from nrrdd.evaluate import StudentConfig, evaluate
    from nrrdd.io import prepare_out_dir
    from nrrdd.report import accuracy_plot, markdown_table
    from nrrdd.synth import preset_config
    from nrrdd.train import TeacherConfig, train_teacher
    out = prepare_out_dir(a.out, overwrite=a.overwrite, resume=a.resume)
    ds = load_dataset("digits")
    progress = not a.quiet
    t = train_teacher(TeacherConfig(data="digits", width=32, epochs=15, batch_size=128, lr=0.05), out / "teacher",
                      a.device, resume=a.resume, data=ds, progress=progress)
    print(f"[1/3] teacher: val {t['val_acc']:.1f}%  test {t['test_acc']:.1f}%", flush=True)
    results = []
    for preset in ("nrrdd", "rded", "random"):
        d = distill(ds, out / "teacher" / "teacher.safetensors", preset_config(preset, {"ipc": a.ipc, "iterations": 60}),
                    out / f"distilled_{preset}", preset=preset, device=a.device, resume=a.resume, progress=progress)
        r = evaluate(out / f"distilled_{preset}", StudentConfig(width=32, epochs=80, seeds=2, data="digits"),
                     out / f"eval_{preset}", device=a.device, resume=a.resume, progress=progress, data=ds)
        results.append(r)
        print(f"[2/3] {preset:7s} IPC {a.ipc}: distilled in {d['timings']['total_s']:.0f} s, student test "
              f"{r['test_mean']:.1f} +- {r['test_std']:.1f}% (val {r['val_mean']:.1f}%)", flush=True)
    Path(out / "report.md").write_text(markdown_table(results))
    accuracy_plot(results, out / "report.png")
    print(f"[3/3] report: {out / 'report.md'}; pictures: {out}/distilled_nrrdd/pictures/")
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

    from nrrdd.synth import PRESETS, SynthConfig
    s = sub.add_parser("distill", help="synthesise a distilled set (PNG class folders + manifest + pictures)",
                       description="Select and stitch real patches (CIDD/RDED), refine them (NRR/SRe2L) and write "
                       "images/<class>/*.png, synthetic.safetensors, config.json, distill.json, pictures/ and "
                       "manifest.json. Presets: " + "; ".join(f"{k}: {v or 'defaults'}" for k, v in PRESETS.items()))
    s.add_argument("--data", required=True, help="digits, cifar10, cifar100, or a folder with train/ and test/")
    s.add_argument("--teacher", required=True, help="teacher .safetensors (from train-teacher)")
    s.add_argument("--preset", default="nrrdd", help=f"method preset: {', '.join(PRESETS)} (default: nrrdd)")
    add_config_args(s, SynthConfig, "synthesis (overrides the preset)")
    _common(s)
    s.set_defaults(fn=cmd_distill)

    from nrrdd.evaluate import StudentConfig
    for name, fn, helptext in (
            ("evaluate", cmd_evaluate, "train students from scratch on a distilled set; report test accuracy over seeds"),
            ("relabel", cmd_relabel, "store teacher labels (soft, DBR distances, top-k) for a distilled set")):
        s = sub.add_parser(name, help=helptext, description=helptext + ". The label plan (batches, crops, flips, "
                           "mixes) is drawn from --plan-seed, so relabel and evaluate see identical mixed samples.")
        s.add_argument("--distilled", required=True, help="nrrdd distill output, or any ImageFolder of images")
        s.add_argument("--teacher", help="teacher .safetensors (default: the one recorded in the distilled set)")
        if name == "evaluate":
            s.add_argument("--labels", help="folder written by nrrdd relabel (stored modes; default: relabel here)")
        add_config_args(s, StudentConfig, "student recipe and labels")
        _common(s)
        s.set_defaults(fn=fn)

    s = sub.add_parser("report", help="markdown table + accuracy plot from evaluation results",
                       description="Collect results.json files (or folders of them) into a markdown table with the "
                       "paper's figure beside each cell where one exists, and plot accuracy against IPC.")
    s.add_argument("results", nargs="+", help="results.json files or folders searched recursively")
    s.add_argument("--out", required=True, help="markdown file to write")
    s.add_argument("--plot", help="PNG plot path (default: beside --out)")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("demo", help="whole pipeline on the embedded digits data (about 1-2 min on 2 CPU cores)",
                       description="Train a small teacher on scikit-learn's digits (shipped with the package), "
                       "distil it with the nrrdd, rded and random presets, train students on each and write a "
                       "report. Needs no download.")
    s.add_argument("--ipc", type=int, default=10, help="images per class (default 10)")
    _common(s)
    s.set_defaults(fn=cmd_demo)

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
