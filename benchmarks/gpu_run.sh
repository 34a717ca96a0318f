#!/bin/bash
# One GPU session: throughput of each stage, then the grid of benchmarks/configs/gpu_grid.json (or the config
# named by $BENCH_CONFIG). The data sets arrive as byte parts of zips in .gpu/ (git-ignored, made by
# benchmarks/make_gpu_data.py, carried by the device tool one part per call); results are zipped into $OUT
# every 20 s so a timeout still returns finished cells.
# Call as: bash benchmarks/gpu_run.sh (the copy there has no .git: results record the source digest), e.g. two
# device calls: `true` carrying .gpu/cifar100.zip.0, then
# `BENCH_CONFIG=benchmarks/configs/gpu_cifar100.json bash benchmarks/gpu_run.sh` carrying .gpu/cifar100.zip.1.
# Join each set's parts once all have arrived (a zip whose parts are missing fails the test) and lay it out as
# ../shared/datasets does, so configs and records name the set (cifar10), not a path.
for name in cifar10 cifar100; do
  [ -e .gpu/$name.zip.0 ] && [ ! -e .gpu/$name ] || continue
  cat .gpu/$name.zip.[0-9] > /tmp/$name.zip && python3 -m zipfile -t /tmp/$name.zip >/dev/null || continue
  if [ $name = cifar100 ]; then mkdir -p .gpu/cifar100 && mv /tmp/$name.zip .gpu/cifar100/cifar100.zip
  else python3 -m zipfile -e /tmp/$name.zip .gpu; fi
done
export PYTHONPATH=src PYTHONUNBUFFERED=1 NRRDD_CACHE=/tmp/nc NRRDD_DATA=$PWD/.gpu
config=${BENCH_CONFIG:-benchmarks/configs/gpu_grid.json}
read res data < <(python3 -c "import json, sys; c = json.load(open(sys.argv[1])); print(c['results'], c['data'])" $config)
nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${THROUGHPUT_S:-120} python3 benchmarks/throughput.py --device cuda --seconds 3 && cp benchmarks/results/throughput_*.json $OUT/
python3 -c "import sys; from nrrdd.data import load_dataset; load_dataset(sys.argv[1], progress=False)" $data || exit 1
pack() { for d in runs/*/distilled/*/; do n=$(basename $d); [ -f $d/distill.json ] || continue
  mkdir -p runs/art/$n; cp $d/distill.json $d/pictures/*.png runs/art/$n/ 2>/dev/null; done
  (cd runs && python3 -m zipfile -c /tmp/a.zip art >/dev/null 2>&1 && mv /tmp/a.zip $OUT/distilled_art.zip)
  (cd $(dirname $res) && python3 -m zipfile -c /tmp/r.zip $(basename $res) >/dev/null 2>&1 && mv /tmp/r.zip $OUT/results.zip)
  # the finished seeds of trials still running (unzip into runs/ and the harness joins them on its next run)
  (cd runs && python3 -m zipfile -c /tmp/p.zip */parts >/dev/null 2>&1 && mv /tmp/p.zip $OUT/parts.zip); }
(while true; do sleep 20; pack; done) &
timeout ${GRID_S:-420} python3 benchmarks/harness.py $config 2>&1 | grep -v Warning
pack; ls -la $OUT
