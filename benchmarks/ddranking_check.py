"""Independent check of our student accuracies with DD-Ranking (NUS-HPC-AI-Lab, `ddranking==0.2.0`, arXiv
2505.13300): its LabelRobustScoreSoft trains ConvNet-3-BN students on our distilled CIFAR-10 sets with soft labels
from our teacher on the fly (mode 'M', KL at T = 20, AdamW 1e-3, cosine to half, CutMix, 300 epochs), and we set
its accuracies beside `nrrdd evaluate`'s, with its fair metrics (IOR, HLR, LRS).

DD-Ranking pins numpy<2, so it lives in its own virtual environment:

    python3 -m venv .venv-ddr && .venv-ddr/bin/pip install -r benchmarks/requirements-ddranking.txt -e .[ddranking]
    .venv-ddr/bin/python benchmarks/ddranking_check.py --sets random=runs/ddr/d_random rded=runs/ddr/d_rded \\
        nrrdd=runs/ddr/d_nrrdd --ours benchmarks/results/cifar10_convnet_nols15/cells

Offline data, without editing DD-Ranking: its CIFAR-10 loader asks torchvision for `cifar-10-batches-py` under
`real_data_path` (download=True). We write those pickles from our lossless copy (same pixels, CIFAR's class order)
and clear the md5 sums torchvision checks them against (`CIFAR10.train_list`, `test_list`, `meta`):
the only thing patched. The teacher
is our safetensors file saved as the plain state dict DD-Ranking loads (`<teacher_dir>/CIFAR10/ConvNet-3-BN/
ckpt_best.pt`; our ConvNet-3 has its layer names). Students see images normalised with the teacher's statistics
(`custom_train_trans` / `custom_val_trans`), as the teacher was trained.

What runs, per set (CPU cost: a 300-epoch student with 15 test passes is ~8 min on 2 cores):
- soft-label accuracy at lr 1e-3 (`syn_lr`, RDED's and DD-Ranking's RDED script's), one seeded run; we record
  DD-Ranking's figure (best of the test passes every 20 epochs) and the final epoch's (ours is the final
  epoch's);
- with `--hard`, hard-label accuracy (for HLR) over `--hard-lrs` (DD-Ranking searches 5 learning rates by test
  accuracy; `compute_metrics` does, with `--full`).
IOR is the soft accuracy minus that of the `random` set (our random preset, PNG) under the same protocol;
`--their-random` also trains on a random sample drawn by DD-Ranking itself (saved as JPEG). HLR needs the
full-data hard-label accuracy: DD-Ranking trains ConvNet-3-BN on all 50,000 images (hours on a CPU), so we give
it our teacher's test accuracy (the same architecture trained on hard labels, 45,000 images, our recipe) through
its REAL_DATA_ACC_CACHE, and say so in the results.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch


REPO = Path(__file__).resolve().parents[1]
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar_pickles(root: Path, train: tuple, test: tuple, classes: list[str]) -> Path:
    """torchvision's `cifar-10-batches-py` from uint8 (N, 3, 32, 32) images and labels: five training batches,
    the test batch and batches.meta, rows as CIFAR stores them (1024 red, 1024 green, 1024 blue bytes)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    (x_tr, y_tr), (x_te, y_te) = train, test
    parts = np.array_split(np.arange(len(y_tr)), 5)
    for name, (x, y) in zip(CIFAR10_FILES, [(x_tr[i], y_tr[i]) for i in parts] + [(x_te, y_te)]):
        batch = {"batch_label": name, "labels": [int(v) for v in y],
                 "data": np.ascontiguousarray(x.reshape(len(y), -1), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(len(y))]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes, "num_cases_per_batch": len(parts[0]), "num_vis": 3072}, f)
    return folder


def accept_local_cifar() -> None:
    """torchvision checks the original archive's md5 sums; our pickles hold the same pixels, not the same bytes."""
    from torchvision.datasets import CIFAR10
    CIFAR10.train_list = [[name, None] for name, _ in CIFAR10.train_list]  # md5 None: the file need only exist
    CIFAR10.test_list = [[name, None] for name, _ in CIFAR10.test_list]
    CIFAR10.meta = {**CIFAR10.meta, "md5": None}


