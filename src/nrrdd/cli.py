"""The `nrrdd` command: one sub-command per pipeline stage, each a thin wrapper over one library function."""
from __future__ import annotations

import argparse
import sys

from nrrdd import NrrddError, __version__
from nrrdd.config import add_config_args, build_config, load_config_file


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when visible, else CPU), cpu, cuda, cuda:1 ...")


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    _device(p)
    p.add_argument("--threads", default="auto", help="CPU threads of this process: a number, 0 (torch's default, one "
                   "per core) or auto: $OMP_NUM_THREADS if set, else the cores that other processes leave idle at the "
                   "start (at least 1), since torch's threads spin while another process holds the cores. "
                   "CPU results are bit-identical only at the same count: fix it for exact reruns (default: auto)")
    if config:
        p.add_argument("--config", help="JSON file of config fields, applied under the command-line flags")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="output folder (created; never one holding files nrrdd did not write)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out that a kill interrupted (same "
                   "command and settings), or return the finished one")
    p.add_argument("--overwrite", action="store_true", help="replace the nrrdd run in --out (only a folder nrrdd "
                   "wrote; moved aside and deleted once the new run has started)")


def _no_verify(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--no-verify", dest="verify", action="store_false", help=f"use {what} even if it no longer "
                   "matches its manifest.json (or has none)")


def cmd_train_teacher(a) -> int:
    from nrrdd.config import TeacherConfig
    from nrrdd.teacher import train_teacher
    cfg = build_config(TeacherConfig, _config_file(a), a)
    r = train_teacher(cfg, a.out, a.device, resume=a.resume, overwrite=a.overwrite, progress=not a.quiet)
    print(f"teacher {cfg.arch} on {cfg.data}: val {r['val_acc']:.2f}%  test {r['test_acc']:.2f}%  "
          f"({r['wall_time_s']:.0f} s) -> {a.out}/teacher.safetensors")
    return 0


def cmd_import_teacher(a) -> int:
    from nrrdd.teacher import IMAGENET_MEAN, IMAGENET_STD, class_names, import_teacher
    meta = import_teacher(a.arch, a.weights, class_names(a.classes), a.out, a.image_size, a.mean or IMAGENET_MEAN,
                          a.std or IMAGENET_STD, overwrite=a.overwrite)
    print(f"teacher {meta['arch']} ({len(meta['classes'])} classes, {meta['image_size']} px) from {a.weights} -> "
          f"{a.out}")
    return 0


def cmd_ensemble_teachers(a) -> int:
    from nrrdd.teacher import ensemble_teachers
    meta = ensemble_teachers(a.teachers, a.out, a.data, overwrite=a.overwrite, device=a.device,
                             progress=not a.quiet)
    acc = f": val {meta['val_acc']:.2f}%  test {meta['test_acc']:.2f}%" if a.data else ""
    print(f"ensemble of {len(a.teachers)} teachers{acc} -> {a.out}")
    return 0


def cmd_distill(a) -> int:
    from nrrdd.config import preset_config
    from nrrdd.distill import distill
    cfg = preset_config(a.preset, _config_file(a), a)
    r = distill(a.data, a.teacher, cfg, a.out, preset=a.preset, device=a.device, resume=a.resume,
                overwrite=a.overwrite, progress=not a.quiet, class_names=a.class_names)
    if not r:  # a torchrun rank other than 0: rank 0 reports
        return 0
    t = r["timings"]
    print(f"{a.preset}: {len(r['images'])} images ({r['ipc']} per class) in {t['total_s']:.0f} s "
          f"(select {t['select_s']:.0f} s, refine {t['refine_s']:.0f} s) -> {a.out}")
    return 0


def _config_file(a, only=None) -> dict | None:
    """The --config file's fields; with `only`, those a command reads (relabel ignores the training recipe)."""
    if not a.config:
        return None
    cfg = load_config_file(a.config)
    return {k: v for k, v in cfg.items() if k in only} if only is not None and isinstance(cfg, dict) else cfg


def cmd_evaluate(a) -> int:
    from nrrdd.config import recipe_config
    from nrrdd.evaluate import evaluate
    cfg = recipe_config(a.recipe, _config_file(a), a)
    r = evaluate(a.distilled, cfg, a.out, teacher_path=a.teacher, labels_dir=a.labels, device=a.device,
                 resume=a.resume, overwrite=a.overwrite, progress=not a.quiet, verify=a.verify)
    if not r:  # a torchrun rank other than 0: rank 0 reports
        return 0
    lab = r["labels"]
    extra = f"  labels {lab['payload_bytes']} B ({lab['ratio_vs_sl']}x smaller than SL)" if lab else ""
    if r.get("baseline"):
        b = r["baseline"]
        extra += (f"\n  random real images, same recipe and labels: test {b['test_mean']:.2f} +- {b['test_std']:.2f}  "
                  f"val {b['val_mean']:.2f}  ->  IOR test {r['ior']['test']:+.2f}, val {r['ior']['val']:+.2f}")
    print(f"{cfg.student} / {cfg.label_mode}: test {r['test_mean']:.2f} +- {r['test_std']:.2f}  "
          f"val {r['val_mean']:.2f} +- {r['val_std']:.2f}  over seeds {r['seeds']}{extra}\n  -> {a.out}/results.json")
    return 0


