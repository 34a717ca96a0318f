#!/bin/bash
# One GPU session: throughput of each stage, then the grid of benchmarks/configs/gpu_grid.json (or the config
# named by $BENCH_CONFIG). The CIFAR-10 copy arrives as zips in .gpu/
# (git-ignored, made by benchmarks/make_gpu_data.py, carried by the device tool); results are zipped into $OUT
# every 20 s so a timeout still returns finished cells.
# Call as: bash benchmarks/gpu_run.sh (the copy there has no .git: results record the source digest)
for z in c10x c10y; do python3 -m zipfile -e .gpu/$z.zip .gpu; done
export PYTHONPATH=src PYTHONUNBUFFERED=1 NRRDD_CACHE=/tmp/nc
config=${BENCH_CONFIG:-benchmarks/configs/gpu_grid.json}
res=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['results'])" $config)
nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${THROUGHPUT_S:-120} python3 benchmarks/throughput.py --device cuda --seconds 3 && cp benchmarks/results/throughput_*.json $OUT/
python3 -c "from nrrdd.data import load_dataset; load_dataset('.gpu/cifar10', progress=False)"
pack() { mkdir -p runs/bench/distilled; for d in runs/bench*/distilled/*/; do n=$(basename $d); [ -f $d/distill.json ] || continue
  mkdir -p runs/art/$n; cp $d/distill.json $d/pictures/*.png runs/art/$n/ 2>/dev/null; done
  (cd runs && python3 -m zipfile -c /tmp/a.zip art >/dev/null 2>&1 && mv /tmp/a.zip $OUT/distilled_art.zip)
  (cd $(dirname $res) && python3 -m zipfile -c /tmp/r.zip $(basename $res) >/dev/null 2>&1 && mv /tmp/r.zip $OUT/results.zip)
  # the finished seeds of trials still running (unzip into runs/ and the harness joins them on its next run)
  (cd runs && python3 -m zipfile -c /tmp/p.zip */parts >/dev/null 2>&1 && mv /tmp/p.zip $OUT/parts.zip); }
(while true; do sleep 20; pack; done) &
timeout ${GRID_S:-420} python3 benchmarks/harness.py $config 2>&1 | grep -v Warning
pack; ls -la $OUT