def export_teacher(teacher: Path, teacher_dir: Path) -> dict:
    """Our checkpoint as the strict, plain state dict DD-Ranking loads; returns its nrrdd metadata."""
    from safetensors.torch import load_file

    from nrrdd.checkpoint import read_meta
    meta = read_meta(teacher)
    if meta["arch"] != "convnet3" or meta.get("width", 128) != 128:
        raise SystemExit(f"{teacher}: DD-Ranking's ConvNet-3-BN is a width-128 convnet3, not {meta['arch']}")
    dest = teacher_dir / "CIFAR10" / "ConvNet-3-BN" / "ckpt_best.pt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(load_file(str(teacher)), dest)
    return meta


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # DD-Ranking's CutMix draws lambda and the box from numpy
    torch.manual_seed(seed)


class Curve:
    """Every test accuracy DD-Ranking measures, in order (its methods return only the best)."""

    def __init__(self):
        self.values: list[float] = []

    def install(self):
        import ddranking.metrics.soft_label as sl
        original = sl.validate

        def recording(*a, **k):
            acc = original(*a, **k)
            self.values.append(float(acc))
            return acc
        sl.validate = recording

    def take(self) -> list[float]:
        out, self.values = self.values, []
        return out


def train_transform(mean, std, flip: bool = True):
    """DD-Ranking's students' per-image transform: whole-image crop (RDED's scale 1), flip, our normalisation."""
    from torchvision import transforms
    return transforms.Compose([transforms.ToTensor(), transforms.RandomResizedCrop(32, scale=(1, 1), antialias=True),
                               *([transforms.RandomHorizontalFlip()] if flip else []), transforms.Normalize(mean, std)])


@torch.no_grad()
def equivalence(metric, image_folder: str, distilled: str, teacher: Path, mean, std) -> dict:
    """What DD-Ranking's students and teacher see against what ours see, on one set: the input tensors (its
    ImageFolder and transform, flip off, against our decoded and normalised images) and the teacher's logits
    (its loaded ConvNet-3-BN against ours on the same inputs), as largest absolute differences."""
    from torchvision import datasets

    from nrrdd.checkpoint import load_model
    from nrrdd.data import load_distilled
    ours, _ = load_model(teacher)
    folder = datasets.ImageFolder(image_folder, transform=train_transform(mean, std, flip=False))
    x_theirs = torch.stack([folder[i][0] for i in range(len(folder))])
    x_ours = ours.normalize(load_distilled(distilled)[0].images)
    return {"inputs_max_abs_diff": float((x_theirs - x_ours).abs().max()),
            "teacher_logits_max_abs_diff": float((metric.teacher_models[0](x_ours) - ours(x_ours)).abs().max())}


def build_metric(a, data_root: Path, teacher_dir: Path, mean, std, full_acc: float):
    import ddranking.utils.train_and_eval as tae
    from ddranking.metrics import LabelRobustScoreSoft
    from torchvision import transforms
    tae.REAL_DATA_ACC_CACHE["CIFAR10-ConvNet-3-BN"] = full_acc  # instead of hours of full-data training
    train = train_transform(mean, std)
    val = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    return LabelRobustScoreSoft(
        dataset="CIFAR10", real_data_path=str(data_root), ipc=a.ipc, model_name="ConvNet-3-BN",
        soft_label_criterion="kl", loss_fn_kwargs={"temperature": a.temperature, "scale_loss": False},
        data_aug_func="cutmix", aug_params={"beta": 1.0}, soft_label_mode="M", optimizer="adamw",
        lr_scheduler="cosine", weight_decay=0.01, momentum=0.9, num_eval=a.num_eval, im_size=(32, 32),
        num_epochs=a.epochs, random_data_format="image", random_data_path=str(a.work / "random_data"),
        real_batch_size=256, syn_batch_size=a.batch_size, save_path=str(a.work / "ddranking_scores.csv"),
        eval_full_data=False, teacher_dir=str(teacher_dir), teacher_model_names=["ConvNet-3-BN"],
        custom_train_trans=train, custom_val_trans=val, num_workers=0, device=a.device)


