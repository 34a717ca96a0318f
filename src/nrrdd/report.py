"""`nrrdd report`: evaluation results -> a markdown table (paper's figure beside ours) and an accuracy-vs-IPC plot."""
from __future__ import annotations

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


def markdown_table(results: list[dict]) -> str:
    lines = [REPORT_HEADER, "", "| data | student | preset | labels | IPC | test top-1 (mean ± std) | seeds | val top-1 | "
             "paper | label payload (B) | wall (s) | from |", "|---" * 12 + "|"]
    for r in sorted(results, key=lambda r: (row_key(r)[4], row_key(r)[1], row_key(r)[2], row_key(r)[3])):
        k = row_key(r)
        paper = PAPER.get(k if k[3] != "sl-stored" else (*k[:3], "sl-online", k[4]))
        lab = r.get("labels") or {}
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {_accuracy(r, 'test')} | {len(r['seeds'])} | "
                     f"{_accuracy(r, 'val')} | {paper if paper is not None else '-'} | "
                     f"{lab.get('payload_bytes', '-')} | {r['wall_time_s']:.0f} | {r.get('_source', '-')} |")
    return "\n".join(lines) + "\n"


def accuracy_plot(results: list[dict], path) -> None:
    """Accuracy against IPC, one line per preset / labels / student; with a single IPC, a bar per series with
    its seeds as dots, on an axis from 0 (a log-x line plot would stack every point on one vertical)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = defaultdict(dict)
    for r in results:
        k = row_key(r)
        series[f"{k[2]} / {k[3]} / {k[1]}"][k[4]] = r
    ipcs = sorted({row_key(r)[4] for r in results})
    if len(ipcs) == 1:
        names = sorted(series)
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 2), 4.5))
        for i, name in enumerate(names):
            r = series[name][ipcs[0]]
            ax.bar(i, r["test_mean"], color="C0" if "random" not in name else "0.6", alpha=0.8)
            seeds = [s["test_acc"] for s in r.get("per_seed", [])]
            ax.plot([i] * len(seeds), seeds, "k.", ms=6)
            ax.text(i, r["test_mean"] + 0.5, f"{r['test_mean']:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, min(100, 1.15 * max(r["test_mean"] for r in results) + 2))
        ax.set_title(f"IPC {ipcs[0]}", fontsize=10)
        ax.set_ylabel("test top-1 (%): bar mean, dots seeds")
    else:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for name, pts in sorted(series.items()):
            xs = sorted(pts)
            ax.errorbar(xs, [pts[i]["test_mean"] for i in xs], yerr=[pts[i]["test_std"] for i in xs], marker="o",
                        capsize=3, label=name, linestyle="-" if name.endswith("convnet3") else "--")
        ax.set_xscale("log")
        ax.set_xlabel("images per class")
        ax.set_ylabel("test top-1 (%), mean ± std over seeds")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
