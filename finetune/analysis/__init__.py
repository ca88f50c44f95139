"""``finetune analyze``: what a model gets right and wrong on one split, as a report a person reads at a glance.

The modules follow the data flow: ``collect`` (a run or ensemble folder -> ``SplitOutputs``, numpy only)
-> one analysis per task (``classification``, ``multi_label``, ``regression``, ``token_classification``:
``analyze(outputs, folder, k) -> Analysis``, pure functions of the outputs; ``calibration`` and ``compare``
for single-label classification) -> ``report`` (``analyze_outputs``: dispatch by task, write
``report.md``, ``analysis.json`` and the PNGs) -> ``command`` (``finetune analyze``).

    from finetune.analysis import analyze_outputs, collect

    outputs = collect("runs/sst2", split="test")          # runs the model once
    analyze_outputs(outputs, "runs/sst2/analysis", k=10)  # cheap: no model
"""

from finetune.analysis.collect import collect
from finetune.analysis.command import add_arguments, command
from finetune.analysis.outputs import Analysis, SplitOutputs
from finetune.analysis.report import analyze_outputs

__all__ = ["Analysis", "SplitOutputs", "add_arguments", "analyze_outputs", "collect", "command"]
