"""`nrrdd report`: evaluation results -> a markdown table (paper's figure beside ours) and an accuracy-vs-IPC plot."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from nrrdd import NrrddError
from nrrdd.files import atomic_path, read_json, require_intact, write_bytes
from nrrdd.outdir import MANIFEST


# Paper figures (top-1 %, Tables 1, 2 and 4). Keys: (data, student, preset, label mode, ipc).
PAPER = {
    **{("cifar10", "convnet3", "rded", "sl-online", i): v for i, v in zip((1, 10, 50), (23.5, 50.2, 68.4))},
    **{("cifar10", "convnet3", "nrrdd", "sl-online", i): v for i, v in zip((1, 10, 50), (48.4, 66.7, 73.1))},
    ("cifar10", "convnet3", "cidd", "sl-online", 10): 51.3,
    **{("cifar100", "convnet3", "rded", "sl-online", i): v for i, v in zip((1, 10, 50), (19.6, 48.1, 57.0))},
    **{("cifar100", "convnet3", "nrrdd", "sl-online", i): v for i, v in zip((1, 10, 50), (27.3, 55.7, 61.1))},
    **{("cifar10", "resnet18", "rded", "sl-online", i): v for i, v in zip((1, 10, 50), (22.9, 37.1, 62.1))},
    **{("cifar10", "resnet18", "sre2l", "sl-online", i): v for i, v in zip((1, 10, 50), (16.6, 29.3, 45.0))},
    **{("cifar10", "resnet18", "nrrdd", "sl-online", i): v for i, v in zip((1, 10, 50), (30.3, 72.2, 84.1))},
}
# Table 2 is on ImageNette, so its label-mode figures are shown as a note, not beside CIFAR-10 cells.
PAPER_LABELS_IMAGENETTE = {"sl": 68.3, "onehot": 27.3, "compact": 37.3, "dbr": 52.2, "dbr+lr": 55.1}


REPORT_HEADER = "<!-- written by nrrdd report -->"


def row_key(r: dict) -> tuple:
    data = Path(str(r["data"])).name.replace(".npz", "")
    return data, r["config"]["student"], r.get("preset") or "custom", r["config"]["label_mode"], r["ipc"]


def _accuracy(r: dict, key: str) -> str:
    mean, std = r[f"{key}_mean"], r[f"{key}_std"]
    return f"{mean:.2f} ± {std:.2f}" if len(r["seeds"]) > 1 else f"{mean:.2f} (1 seed)"


# ---------------------------------------------------------------- DD-Ranking's fair metrics (arXiv 2505.13300)

_NOT_RECIPE = ("seeds", "first_seed", "checkpoint_every", "baseline", "data")


def _same_recipe(a: dict, b: dict) -> bool:
    """Two records whose students differ only in the images: same data, student recipe, labels, teacher, IPC and
    storage (beta)."""
    def key(r):
        cfg = {k: v for k, v in r["config"].items() if k not in _NOT_RECIPE}
        return (row_key(r)[0], row_key(r)[4], Path(str(r.get("teacher"))).name,
                (r.get("distilled_config") or {}).get("beta", 1), sorted(cfg.items()))
    return key(a) == key(b)


def matched_difference(a: dict, b: dict, key: str = "test_acc") -> float:
    """Mean of a - b over the student seeds both records trained (a 1-seed trial against seed 0 of a 3-seed
    row), so seed luck does not enter the difference; the plain means' difference when they share none."""
    x, y = ({s["seed"]: s[key] for s in r.get("per_seed", [])} for r in (a, b))
    common = sorted(set(x) & set(y))
    if not common:
        return round(a[key.replace("_acc", "_mean")] - b[key.replace("_acc", "_mean")], 2)
    return round(sum(x[s] - y[s] for s in common) / len(common), 2)


def improvement_over_random(r: dict, results: list[dict]) -> tuple[float, str] | None:
    """IOR, test points: the record's own --baseline random, else a random-preset record of the same recipe."""
    if r.get("ior"):
        return r["ior"]["test"], "baseline"
    if r.get("preset") == "random":
        return None
    rand = [o for o in results if o.get("preset") == "random" and _same_recipe(r, o)]
    return (matched_difference(r, rand[0]), "random row") if rand else None


