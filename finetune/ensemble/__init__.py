"""Ensembles of finished runs: ``finetune ensemble --from-sweep SWEEP_DIR --top-k 3`` or ``--models A B C``.

    ENSEMBLE_DIR/
      ensemble.json          members (paths relative to this folder, and absolute), weights, combine method,
                             labels, the recipe whose data section describes the inputs, config, report
      ensemble_report.json   each member and the ensemble on validation and test
      ensemble_report.md     the same, as a table

Members are not copied unless ``--copy-members`` (hard links where possible): the artefact points at
their run folders. Each member tokenises the inputs itself (its own tokenizer and max_length), so
members with different backbones combine; their label sets must match (columns are matched by name).

Combination, with p_m member m's probabilities and weights w_m summing to 1:
  mean      sum_m w_m p_m, w_m = 1/M (with --greedy: times chosen / number of picks)
  weighted  the same sum with w_m = s_m / sum_j s_j, s_m the member's validation score on the recipe's
            eval.primary (1/s_m when lower is better, e.g. loss)
  vote      each member gives weight w_m to its argmax label; a tie goes to the tied label with the
            largest sum_m w_m p_m, then to the lowest label id. ``predict`` reports sum_m w_m p_m as the
            probabilities and the vote shares under ``votes``.
Regression averages the scores (mean or weighted); voting does not apply.

Greedy selection (Caruana et al. 2004, "Ensemble selection from libraries of models"): start empty,
add the member (with replacement) that gives the best validation eval.primary, ties to the lower
validation loss, then the lower member index; after ``--top-k`` picks keep the best bag seen. The
validation split chose the sweep's trials and the greedy bag, so the ensemble's validation scores are
optimistic; test is the honest comparison.

The modules follow the data flow: ``members`` (load runs, their outputs) -> ``combine`` (mean, vote)
-> ``select`` (evaluation data, the candidate pool, greedy selection, the report) -> ``artefact``
(``Ensemble``: save, load, predict) -> ``command`` (``finetune ensemble``).
"""

from finetune.ensemble.artefact import ARTEFACT, Ensemble, is_ensemble
from finetune.ensemble.combine import METHODS, average, predict_ids, vote, vote_shares
from finetune.ensemble.command import (
    add_arguments,
    command,
    setup_logging,
    sweep_candidates,
)
from finetune.ensemble.members import (
    Member,
    has_model,
    load_members,
    member_outputs,
    shared_labels,
)
from finetune.ensemble.select import Pool, Split, load_eval_data, markdown

__all__ = [
    "ARTEFACT", "METHODS", "Ensemble", "Member", "Pool", "Split", "add_arguments", "average", "command", "has_model",
    "is_ensemble", "load_eval_data", "load_members", "markdown", "member_outputs", "predict_ids", "setup_logging",
    "shared_labels", "sweep_candidates", "vote", "vote_shares",
]
