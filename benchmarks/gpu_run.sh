#!/bin/bash
# One GPU session of the CIFAR-10 benchmark: validation search, then the grid. The CIFAR-10 copy arrives as
# zips in .gpu/ (git-ignored, carried by the device tool); results are zipped into $OUT every 20 s so a
# timeout still returns finished cells.
for z in c10x c10y; do python3 -m zipfile -e .gpu/$z.zip .gpu; done
# Call as: NRRDD_GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_run.sh (the copy there has no .git)
export PYTHONPATH=src PYTHONUNBUFFERED=1 NRRDD_CACHE=/tmp/nc BENCH_DATA=.gpu/cifar10
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "from nrrdd.data import load_dataset; load_dataset('.gpu/cifar10', progress=False)"
pack() { mkdir -p runs/bench/distilled; for d in runs/bench/distilled/*/; do n=$(basename $d); [ -f $d/distill.json ] || continue
  mkdir -p runs/art/$n; cp $d/distill.json $d/pictures/*.png runs/art/$n/ 2>/dev/null; done
  (cd runs && python3 -m zipfile -c /tmp/a.zip art >/dev/null 2>&1 && mv /tmp/a.zip $OUT/distilled_art.zip)
  (cd benchmarks/results && python3 -m zipfile -c /tmp/r.zip cifar10_convnet >/dev/null 2>&1 && mv /tmp/r.zip $OUT/results.zip); }
(while true; do sleep 20; pack; done) &
timeout ${SEARCH_S:-200} python3 benchmarks/cifar10_convnet.py search --workers 14 --seeds 1 2>&1 | grep -v Warning
timeout ${GRID_S:-300} python3 benchmarks/cifar10_convnet.py grid --workers 14 --ipc 10 1 50 --students convnet3 resnet18 2>&1 | grep -v Warning
pack; ls -la $OUT
