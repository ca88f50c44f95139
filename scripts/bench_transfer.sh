#!/usr/bin/env bash
# Intermediate-task transfer, measured: TREC question types with 500 training rows, trained from the plain
# all-MiniLM-L6-v2 vs from a run first fine-tuned on AG News topics (8,000 rows, 1 epoch), same budget,
# 3 seeds. One `finetune compare` invocation trains both variants side by side and writes the curves.
#
#   bash scripts/bench_transfer.sh [WORK_DIR]      (default sweeps/bench_transfer; results: benchmarks/transfer/)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-sweeps/bench_transfer}
FT=${FT:-.venv/bin/finetune}
mkdir -p "$WORK"
# the intermediate run (reused when already finished)
if [ ! -f "$WORK/agnews_full/metrics.json" ]; then
  "$FT" train --recipe agnews_minilm_lora policy.kind=full train.lr=5e-5 train.epochs=1 data.max_length=64 \
    output.dir="$WORK/agnews_full" --quiet --overwrite
fi
"$FT" compare --recipe trec_minilm_full \
  --variants "pretrained,from_agnews:backbone.name=$WORK/agnews_full" --seeds 1,2,3 \
  data.max_train_samples=500 train.epochs=10 train.eval_every=16 \
  --output benchmarks/transfer/trec500_from_agnews --runs-dir "$WORK/runs"
