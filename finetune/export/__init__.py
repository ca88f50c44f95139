"""``finetune export``: a finished run's whole model (backbone + pooling + head; adapters merged) as a folder
that serves it, checked against the run's PyTorch model on a split before it is written.

    finetune export RUN                                   # -> RUN-onnx: ONNX, float32
    finetune export RUN --quantize dynamic-int8           # -> RUN-onnx-int8: onnxruntime dynamic int8
    finetune export RUN --format torchscript [--quantize dynamic-int8]
    finetune export RUN --format safetensors-int8         # PyTorch dynamic int8 linear layers, no pickle
    finetune predict --model RUN-onnx --input FILE        # the same output as on RUN

    from finetune.export import export_run, load_exported
    report = export_run("runs/sst2", "serving/sst2", format="onnx")
    load_exported("serving/sst2").predict(["a gripping film"])

An exported folder holds the model file, the tokenizer, ``label_map.json``, ``export.json`` (format,
quantization, task, labels, thresholds, temperature, inputs, the source run and a fingerprint of its weights,
the check, the versions), ``README.md`` and a standalone ``predict.py`` (numpy, tokenizers and onnxruntime:
no finetune, no torch for onnx).

The modules follow the data flow: ``formats`` (write and run each format; ``int8``: PyTorch int8 linear
layers in safetensors) -> ``served`` (``load_exported``) -> ``check`` (exported vs PyTorch on a split) ->
``build`` (``export_run``: the folder, written aside and moved into place) -> ``command``. onnx, onnxscript
and onnxruntime are optional: ``pip install 'finetune[export]'``.
"""

from finetune.export.build import ExportReport, default_output, export_run
from finetune.export.command import add_arguments, command
from finetune.export.formats import FORMATS, QUANTIZATIONS
from finetune.export.served import ExportedModel, is_exported, load_exported

__all__ = ["FORMATS", "QUANTIZATIONS", "ExportReport", "ExportedModel", "add_arguments", "command",
           "default_output", "export_run", "is_exported", "load_exported"]
