#!/usr/bin/env bash
# Create .venv and install finetune with its test extras. torch is pinned to the CPU wheel
# (an unpinned torch pulls a multi-GB CUDA build); for a GPU, install a CUDA build of torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import torch, transformers, peft, accelerate; print(f'finetune env ready: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}')"
