"""Train a recipe.

    accelerate launch scripts/finetune.py --recipe recipes/sst2_minilm_lora.yaml train.lr=3e-4 policy.lora.rank=16
    python scripts/finetune.py --help        # lists the shipped recipes
"""

import sys
from pathlib import Path

# This file is named like the package; drop its folder from the path so `import finetune` finds the library.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from finetune.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
