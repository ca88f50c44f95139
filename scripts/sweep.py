"""Run, resume or join a sweep.

    python scripts/sweep.py --recipe recipes/sst2_minilm_sweep.yaml sweep.n_trials=3 sweep.dir=sweeps/try
    accelerate launch --multi_gpu --num_processes 2 scripts/sweep.py --recipe recipes/sst2_minilm_sweep.yaml
    python scripts/sweep.py --recipe recipes/sst2_minilm_sweep.yaml --storage postgresql://user@host/db --study s1
"""

import sys
from pathlib import Path

# scripts/finetune.py is named like the package; drop this folder from the path so `import finetune` finds the library.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from finetune.cli import sweep_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(sweep_main())
