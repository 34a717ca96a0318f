"""`nrrdd report`: evaluation results -> a markdown table (paper's figure beside ours) and an accuracy-vs-IPC plot."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from nrrdd.io import atomic_path, read_json

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


def row_key(r: dict) -> tuple:
    data = Path(str(r["data"])).name.replace(".npz", "")
    return data, r["config"]["student"], r.get("preset") or "custom", r["config"]["label_mode"], r["ipc"]


def markdown_table(results: list[dict]) -> str:
    lines = ["| data | student | preset | labels | IPC | test top-1 (mean ± std) | seeds | val top-1 | paper | "
             "label payload (B) | wall (s) |", "|---" * 11 + "|"]
    for r in sorted(results, key=lambda r: (row_key(r)[4], row_key(r)[1], row_key(r)[2], row_key(r)[3])):
        k = row_key(r)
        paper = PAPER.get(k if k[3] != "sl-stored" else (*k[:3], "sl-online", k[4]))
        lab = r.get("labels") or {}
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {r['test_mean']:.2f} ± {r['test_std']:.2f} | "
                     f"{len(r['seeds'])} | {r['val_mean']:.2f} | {paper if paper is not None else '-'} | "
                     f"{lab.get('payload_bytes', '-')} | {r['wall_time_s']:.0f} |")
    return "\n".join(lines) + "\n"


def accuracy_plot(results: list[dict], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = defaultdict(dict)
    for r in results:
        k = row_key(r)
        series[f"{k[2]} / {k[3]} / {k[1]}"][k[4]] = (r["test_mean"], r["test_std"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, pts in sorted(series.items()):
        ipcs = sorted(pts)
        ax.errorbar(ipcs, [pts[i][0] for i in ipcs], yerr=[pts[i][1] for i in ipcs], marker="o", capsize=3,
                    label=name, linestyle="-" if name.endswith("convnet3") else "--")
    ax.set_xscale("log")
    ax.set_xlabel("images per class")
    ax.set_ylabel("test top-1 (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def load_results(paths) -> list[dict]:
    files = []
    for p in map(Path, paths):
        files += sorted(p.rglob("results.json")) + sorted(p.glob("*.json")) if p.is_dir() else [p]
    out = [read_json(f) for f in files]
    return [r for r in out if r.get("kind") == "evaluation"]
