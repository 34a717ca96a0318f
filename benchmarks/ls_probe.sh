#!/bin/bash
# Does the teacher's label smoothing cost the students? A short CPU teacher without it (8 epochs), then the
# rded preset at IPC 10 and one student, compared on the VALIDATION split with the committed teacher's
# rded cell (cifar10_convnet/cells/ipc10_rded_sl-online_convnet3.json).
set -e
cd "$(dirname "$0")/.."
out=benchmarks/results/ls_probe; mkdir -p $out
.venv/bin/nrrdd train-teacher --data cifar10 --epochs 8 --label-smoothing 0 --out runs/ls_probe/teacher --resume --quiet --device cpu
cp runs/ls_probe/teacher/results.json $out/teacher_nols_e8.json
.venv/bin/nrrdd distill --data cifar10 --teacher runs/ls_probe/teacher/teacher.safetensors --preset rded --ipc 10 --out runs/ls_probe/rded --resume --quiet --device cpu
.venv/bin/nrrdd evaluate --distilled runs/ls_probe/rded --seeds 1 --out runs/ls_probe/eval --resume --quiet --device cpu
cp runs/ls_probe/eval/results.json $out/rded_ipc10_nols_teacher.json
