#!/bin/bash
# Does the teacher's label smoothing cost the students? On 2 CPU cores: a teacher without it (calibration.md's
# recipe: 15 epochs, one-cycle to lr 0.05, no label smoothing; ~55 min), then the IPC 10 cells of random, rded,
# cidd and nrrdd with its soft labels and the committed search's settings. Compare on the VALIDATION split
# with benchmarks/results/cifar10_convnet (the committed teacher, label smoothing 0.1). Resumable; SEEDS=3
# extends the cells of an earlier SEEDS=1 run.
set -e
cd "$(dirname "$0")/.."
res=benchmarks/results/cifar10_convnet_nols15
.venv/bin/nrrdd train-teacher --data cifar10 --epochs 15 --lr 0.05 --label-smoothing 0 --out runs/nols15/teacher \
    --resume --quiet --device cpu
mkdir -p $res teachers
cp runs/nols15/teacher/teacher.safetensors teachers/cifar10_convnet3_nols15.safetensors
cp runs/nols15/teacher/results.json $res/teacher.json
cp benchmarks/results/cifar10_convnet/chosen.json $res/chosen.json
BENCH_TEACHER=teachers/cifar10_convnet3_nols15.safetensors BENCH_RESULTS=$res BENCH_WORK=runs/bench_nols15 \
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cifar10_convnet.py grid --ipc 10 --presets random rded cidd nrrdd \
    --modes sl-online --grid-seeds ${SEEDS:-1} --workers 2 --device cpu
