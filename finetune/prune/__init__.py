"""Prune a finished run: weights by magnitude, attention heads, or whole encoder layers.

    finetune prune --model RUN_DIR --method magnitude --sparsity 0.5 --finetune-epochs 1
    finetune prune --model RUN_DIR --method heads --heads-fraction 0.25
    finetune prune --model RUN_DIR --method layers --layers-kept 3 --layer-selection first

or a recipe's ``prune:`` section (``PruneConfig``), applied to the best model after training.
``prune_run`` reads as the story: load the run (a LoRA adapter is merged into its base first),
measure it, prune, optionally fine-tune to recover, measure again, and save the pruned model as
a complete run folder (loads with ``load_run``, ``finetune eval`` / ``predict``) holding
``prune_report.json`` and ``prune_report.md``.

Methods:
  magnitude  global L1 unstructured pruning over the backbone's linear layers (attention query/key/
             value/output and feed-forward weights): exactly round(sparsity x their weights) are set
             to zero, then made permanent. Embeddings, LayerNorms, biases and the small task head are
             left alone. The tensors stay dense, so the files are as large as before (the report
             also gives a compressed size, where the zeros show).
  heads      attention heads ranked by importance on validation data (Michel et al. 2019: |d loss / d
             gate| of a gate on each head's output, normalised per layer), the least important
             ``heads_fraction`` of all heads removed for real (smaller query/key/value and output
             projections). Every layer keeps at least one head.
  layers     keep ``layers_kept`` encoder layers: the first ones, or by importance (greedily drop the
             layer whose removal raises validation loss least).

The recovery fine-tune (``finetune_epochs``) is the run's own lifecycle (``finetune.run.train_run``) on
the pruned model: every remaining weight trains, whatever the run's policy, evaluated like any run, and the
best evaluation's weights are kept; under magnitude pruning the masks stay in place during it, so the
sparsity is still exact at the end.
Pruning runs in a single process (see ``check_single_process``).
"""

from finetune.prune.command import add_arguments, command
from finetune.prune.methods import (
           choose_heads,
           choose_layers,
           head_importance,
           mean_loss,
           prune_heads,
)
from finetune.prune.run import check_single_process, prune_after_training, prune_run

__all__ = ["add_arguments", "check_single_process", "choose_heads", "choose_layers", "command", "head_importance",
           "mean_loss", "prune_after_training", "prune_heads", "prune_run"]