def student_run(metric, curve: Curve, kind: str, image_path: str, lr: float, seed: int) -> dict:
    seed_all(seed)
    t0 = time.time()
    if kind == "soft":
        best, _ = metric._compute_soft_label_metrics_helper(None, image_path, None, lr)
    else:
        # hard-label students are tested on DD-Ranking's real test loader, normalised with its CIFAR constants;
        # ours trained on the teacher's statistics, so test them on the loader that shares them
        real, metric.test_loader_real = metric.test_loader_real, metric.test_loader_syn
        best, _ = metric._compute_hard_label_metrics_helper(None, image_path, None, lr, mode="syn")
        metric.test_loader_real = real
    values = curve.take()
    return {"lr": lr, "seed": seed, "best": round(float(best), 2), "final": round(values[-1], 2) if values else None,
            "curve": [round(v, 2) for v in values], "time_s": round(time.time() - t0, 1)}


def shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def ours_by_preset(folder: Path | None) -> dict:
    """Our evaluation records of the same sets (soft labels, ConvNet-3, IPC 10), keyed by preset."""
    if folder is None:
        return {}
    out = {}
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("kind") == "evaluation" and r["config"]["label_mode"] == "sl-online" and r["ipc"] == 10 and \
                r["config"]["student"] == "convnet3" and r["config"]["epochs"] == 300 and \
                r["config"].get("plan_seed", 0) == 0:  # the default recipe; other plans are a side study
            out[r["preset"]] = {"file": shown(f), "test_mean": r["test_mean"],
                                "test_std": r["test_std"], "seeds": r["seeds"],
                                "seed0_test": next(s["test_acc"] for s in r["per_seed"] if s["seed"] == 0),
                                "images_sha256": (r.get("inputs") or {}).get("images_sha256")}
    return out


