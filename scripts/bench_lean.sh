#!/usr/bin/env bash
# From a fine-tuned model to a served one on SST-2 (benchmarks/lean): the models, then one measuring invocation.
#
#   bash scripts/bench_lean.sh [RUNS_DIR]     # default sweeps/lean; a model already there is reused
#
# 1. teacher-L6:  the sst2_minilm_full recipe on all 60,614 training rows, 1 epoch (validation every 500 steps)
# 2. pruned-L3:   its first 3 layers (and its head) + a 1-epoch recovery fine-tune on the gold labels (finetune prune)
# 3. student-L3:  the same 3 layers and head, 3 epochs distilled from the teacher (finetune distill; alpha 0.5, T 2)
# 4. student-L2:  the first 2 layers, distilled the same way
# 5. teacher-ens: the teacher and a second one (seed 2) averaged (finetune ensemble), and student-L3-ens distilled
#    from it the same way (starting from its better member on validation)
# then scripts/bench_lean.py exports each run to ONNX fp32 / ONNX int8 / PyTorch int8 and measures every runtime.
# The recipes set train.cpu_threads=1; two of these steps can run side by side, each pinned to its own core
# (taskset -c 0 / -c 1), but never beside the measuring step.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-sweeps/lean}"
FT=.venv/bin/finetune
mkdir -p "$RUNS"
[ -f "$RUNS/teacher/metrics.json" ] || $FT train --recipe sst2_minilm_full train.epochs=1 train.eval_every=500 \
    train.cpu_threads=1 output.dir="$RUNS/teacher" --quiet
[ -f "$RUNS/pruned-L3/metrics.json" ] || $FT prune --model "$RUNS/teacher" --method layers --layers-kept 3 \
    --layer-selection first --finetune-epochs 1 --output "$RUNS/pruned-L3" --quiet
[ -f "$RUNS/student-L3/metrics.json" ] || $FT distill --teacher "$RUNS/teacher" --layers 3 train.epochs=3 \
    output.dir="$RUNS/student-L3" --quiet
[ -f "$RUNS/student-L2/metrics.json" ] || $FT distill --teacher "$RUNS/teacher" --layers 2 train.epochs=3 \
    output.dir="$RUNS/student-L2" --quiet
[ -f "$RUNS/teacher-s2/metrics.json" ] || $FT train --recipe sst2_minilm_full train.epochs=1 train.eval_every=500 \
    train.cpu_threads=1 train.seed=2 output.dir="$RUNS/teacher-s2" --quiet
[ -f "$RUNS/teacher-ens/ensemble.json" ] || $FT ensemble --models "$RUNS/teacher" "$RUNS/teacher-s2" \
    --output "$RUNS/teacher-ens" --quiet
[ -f "$RUNS/student-L3-ens/metrics.json" ] || $FT distill --teacher "$RUNS/teacher-ens" --layers 3 train.epochs=3 \
    output.dir="$RUNS/student-L3-ens" --quiet
.venv/bin/python scripts/bench_lean.py --model teacher-L6="$RUNS/teacher" --model teacher-ens="$RUNS/teacher-ens" \
    --model pruned-L3="$RUNS/pruned-L3" --model student-L3="$RUNS/student-L3" \
    --model student-L3-ens="$RUNS/student-L3-ens" --model student-L2="$RUNS/student-L2" --baseline teacher-L6 \
    --out-dir benchmarks/lean --exports-dir "$RUNS/exports"