def _full_data_accuracy(r: dict) -> float | None:
    """Hard-label accuracy of the student architecture trained on the full training split: the teacher's, when
    the teacher is that architecture (it was trained on hard labels on that split)."""
    if r.get("teacher_arch") not in (None, r["config"]["student"]):
        return None
    if r.get("teacher_test_acc") is not None:
        return r["teacher_test_acc"]
    try:  # records written before teacher_test_acc: the checkpoint's header holds it
        from nrrdd.checkpoint import read_meta
        meta = read_meta(r["teacher"])
    except (NrrddError, TypeError):
        return None
    return meta.get("test_acc") if meta.get("arch") == r["config"]["student"] else None


def hard_label_recovery(r: dict, results: list[dict]) -> float | None:
    """HLR, test points: full-data hard-label accuracy minus the same images' accuracy with hard (one-hot)
    labels, from a one-hot record of the same distilled set."""
    def images(o):
        return (o.get("inputs") or {}).get("images_sha256") or o.get("distilled")
    hard = [o for o in results if o["config"]["label_mode"] == "onehot" and images(o) is not None and
            images(o) == images(r) and o["config"]["student"] == r["config"]["student"]]
    full = _full_data_accuracy(r) if hard else None
    return None if full is None else round(full - hard[0]["test_mean"], 2)


def label_robust_score(ior: float, hlr: float, lam: float = 0.5) -> float:
    """LRS in [0, 100]: DD-Ranking's (e^a - e^-1) / (e - e^-1), a = lam IOR - (1 - lam) HLR, accuracies as
    fractions (so a lies in [-1, 1])."""
    a = lam * ior / 100 - (1 - lam) * hlr / 100
    return round(100 * (math.exp(a) - math.exp(-1)) / (math.e - math.exp(-1)), 2)


def fair_metrics(r: dict, results: list[dict]) -> dict:
    ior, hlr = improvement_over_random(r, results), hard_label_recovery(r, results)
    return {"ior": ior, "hlr": hlr, "lrs": label_robust_score(ior[0], hlr) if ior and hlr is not None else None}


def markdown_table(results: list[dict]) -> str:
    lines = [REPORT_HEADER, "", "| data | student | preset | labels | IPC | test top-1 (mean ± std) | seeds "
             "| val top-1 | paper | IOR | HLR | LRS | label payload (B) | wall (s) | from |", "|---" * 15 + "|"]
    for r in sorted(results, key=lambda r: (row_key(r)[4], row_key(r)[1], row_key(r)[2], row_key(r)[3])):
        k = row_key(r)
        paper = PAPER.get(k if k[3] != "sl-stored" else (*k[:3], "sl-online", k[4]))
        lab = r.get("labels") or {}
        m = fair_metrics(r, results)
        ior = "-" if m["ior"] is None else f"{m['ior'][0]:+.2f}" + ("" if m["ior"][1] == "baseline" else "ʳ")
        hlr = "-" if m["hlr"] is None else f"{m['hlr']:.2f}"
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {_accuracy(r, 'test')} | {len(r['seeds'])} | "
                     f"{_accuracy(r, 'val')} | {paper if paper is not None else '-'} | {ior} | "
                     f"{hlr} | "
                     f"{'-' if m['lrs'] is None else m['lrs']} | "
                     f"{lab.get('payload_bytes', '-')} | {r['wall_time_s']:.0f} | {r.get('_source', '-')} |")
    return "\n".join(lines) + "\n\n" + METRICS_NOTE + "\n"


METRICS_NOTE = ("IOR: improvement over random real images, test points (`evaluate --baseline random`: the same "
                "students, labels and plan on the random preset's images; ʳ: against a random-preset row of the same "
                "recipe in this table, on the seeds both trained). HLR: hard-label recovery, full-data hard-label "
                "accuracy (the teacher's, when it is the student's architecture) minus the same images' one-hot "
                "accuracy. LRS: DD-Ranking's label-robust score, 100 (e^a - e^-1) / (e - e^-1) with a = (IOR - HLR) "
                "/ 200.")


