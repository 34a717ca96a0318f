#!/bin/bash
# The CIFAR-10 benchmark on 2 CPU cores with a teacher without label smoothing. Every step is resumable and
# skips what is done (rerunning the script reproduces or completes benchmarks/results/cifar10_convnet_nols15/):
#  1. the teacher (calibration.md's recipe, now the train-teacher defaults: 15 epochs, one-cycle to lr 0.05,
#     no label smoothing; ~50 min);
#  2. IPC 10 for random, rded, cidd, nrrdd with soft labels, 1 seed, with the settings the earlier search chose
#     (with the label-smoothing teacher) -- compared on VALIDATION with benchmarks/results/cifar10_convnet/;
#  3. one more validation round for the refinement step size with this teacher;
#  4. nrrdd's label modes at IPC 10 and IPC 50 for rded and nrrdd, 1 seed; then IPC 10 to 3 seeds.
set -e
cd "$(dirname "$0")/.."
res=benchmarks/results/cifar10_convnet_nols15
.venv/bin/nrrdd train-teacher --data cifar10 --epochs 15 --lr 0.05 --label-smoothing 0 --out runs/nols15/teacher \
    --resume --quiet --device cpu
mkdir -p $res teachers
cmp -s runs/nols15/teacher/teacher.safetensors teachers/cifar10_convnet3_nols15.safetensors ||
    cp runs/nols15/teacher/teacher.safetensors teachers/cifar10_convnet3_nols15.safetensors
cp runs/nols15/teacher/results.json $res/teacher.json
[ -f $res/chosen.json ] || cp benchmarks/results/cifar10_convnet/chosen.json $res/chosen.json
export OMP_NUM_THREADS=1  # two 1-thread workers beat one 2-thread process on small batches
b=".venv/bin/python benchmarks/cifar10_convnet.py"
$b grid --ipc 10 --presets random rded cidd nrrdd --modes sl-online --grid-seeds 1 --workers 2 --device cpu
$b search-round --round lr '{"lr": [0.003, 0.01, 0.03]}' --seeds 1 --workers 2 --device cpu
$b grid --ipc 10 --presets nrrdd --modes sl-online dbr onehot compact --grid-seeds 1 --workers 2 --device cpu
$b grid --ipc 50 --presets rded nrrdd --modes sl-online --grid-seeds 1 --workers 2 --device cpu
$b grid --ipc 10 --presets random rded cidd nrrdd --modes sl-online dbr onehot compact --grid-seeds 3 --workers 2 \
    --device cpu