def cmd_relabel(a) -> int:
    from nrrdd.config import RELABEL_FIELDS, recipe_config
    from nrrdd.relabel import relabel_set
    cfg = recipe_config(a.recipe, _config_file(a, RELABEL_FIELDS), a)
    info = relabel_set(a.distilled, a.teacher, cfg, a.out, device=a.device, resume=a.resume, overwrite=a.overwrite,
                       progress=not a.quiet, verify=a.verify)
    if info:  # a torchrun rank other than 0 reports nothing
        print(f"{cfg.label_mode}: {info['payload_bytes']} B payload ({info['ratio_vs_sl']}x smaller than soft labels), "
              f"{info['bookkeeping_bytes']} B plan -> {a.out}")
    return 0


def cmd_report(a) -> int:
    from nrrdd.report import load_results, write_report
    results = load_results(a.results, verify=a.verify)
    if not results:
        raise NrrddError(f"no evaluation results.json found in {' '.join(a.results)}")
    print(write_report(results, a.out, a.plot), end="")
    return 0


def cmd_demo(a) -> int:
    """The whole pipeline on the embedded digits: teacher, three distilled sets, students, report."""
    from nrrdd.config import StudentConfig, TeacherConfig, preset_config
    from nrrdd.data import load_dataset
    from nrrdd.distill import distill
    from nrrdd.evaluate import evaluate
    from nrrdd.outdir import check_out, finish_out, open_out
    from nrrdd.report import write_report
    from nrrdd.teacher import train_teacher
    settings = {"ipc": a.ipc}
    out = open_out(a.out, "demo", settings, check_out(a.out, "demo", settings, a.overwrite, a.resume))
    ds = load_dataset("digits")
    progress = not a.quiet
    # every stage below resumes: the demo folder itself was checked, and its sub-folders hold only its runs
    t = train_teacher(TeacherConfig(data="digits", width=32, epochs=15, batch_size=128, lr=0.05), out / "teacher",
                      a.device, resume=True, data=ds, progress=progress)
    print(f"[1/3] teacher: val {t['val_acc']:.1f}%  test {t['test_acc']:.1f}%", flush=True)
    results = []
    for preset in ("nrrdd", "rded", "random"):
        # 60 refinement steps instead of 300: digits' 8x8 sources upsampled to 32 px have little to refine
        d = distill(ds, out / "teacher" / "teacher.safetensors",
                    preset_config(preset, {"ipc": a.ipc, "iterations": 60}), out / f"distilled_{preset}",
                    preset=preset, device=a.device, resume=True, progress=progress)
        r = evaluate(out / f"distilled_{preset}", StudentConfig(width=32, epochs=80, seeds=2, data="digits"),
                     out / f"eval_{preset}", device=a.device, resume=True, progress=progress, data=ds)
        results.append(r)
        print(f"[2/3] {preset:7s} IPC {a.ipc}: distilled in {d['timings']['total_s']:.0f} s, student test "
              f"{r['test_mean']:.1f} +- {r['test_std']:.1f}% (val {r['val_mean']:.1f}%)", flush=True)
    write_report(results, out / "report.md")
    finish_out(out, "demo", settings, {"kind": "demo"})
    print(f"[3/3] report: {out / 'report.md'}; pictures: {out}/distilled_nrrdd/pictures/")
    return 0


def cmd_models(a) -> int:
    from nrrdd.models import model_names
    print("\n".join(model_names()))
    return 0


def cmd_datasets(a) -> int:
    from nrrdd.data import DATASETS
    for name, loader in DATASETS.items():
        print(f"{name}: {loader.where()}")
    return 0