def accuracy_plot(results: list[dict], path) -> None:
    """Accuracy against IPC, one line per preset / labels / student, and beside it the improvement over random
    (IOR) where known; with a single IPC, a bar per series with its seeds as dots and its IOR written over it
    (a log-x line plot would stack every point on one vertical)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = defaultdict(dict)
    for r in results:
        k = row_key(r)
        series[f"{k[2]} / {k[3]} / {k[1]}"][k[4]] = r
    ior = {id(r): m[0] for r in results if (m := improvement_over_random(r, results))}
    ipcs = sorted({row_key(r)[4] for r in results})
    if len(ipcs) == 1:
        names = sorted(series)
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 2), 4.5))
        for i, name in enumerate(names):
            r = series[name][ipcs[0]]
            ax.bar(i, r["test_mean"], color="C0" if "random" not in name else "0.6", alpha=0.8)
            seeds = [s["test_acc"] for s in r.get("per_seed", [])]
            ax.plot([i] * len(seeds), seeds, "k.", ms=6)
            gain = f"\nIOR {ior[id(r)]:+.1f}" if id(r) in ior else ""
            ax.text(i, r["test_mean"] + 0.5, f"{r['test_mean']:.1f}{gain}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, min(100, 1.2 * max(r["test_mean"] for r in results) + 4))
        ax.set_title(f"IPC {ipcs[0]}", fontsize=10)
        ax.set_ylabel("test top-1 (%): bar mean, dots seeds")
        axes = [ax]
    else:
        fig, axes = plt.subplots(1, 2 if ior else 1, figsize=(14 if ior else 9, 4.5), squeeze=False,
                                 sharex=True)
        axes = list(axes[0])
        for name, pts in sorted(series.items()):
            xs = sorted(pts)
            style = "-" if name.endswith("convnet3") else "--"
            line = axes[0].errorbar(xs, [pts[i]["test_mean"] for i in xs], yerr=[pts[i]["test_std"] for i in xs],
                                    marker="o", capsize=3, label=name, linestyle=style)
            gains = [(i, ior[id(pts[i])]) for i in xs if id(pts[i]) in ior]
            if gains:
                axes[1].plot(*zip(*gains), marker="o", linestyle=style, color=line[0].get_color(), label=name)
        axes[0].set_ylabel("test top-1 (%), mean ± std over seeds")
        axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0) if not ior else (0, 1))
        if ior:
            axes[1].axhline(0, color="0.5", lw=0.8)
            axes[1].set_ylabel("IOR: test points over random real images")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("images per class")
    for ax in axes:
        ax.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", metadata={"Software": "nrrdd report"})
    plt.close(fig)


def load_results(paths, verify: bool = True) -> list[dict]:
    """Evaluation results from files or folders (searched recursively), each file once. A results file inside
    an nrrdd output folder must still match that folder's manifest."""
    files: dict[Path, None] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise NrrddError(f"{p}: no such file or folder")
        for f in (sorted(p.rglob("*.json")) if p.is_dir() else [p]):
            files.setdefault(f.resolve(), None)
    out = []
    for f in files:
        if f.name == MANIFEST:
            continue
        r = read_json(f)
        if not isinstance(r, dict) or r.get("kind") != "evaluation":
            continue
        if verify and (f.parent / MANIFEST).exists():
            require_intact(f.parent, "results folder")
        out.append({**r, "_source": _relative(f)})
    return out


def _relative(f: Path) -> str:
    try:
        return str(f.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(f)


def write_report(results: list[dict], out, plot=None) -> str:
    """The table to `out` and the plot beside it (or to `plot`); a file there that nrrdd did not write stays."""
    out = Path(out)
    plot = Path(plot) if plot else out.with_suffix(".png")
    for f, ours in ((out, lambda f: f.read_text(errors="replace").startswith(REPORT_HEADER)),
                    (plot, lambda f: _png_by_nrrdd(f))):
        if f.exists() and not (f.is_file() and ours(f)):
            raise NrrddError(f"{f}: exists and was not written by nrrdd report; choose another --out / --plot")
    table = markdown_table(results)
    write_bytes(out, table.encode())
    accuracy_plot(results, plot)
    return table


def _png_by_nrrdd(f: Path) -> bool:
    from PIL import Image
    try:
        with Image.open(f) as im:
            return im.info.get("Software") == "nrrdd report"
    except Exception:
        return False
