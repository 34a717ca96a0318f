#!/bin/bash
# Every label mode end to end on this machine's CPU: the nrrdd IPC 10 set made by benchmarks/distill_timing.py,
# one student seed each (the 3-seed figures come from the GPU grid in cifar10_convnet/cells/).
set -e
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results/label_modes_cpu
for mode in sl-online sl-stored dbr onehot compact; do
  .venv/bin/nrrdd evaluate --distilled runs/timing/nrrdd_ipc10 --label-mode $mode --seeds 1 --device cpu \
      --out runs/label_modes_cpu/$mode --resume --quiet
  cp runs/label_modes_cpu/$mode/results.json benchmarks/results/label_modes_cpu/$mode.json
done
