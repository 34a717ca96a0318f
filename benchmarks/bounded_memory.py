"""Peak memory (RSS) and wall time of `nrrdd distill` on generated image folders of 100 and 1,000 classes
(50 JPEGs per class at 256 px, a randomly initialised torchvision ResNet-18 teacher imported at 224 px) and on
CIFAR-10 with the default teacher. Each run is a fresh process whose peak RSS comes from wait4.

    python benchmarks/bounded_memory.py --label after                    # the checkout's code
    python benchmarks/bounded_memory.py --label before --src OLD/src     # other code, same runs

Rows are merged into the results file by (label, run), so before/after can come from separate invocations.
The distillation budget is cut (pool, crops, refinement steps: see SETTINGS) to fit 2 CPU cores: it sets how
long the teacher passes take, not what is held in memory, which is what this measures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "bounded_memory"
FOLDERS = {"c100": 100, "c1000": 1000}  # classes of the generated folders, 50 train JPEGs each
SETTINGS = {  # run -> distill flags beyond --data/--teacher/--out
    "c100": ["--preset", "nrrdd", "--ipc", "1", "--pool-per-class", "2", "--crops-per-image", "2", "--iterations", "1"],
    "c1000": ["--preset", "nrrdd", "--ipc", "1", "--pool-per-class", "2", "--crops-per-image", "2", "--iterations", "1"],
    "cifar10": ["--preset", "nrrdd", "--ipc", "10", "--iterations", "2"],
}


def prepare(run: str) -> tuple[str, str]:
    """(data, teacher) of a run; generated folders and their random teachers are made once."""
    if run == "cifar10":
        return "cifar10", str(REPO / "teachers" / "cifar10_convnet3_nols15.safetensors")
    folder, teacher = WORK / "folders" / run, WORK / f"teacher_{run}.safetensors"
    if not folder.exists():
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_image_folders.py"), str(folder),
                        "--classes", str(FOLDERS[run]), "--train", "50", "--test", "2", "--size", "256"], check=True)
    if not teacher.exists():
        weights = WORK / f"resnet18_random_{run}.pth"
        subprocess.run([sys.executable, "-c", "import sys, torch, torchvision; torch.manual_seed(0); torch.save("
                        "torchvision.models.resnet18(weights=None, num_classes=int(sys.argv[1])).state_dict(), "
                        "sys.argv[2])", str(FOLDERS[run]), str(weights)], check=True)
        subprocess.run([sys.executable, "-m", "nrrdd", "import-teacher", "--arch", "resnet18", "--weights",
                        str(weights), "--classes", str(folder / "train"), "--out", str(teacher)], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    return str(folder), str(teacher)


def measure(run: str, src: Path, label: str) -> dict:
    data, teacher = prepare(run)
    out = WORK / "out" / f"{label}_{run}"
    if out.exists():
        shutil.rmtree(out)  # this script's own scratch output
    cmd = [sys.executable, "-m", "nrrdd", "distill", "--data", data, "--teacher", teacher, "--out", str(out),
           "--device", "cpu", "--quiet", *SETTINGS[run]]
    with tempfile.TemporaryDirectory(dir=WORK) as cache:  # code that caches decoded arrays starts cold
        env = {**os.environ, "PYTHONPATH": str(src), "NRRDD_CACHE": cache, "OMP_NUM_THREADS": "1"}
        t = time.time()
        proc = subprocess.Popen(cmd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - t
    row = {"label": label, "run": run, "src": str(src), "command": " ".join(cmd[1:]), "settings": SETTINGS[run],
           "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "wall_s": round(wall, 1),
           "exit_status": os.waitstatus_to_exitcode(status)}
    if row["exit_status"] != 0:  # a run the kernel killed for memory is a result too: its peak is where it died
        row["failed"] = ("killed by signal %d (SIGKILL: the kernel's out-of-memory killer on this machine)"
                         % -row["exit_status"] if row["exit_status"] == -9 else "exited with an error")
        return row
    rec = json.loads((out / "distill.json").read_text())
    return {**row, "timings": rec["timings"], "classes": len(rec["classes"]), "images": len(rec["images"]),
            "train_images": rec["data"]["sizes"]["train"]}


def git_commit(src: Path) -> str:
    r = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True, text=True)
    return (r.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")) if r.returncode == 0 else "not a git checkout"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="row label, e.g. before / after")
    p.add_argument("--src", default=str(REPO / "src"), help="the package source to measure (PYTHONPATH)")
    p.add_argument("--commit", help="the commit --src holds, when it is not a git checkout")
    p.add_argument("--runs", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bounded_memory.json"))
    a = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    dest = Path(a.out)
    doc = json.loads(dest.read_text()) if dest.exists() else {"about": __doc__.strip(), "rows": []}
    for run in a.runs:
        row = measure(run, Path(a.src).resolve(), a.label)
        row.update(commit=a.commit or git_commit(Path(a.src)), machine=f"{platform.node()} {os.cpu_count()} cpus",
                   date=time.strftime("%Y-%m-%d %H:%M:%S"), command_line=" ".join(sys.argv))
        doc["rows"] = [r for r in doc["rows"] if (r["label"], r["run"]) != (a.label, run)] + [row]
        dest.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"{a.label} {run}: peak RSS {row['peak_rss_mb']:.0f} MB, {row['wall_s']:.0f} s {row.get('failed', '')}",
              flush=True)


if __name__ == "__main__":
    main()