def write_table(record: dict, path: Path) -> None:
    """The comparison as markdown beside the JSON record."""
    proto = record["protocol"]
    lines = ["| set | ours: nrrdd evaluate, test (final epoch) | IOR (ours) | DD-Ranking soft, final epoch | difference | "
             "DD-Ranking soft (its figure: best test pass) | IOR (DD-Ranking) | DD-Ranking hard | HLR | LRS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ours_random = (record["rows"].get("random", {}).get("ours") or {}).get("seed0_test")
    for name, row in record["rows"].items():
        ours = row.get("ours") or {}
        mine = f"{ours['seed0_test']:.2f} (seed 0; `{ours['file']}`)" if ours else "-"
        gain = f"{ours['seed0_test'] - ours_random:+.2f}" if ours and ours_random and name != "random" else "-"

        def cell(key, fmt="{:.2f}"):
            return fmt.format(row[key]) if row.get(key) is not None else "-"
        lines.append(f"| {name} | {mine} | {gain} | {cell('ddranking_soft_final')} | {cell('difference_final', '{:+.2f}')} | "
                     f"{cell('ddranking_soft_best')} | {cell('ior', '{:+.2f}')} | {cell('ddranking_hard_best')} | "
                     f"{cell('hlr')} | {cell('lrs')} |")
    full = proto["full_data_hard_label_acc"]
    student_min = sum(r["time_s"] for r in record["runs"]) / 60
    text = (f"# DD-Ranking {record['ddranking']} against `nrrdd evaluate`\n\nWritten by `{record['command']}` "
            f"({len(record['runs'])} DD-Ranking students, {student_min:.0f} min in all, one thread each beside other "
            f"jobs, resumed from `runs.json` across invocations; {record['machine_cpus']} CPU cores, "
            f"{record['platform']}; git {record.get('git_commit') or record.get('source_sha256')}). "
            f"CIFAR-10, IPC 10, teacher `{record['teacher']}`; students ConvNet-3-BN, soft labels from the teacher "
            f"on the fly (mode M), KL at T = {proto['temperature']:g}, AdamW lr {proto['lr']:g} wd "
            f"{proto['weight_decay']:g}, cosine to half, CutMix + flip, {proto['epochs']} epochs, batch "
            f"{proto['batch_size']}, seed {proto['seed']}, a test pass every {proto['test_interval']} epochs. "
            "IOR: soft accuracy minus the random set's under the same protocol (DD-Ranking's figures). HLR: "
            f"full-data hard-label accuracy ({full['value']:.2f}: {full['source']}) minus DD-Ranking's hard-label "
            "accuracy of the set (best over the learning rates tried, as DD-Ranking picks it). LRS: DD-Ranking's "
            "score on accuracies as fractions, x 100. Largest differences between what DD-Ranking's and our "
            "students see (inputs) and what the two teachers give (logits), per set: "
            + "; ".join(f"{n} {e['inputs_max_abs_diff']:g} / {e['teacher_logits_max_abs_diff']:g}"
                        for n, e in record.get("equivalence", {}).items()) + ".\n\n" + "\n".join(lines) + "\n")
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", required=True, metavar="NAME=FOLDER",
                   help="distilled folders by preset name; 'random' is the IOR baseline")
    p.add_argument("--ours", type=Path, help="folder of our evaluation records of the same sets")
    p.add_argument("--teacher", type=Path, default=REPO / "teachers" / "cifar10_convnet3_nols15.safetensors")
    p.add_argument("--data", default="cifar10")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=50, help="syn_batch_size (RDED's rule at IPC 10)")
    p.add_argument("--temperature", type=float, default=20.0)
    p.add_argument("--lr", type=float, default=1e-3, help="soft-label learning rate (syn_lr)")
    p.add_argument("--hard", nargs="*", default=[], metavar="NAME", help="sets to train with hard labels (HLR)")
    p.add_argument("--hard-lrs", type=float, nargs="+", default=[0.01])
    p.add_argument("--their-random", action="store_true", help="also a random sample drawn by DD-Ranking")
    p.add_argument("--full", action="store_true", help="also DD-Ranking's own compute_metrics for each non-random "
                   "set: its learning-rate grids (chosen by test accuracy), its random draws, --num-eval repetitions; "
                   "about 11 students per set and repetition (a GPU job)")
    p.add_argument("--num-eval", type=int, default=1, help="compute_metrics repetitions (with --full)")
    p.add_argument("--test-every", type=int, default=20, help="epochs between test passes (DD-Ranking: 20; its "
                   "figure is the best of them, ours the final epoch's; each pass over 10,000 images costs about as "
                   "much as 20 epochs on 100 images, so a CPU run may space them out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "ddranking")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ddranking_check.json")
    a = p.parse_args()
    t0 = time.time()
    if a.threads:
        torch.set_num_threads(a.threads)
    import ddranking

    from nrrdd.data import load_dataset
    from nrrdd.export import export
    from nrrdd.report import label_robust_score
    from nrrdd.runtime import provenance
    sets = dict(s.split("=", 1) for s in a.sets)
    a.work.mkdir(parents=True, exist_ok=True)

    ds = load_dataset(a.data, val_fraction=0.0, progress=False)  # DD-Ranking's training split: all 50,000
    data_root = a.work / "data"
    if not (data_root / "cifar-10-batches-py" / "batches.meta").exists():
        write_cifar_pickles(data_root, (ds.train.images.numpy(), ds.train.labels.numpy()),
                            (ds.test.images.numpy(), ds.test.labels.numpy()), ds.classes)
    accept_local_cifar()
    meta = export_teacher(a.teacher, a.work / "teachers")
    full_acc = float(meta["test_acc"])
    metric = build_metric(a, data_root, a.work / "teachers", meta["mean"], meta["std"], full_acc)
    metric.test_interval = a.test_every
    curve = Curve()
    curve.install()

    from nrrdd.data import load_distilled
    from nrrdd.relabel import images_digest
    folders, digests = {}, {n: images_digest(load_distilled(f)[0].images) for n, f in sets.items()}
    for name, folder in sets.items():
        dest = a.work / "export" / f"{name}@{digests[name][:16]}"  # a set distilled again is exported again
        if not (dest / "export.json").exists():
            export(folder, dest, overwrite=dest.exists())
        folders[name] = str(dest / "image_folder")
    if a.their_random:
        seed_all(a.seed)
        folders["random (DD-Ranking's draw)"] = metric._get_random_data_helper(eval_iter=0)[0]

    same = {n: equivalence(metric, folders[n], sets[n], a.teacher, meta["mean"], meta["std"]) for n in sets}
    runs_file = a.work / "runs.json"  # a killed check resumes: finished students are not retrained
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else {}
    current = {}  # (set, labels, lr) -> this check's student, never one of an earlier set of the same name
    todo = [(n, "soft", a.lr) for n in folders] + [(n, "hard", lr) for n in a.hard for lr in a.hard_lrs]
    for name, kind, lr in todo:
        # the images' digest is in the key: a set distilled again under the same name is trained again, never
        # resumed from a student of its earlier images (DD-Ranking's own random draw is fixed by the seed)
        key = f"{name}|{digests.get(name, 'ddr-draw')[:16]}|{kind}|{lr}|{a.epochs}|{a.seed}|{a.test_every}"
        if key not in runs:
            print(f"{name}: {kind} labels, lr {lr}", flush=True)
            runs[key] = {"set": name, "kind": kind, **student_run(metric, curve, kind, folders[name], lr, a.seed)}
            runs_file.write_text(json.dumps(runs, indent=1))
        current[name, kind, lr] = runs[key]
        print(f"  {name} {kind}: best {runs[key]['best']:.2f}, final {runs[key]['final']}", flush=True)

    full = {}
    if a.full:  # DD-Ranking's figures exactly as its API gives them (its LRS is on the percentage scale)
        for name in (n for n in sets if n != "random"):
            seed_all(a.seed)
            full[name] = {k: float(v) for k, v in metric.compute_metrics(image_path=folders[name], syn_lr=a.lr).items()}
            curve.take()

    ours = ours_by_preset(a.ours)
    rows = {}
    soft = {n: r for (n, kind, _), r in current.items() if kind == "soft"}
    for name in folders:
        if name not in soft:
            continue
        row = {"ddranking_soft_best": soft[name]["best"], "ddranking_soft_final": soft[name]["final"],
               "ours": ours.get(name)}
        if row["ours"]:
            row["ours"]["same_images"] = row["ours"]["images_sha256"] in (None, digests.get(name)) or False
            row["difference_final"] = round(soft[name]["final"] - row["ours"]["seed0_test"], 2)
        hard = [r for (n, kind, _), r in current.items() if kind == "hard" and n == name]
        if hard:
            top = max(hard, key=lambda r: r["best"])  # DD-Ranking's own choice: the best test accuracy
            row["ddranking_hard_best"], row["hard_lr"] = top["best"], top["lr"]
            row["hlr"] = round(full_acc - top["best"], 2)
        if "random" in soft and name != "random":
            row["ior"] = round(soft[name]["best"] - soft["random"]["best"], 2)
        if "hlr" in row and "ior" in row:
            row["lrs"] = label_robust_score(row["ior"], row["hlr"])  # on fractions: its code feeds percentages
        rows[name] = row
    record = {"kind": "benchmark", "schema_version": 1, "benchmark": "ddranking_check",
              "ddranking": getattr(ddranking, "__version__", "0.2.0"), "protocol": {
                  "student": "ConvNet-3-BN", "soft_label_mode": "M", "criterion": "kl", "temperature": a.temperature,
                  "optimizer": "adamw", "weight_decay": 0.01, "lr": a.lr, "lr_scheduler": "cosine (to 0.5)",
                  "epochs": a.epochs, "batch_size": a.batch_size, "augmentation": "cutmix beta 1 + flip",
                  "test_interval": a.test_every, "seed": a.seed, "normalisation": {"mean": meta["mean"], "std": meta["std"]},
                  "full_data_hard_label_acc": {"value": full_acc, "source": "teacher's test accuracy (ConvNet-3-BN,"
                                               " hard labels, 45,000 training images, nrrdd's recipe)"}},
              "teacher": shown(a.teacher),
              "sets": {n: {"folder": str(f), "images_sha256": digests[n]} for n, f in sets.items()}, "rows": rows, "runs": list(current.values()),
              "compute_metrics": full, "equivalence": same,
              "wall_time_s": round(time.time() - t0, 1), **provenance(),
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine_cpus": os.cpu_count(),
              "platform": platform.platform()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=1) + "\n")
    write_table(record, a.out.with_suffix(".md"))
    print(a.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
