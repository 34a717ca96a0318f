"""How soft are a teacher's labels? Mean top probability of softmax(z / T) and the mean per-image std of the
logits z on the first 2,000 validation images, for each teacher given; writes
benchmarks/results/teacher_softness.json.

    python benchmarks/teacher_softness.py teachers/cifar10_convnet3.safetensors teachers/cifar10_convnet3_nols15.safetensors
"""
import sys
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[1]

from nrrdd.checkpoint import load_model
from nrrdd.data import load_dataset
from nrrdd.files import write_json
from nrrdd.runtime import provenance


t0 = time.time()
ds = load_dataset("cifar10", progress=False)
x = ds.val.images[:2000]
rows = []
for path in sys.argv[1:]:
    model, meta = load_model(path, classes=ds.classes, device=torch.device("cpu"))
    with torch.no_grad():
        z = model(model.normalize(x))
    rows.append({"teacher": path, "recipe": meta.get("recipe"), "test_acc": meta.get("test_acc"),
                 "logit_std": round(z.std(1).mean().item(), 3),
                 "top_prob": {T: round(torch.softmax(z / T, 1).max(1).values.mean().item(), 4) for T in (1, 4, 20)}})
    print(rows[-1]["teacher"], rows[-1]["logit_std"], rows[-1]["top_prob"])
write_json(REPO / "benchmarks" / "results" / "teacher_softness.json",
           {"kind": "benchmark", "benchmark": "teacher_softness", "images": "first 2000 validation images of cifar10", "teachers": rows,
            "wall_time_s": round(time.time() - t0, 1), **provenance()})
