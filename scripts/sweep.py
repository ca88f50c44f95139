"""Run, resume or join a sweep.

    python scripts/sweep.py --recipe recipes/sst2_minilm_sweep.yaml sweep.n_trials=3 sweep.dir=sweeps/try
    accelerate launch --multi_gpu --num_processes 2 scripts/sweep.py --recipe recipes/sst2_minilm_sweep.yaml
    python scripts/sweep.py --recipe recipes/sst2_minilm_sweep.yaml --storage postgresql://user@host/db --study s1
"""

import sys

from finetune.cli import sweep_main

if __name__ == "__main__":
    sys.exit(sweep_main())
