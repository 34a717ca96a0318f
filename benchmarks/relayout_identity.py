"""Same seeds, same bytes: run distill (nrrdd, rded), relabel (dbr, sl-stored) and a short evaluate with the
code of a reference commit and with the working tree, and compare what they write: every distilled PNG, the
tensors of synthetic.safetensors and of each label payload, and the per-seed accuracies and weight hashes.
Writes benchmarks/results/relayout_identity.json.

    python benchmarks/relayout_identity.py --reference acb941d     # CIFAR-10, IPC 2, 3 student epochs
    python benchmarks/relayout_identity.py --recorded benchmarks/results/relayout_identity.json   # against it

One intra-op thread for both, since CPU float results depend on the thread count."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "teachers" / "cifar10_convnet3_nols15.safetensors"


def run(src: Path, args: list[str], env: dict) -> None:
    r = subprocess.run([sys.executable, "-m", "nrrdd", *args], env={**env, "PYTHONPATH": str(src)},
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"nrrdd {' '.join(args)} with {src} failed:\n{r.stderr[-2000:]}")


def tensor_digests(path: Path) -> dict:
    from safetensors.torch import load_file
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in load_file(str(path)).items()}


def outputs(root: Path) -> dict:
    """What must not change: name -> digest (or the per-seed numbers)."""
    got = {}
    for preset in ("nrrdd", "rded"):
        d = root / f"distilled_{preset}"
        got.update({f"{preset}/{p.relative_to(d)}": hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in sorted((d / "images").rglob("*.png"))})
        got.update({f"{preset}/synthetic.safetensors:{k}": v for k, v in
                    tensor_digests(d / "synthetic.safetensors").items()})
    for mode in ("dbr", "sl-stored"):
        got.update({f"labels_{mode}:{k}": v for k, v in
                    tensor_digests(root / f"labels_{mode}" / f"labels_{mode}.safetensors").items()})
    for ev in ("sl-online", "dbr"):
        for r in json.loads((root / f"eval_{ev}" / "results.json").read_text())["per_seed"]:
            got[f"eval_{ev}/seed_{r['seed']}"] = {k: r[k] for k in ("val_acc", "test_acc", "weights_sha256")}
    return got


def pipeline(src: Path, root: Path, env: dict, a) -> float:
    t0 = time.time()
    common = ["--device", "cpu", "--quiet"]
    for preset in ("nrrdd", "rded"):
        run(src, ["distill", "--data", a.data, "--teacher", str(TEACHER), "--preset", preset, "--ipc", str(a.ipc),
                  *common, "--out", str(root / f"distilled_{preset}")], env)
    plan = ["--epochs", str(a.epochs)]
    for mode in ("dbr", "sl-stored"):
        run(src, ["relabel", "--distilled", str(root / "distilled_nrrdd"), "--teacher", str(TEACHER),
                  "--label-mode", mode, *plan, *common, "--out", str(root / f"labels_{mode}")], env)
    student = [*plan, "--seeds", str(a.seeds), "--distilled", str(root / "distilled_nrrdd"), *common]
    run(src, ["evaluate", *student, "--out", str(root / "eval_sl-online")], env)
    run(src, ["evaluate", *student, "--label-mode", "dbr", "--labels", str(root / "labels_dbr"),
              "--out", str(root / "eval_dbr")], env)
    return round(time.time() - t0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", default="acb941d", help="commit whose outputs are the reference")
    ap.add_argument("--recorded", help="compare with the outputs recorded in this earlier results file (which matched "
                    "--reference) instead of running the reference again")
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--ipc", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "relayout_identity.json"))
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    git = lambda *c: subprocess.run(["git", *c], cwd=REPO, capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        walls = {}
        if a.recorded:  # outputs of an earlier check that matched the reference: no need to recompute them
            before = json.loads(Path(a.recorded).read_text())["outputs"]
        else:
            ref_src = tmp / "reference"
            ref_src.mkdir()
            archive = subprocess.run(["git", "archive", a.reference, "src"], cwd=REPO, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(ref_src)], input=archive.stdout, check=True)
            walls["reference"] = pipeline(ref_src / "src", tmp / "ref", env, a)
            before = outputs(tmp / "ref")
        walls["working tree"] = pipeline(REPO / "src", tmp / "new", env, a)
        after = outputs(tmp / "new")
    differ = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    from nrrdd.runtime import provenance
    record = {"kind": "benchmark", "benchmark": "relayout_identity", **provenance(),
              "reference_commit": git("rev-parse", a.reference).strip(), "settings": vars(a), "compared": len(before), "identical": not differ, "differing": differ,
              "outputs": after, "wall_time_s": walls, "threads": 1}
    Path(a.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"{len(before)} outputs compared, {len(differ)} differ{': ' + ', '.join(differ[:10]) if differ else ''}"
          f" -> {a.out}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