def cmd_verify(a) -> int:
    from nrrdd.files import verify_dir
    bad = 0
    for d in a.dirs:
        problems = verify_dir(d)
        print(f"{d}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        for p in problems:
            print(f"  {p}")
        bad += bool(problems)
    return 1 if bad else 0


def cmd_export_arrays(a) -> int:
    from nrrdd.data import load_arrays, save_arrays
    from nrrdd.outdir import check_out_file
    check_out_file(a.out, a.overwrite, "an nrrdd array file", load_arrays)
    save_arrays(a.out, a.data, a.image_size)
    print(f"wrote {a.out}")
    return 0


def cmd_export(a) -> int:
    from nrrdd.export import export
    r = export(a.distilled, a.out, a.format, a.mean, a.std, overwrite=a.overwrite, verify=a.verify)
    print(f"{r['images'][0]} images ({r['ipc']} per class) as {a.format}: images.pt, labels.pt, image_folder/ -> "
          f"{a.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nrrdd.config import PRESETS, RECIPES, RELABEL_FIELDS, StudentConfig, SynthConfig, TeacherConfig
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

    s = sub.add_parser("import-teacher", help="turn a standard torchvision checkpoint (.pth) into an nrrdd teacher",
                       description="Read a torchvision model's state dict (weights_only: a pickle that would run "
                       "code is refused) and write it as an nrrdd teacher (safetensors with the class names, input "
                       "size and normalisation that distill, relabel and evaluate need).")
    s.add_argument("--arch", required=True, help="torchvision architecture: resnet18, resnet50, resnet101, "
                   "mobilenet_v2, efficientnet_b0")
    s.add_argument("--weights", required=True, help="the checkpoint: a state dict saved with torch.save")
    s.add_argument("--classes", required=True, help="class names in the order of the model's outputs: a text file "
                   "(one per line) or the image folder whose sorted class folders they are")
    s.add_argument("--image-size", type=int, default=224, help="input side in pixels (default: 224)")
    s.add_argument("--mean", type=float, nargs=3, help="input normalisation mean (default: ImageNet's)")
    s.add_argument("--std", type=float, nargs=3, help="input normalisation std (default: ImageNet's)")
    s.add_argument("--out", required=True, help="the teacher .safetensors to write")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it is an nrrdd checkpoint")
    s.set_defaults(fn=cmd_import_teacher)

    s = sub.add_parser("ensemble-teachers", help="average several teachers' logits as one teacher file",
                       description="Write one teacher whose logits are the mean of the given teachers' (EDC's "
                       "ensemble relabelling): its CAM is the mean of theirs and refinement matches all their "
                       "BatchNorm statistics. The teachers must share classes, input size, normalisation and the "
                       "size of their last feature maps (e.g. ConvNet-3s of several seeds, or a ConvNet-3 and a "
                       "CIFAR ResNet-18 at 32 px).")
    s.add_argument("teachers", nargs="+", help="teacher .safetensors files (two or more)")
    s.add_argument("--data", help="measure the ensemble's validation and test accuracy on this data set "
                   "(the first teacher's validation split) and record them in the file")
    s.add_argument("--out", required=True, help="the ensemble .safetensors to write")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it is an nrrdd checkpoint")
    _device(s)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_ensemble_teachers)

    s = sub.add_parser("distill", help="synthesise a distilled set (PNG class folders + manifest + pictures)",
                       description="Select and stitch real patches (CIDD/RDED), refine them (NRR/SRe2L) and write "
                       "images/<class>/*.png, synthetic.safetensors, config.json, distill.json, pictures/ and "
                       "manifest.json. Presets: " + "; ".join(f"{k}: {v or 'defaults'}" for k, v in PRESETS.items()))
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--teacher", required=True, help="teacher .safetensors (from train-teacher)")
    s.add_argument("--preset", default="nrrdd", help=f"method preset: {', '.join(PRESETS)} (default: nrrdd)")
    s.add_argument("--class-names", help="file of readable names for the pictures: lines '<folder> <name>' (as "
                   "ImageNet's LOC_synset_mapping.txt) or a JSON object; class folders keep their names")
    add_config_args(s, SynthConfig, "synthesis (overrides the preset)")
    _common(s)
    s.set_defaults(fn=cmd_distill)

    plan = ("The label plan (batches, crops, flips, mixes) is drawn from --plan-seed, so relabel and evaluate see "
            "identical mixed samples.")
    for name, fn, helptext, only in (
            ("evaluate", cmd_evaluate, "train students from scratch on a distilled set; report test accuracy over "
             "seeds", None),
            ("relabel", cmd_relabel, "store teacher labels (soft, DBR distances, top-k) for a distilled set",
             RELABEL_FIELDS)):
        s = sub.add_parser(name, help=helptext, description=f"{helptext}. {plan}")
        s.add_argument("--distilled", required=True, help="nrrdd distill output, or any ImageFolder of images")
        s.add_argument("--teacher", help="teacher .safetensors (default: the one recorded in the distilled set)")
        if name == "evaluate":
            s.add_argument("--labels", help="folder written by nrrdd relabel (stored modes; default: relabel here)")
        _no_verify(s, "a distilled folder")
        s.add_argument("--recipe", default="rded-300", metavar="NAME", help="named student recipe ("
                       + "; ".join(f"{n}: {r.about}" for n, r in RECIPES.items()) + "); --config and flags override "
                       "its fields" + (" (relabel reads its label plan: epochs, batches, mixes)" if only else "")
                       + " (default: rded-300)")
        add_config_args(s, StudentConfig, "student recipe and labels" if only is None else "label plan", only)
        _common(s)
        s.set_defaults(fn=fn)

    s = sub.add_parser("report", help="markdown table + accuracy plot from evaluation results",
                       description="Collect results.json files (or folders of them) into a markdown table with the "
                       "paper's figure beside each cell where one exists, and plot accuracy against IPC (a bar "
                       "per preset, seeds as dots, when only one IPC was run).")
    s.add_argument("results", nargs="+", help="results.json files or folders searched recursively")
    s.add_argument("--out", required=True, help="markdown file to write (never replaces a file nrrdd did not write)")
    s.add_argument("--plot", help="PNG plot path (default: beside --out)")
    _no_verify(s, "a results folder")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("demo", help="whole pipeline on the embedded digits data (about 1-2 min on 2 CPU cores)",
                       description="Train a small teacher on scikit-learn's digits (shipped with the package), "
                       "distil it with the nrrdd, rded and random presets, train students on each and write a "
                       "report. Needs no download. Refinement runs 60 steps instead of the default 300: the digits "
                       "are 8x8 images upsampled to 32 px, with little detail to refine, and the demo stays short.")
    s.add_argument("--ipc", type=int, default=10, help="images per class (default 10)")
    _common(s, config=False)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("models", help="list registered model names", description="List the names --arch and "
                       "--student accept (the model registry).")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("datasets", help="list the named data sets and where each was found",
                       description="List the names --data accepts besides folders and .npz files, and where each "
                       "was found ($NRRDD_DATA, ./shared/datasets, ../shared/datasets).")
    s.set_defaults(fn=cmd_datasets)

    s = sub.add_parser("verify", help="check every file of an output folder against its manifest",
                       description="Recompute sha256 of every file and compare with manifest.json; exit 1 on any "
                       "missing, extra or changed file.")
    s.add_argument("dirs", nargs="+", help="output folders (distilled sets, results, teachers)")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("export", help="write a distilled set in the layout another evaluator loads (DD-Ranking)",
                       description="Write a distilled set for another tool. ddranking: images.pt (float32 N x C x "
                       "H x W, class-major, normalised with --mean/--std), labels.pt (int64 class indices), "
                       "image_folder/<class index>/<n>.png and export.json, which DD-Ranking's compute_metrics takes "
                       "as image_tensor or image_path.")
    s.add_argument("--distilled", required=True, help="a distilled folder (from distill) or an ImageFolder")
    s.add_argument("--format", default="ddranking", choices=["ddranking"], help="target layout (default: ddranking)")
    s.add_argument("--mean", type=float, nargs="+", help="per-channel mean images.pt is normalised with: the one "
                   "the evaluator applies to its test images (default: the set's own, its teacher's)")
    s.add_argument("--std", type=float, nargs="+", help="per-channel std, likewise")
    s.add_argument("--out", required=True, help="output folder (created; never one holding files nrrdd did not write)")
    s.add_argument("--overwrite", action="store_true", help="replace an export nrrdd wrote in --out")
    _no_verify(s, "a distilled folder")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("export-arrays", help="save a data set's splits as one uint8 .npz (portable copy)",
                       description="Decode a data set's train and test splits into one compressed uint8 .npz "
                       "(train_images, train_labels, test_images, test_labels, classes) that --data accepts: a "
                       "portable copy for machines without the source folders.")
    s.add_argument("data", help=DATA_HELP)
    s.add_argument("--out", required=True, help="output .npz")
    s.add_argument("--image-size", type=int, default=None, help="resize every image to this side in pixels "
                   "(default: the first training image's size)")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it is an nrrdd array file")
    s.set_defaults(fn=cmd_export_arrays)
    return p


DATA_HELP = ("a named data set (`nrrdd datasets` lists them: digits is embedded, cifar10 and cifar100 are found under "
             "$NRRDD_DATA, ./shared/datasets or ../shared/datasets), a .npz from export-arrays, or a folder (or "
             ".zip) with train/ and test/ class sub-folders")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "threads"):
            from nrrdd.runtime import set_threads
            set_threads(args.threads)
        return args.fn(args)
    except NrrddError as e:
        print(f"nrrdd {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full disk, a permission: the system's words and the path, no traceback
        where = f": {e.filename}" if e.filename else ""
        print(f"nrrdd {args.cmd}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nrrdd {args.cmd}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
