"""The three exported formats: how each is written from a PyTorch model and how it is run again.

Every format maps the tokenizer's arrays (``input_ids``, ``attention_mask`` and, when the tokenizer gives
them, ``token_type_ids``; batch and sequence dimensions free) to the logits: the whole model, backbone +
pooling + head, (B, C) or (B, T, C) for token classification.

  onnx              ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), opset 18, one file;
                    int8: onnxruntime's ``quantize_dynamic`` (QInt8 weights per channel, every MatMul / Gemm)
  torchscript       ``torch.jit.trace`` of the model; int8: its linear layers quantized first (``int8``)
  safetensors-int8  the linear layers' int8 weights and scales in a .safetensors file (``int8``), the model
                    rebuilt from ``config.json`` when loaded: no pickle anywhere
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from finetune.errors import RecipeError

FORMATS = ("onnx", "torchscript", "safetensors-int8")
QUANTIZATIONS = ("dynamic-int8",)
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "safetensors-int8": "model-int8.safetensors"}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 18
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit: larger models keep their weights in model.onnx.data
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INSTALL = "pip install 'finetune[export]'"

Logits = Callable[[dict[str, np.ndarray]], np.ndarray]
"""An exported model: the tokenizer's int64 arrays by input name -> float32 logits."""


def require(packages: tuple[str, ...], needed_for: str) -> None:
    """Raises RecipeError naming the install command when an optional package is missing."""
    missing = []
    for name in packages:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise RecipeError(f"{needed_for} needs {', '.join(missing)} (not installed): {INSTALL}")


class LogitsOnly(nn.Module):
    """The model with the tokenizer's arrays as positional inputs and its logits as the only output:
    what the exporters trace."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


@contextlib.contextmanager
def _exporter_noise_hidden() -> Iterator[None]:
    """The exporters' progress lines, tracer and deprecation warnings: the export's own check says what counts."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript",
                                                    "root")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def example_inputs(example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tokenizer's arrays the model reads, in ``INPUTS`` order, as int64 CPU tensors."""
    return {name: torch.as_tensor(example[name]).long().cpu() for name in INPUTS if name in example}


def export_onnx(model: nn.Module, example: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``model`` as ONNX with free batch and sequence dimensions.

    ``example``: a tokenised batch (at least 2 rows and 2 tokens: torch.export fixes a dimension of size 1).
    """
    inputs = example_inputs(example)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    wrapper = LogitsOnly(model.eval())
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    with _exporter_noise_hidden(), torch.no_grad():
        torch.onnx.export(wrapper, tuple(inputs.values()), str(path), dynamo=True, opset_version=OPSET,
                          input_names=list(inputs), output_names=["logits"], external_data=large,
                          dynamic_shapes={name: {0: batch, 1: sequence} for name in inputs}, verbose=False)


def quantize_onnx(source: Path, target: Path) -> None:
    """onnxruntime's dynamic quantization: int8 weights with a scale per output channel, activations quantized
    per batch at run time. Per channel: on the SST-2 MiniLM run 98.6 % of test predictions stay those of the
    float32 model (accuracy unchanged, 0.8119) against 96.3 % per tensor, at the same speed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _exporter_noise_hidden():  # it suggests a pre-processing pass that dynamic quantization doesn't need
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         use_external_data_format=(source.parent / f"{source.name}.data").exists())


def export_torchscript(model: nn.Module, example: dict[str, torch.Tensor], path: Path) -> None:
    """``torch.jit.trace``: the traced graph has no shape-dependent Python left (the masks are tensor ops),
    so it runs at other batch sizes and lengths; the export's check holds it to that."""
    inputs = example_inputs(example)
    with _exporter_noise_hidden(), torch.no_grad():
        traced = torch.jit.trace(LogitsOnly(model.eval()), tuple(inputs.values()), check_trace=False)
        torch.jit.save(traced, str(path))


# --- running an exported model ---------------------------------------------------------------


def onnx_logits(path: Path, threads: int | None = None) -> Logits:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(arrays: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(["logits"], {name: np.asarray(arrays[name], dtype=np.int64) for name in names})[0]

    return run


def torch_logits(model: Callable, names: list[str], keywords: bool) -> Logits:
    """A TorchScript module (positional inputs, returns logits) or a model (keyword inputs, returns an output)."""

    @torch.inference_mode()
    def run(arrays: dict[str, np.ndarray]) -> np.ndarray:
        tensors = [torch.as_tensor(np.asarray(arrays[name]), dtype=torch.long) for name in names]
        out = model(**dict(zip(names, tensors))).logits if keywords else model(*tensors)
        return out.float().numpy()

    return run


def open_model(folder: Path, meta: dict, threads: int | None = None) -> Logits:
    """The exported model of ``folder`` as a function of the tokenizer's arrays (``meta``: its export.json).

    Raises:
        RecipeError: a package the format needs is missing.
    """
    fmt, names, file = meta["format"], meta["inputs"], folder / meta["model_file"]
    if fmt == "onnx":
        require(("onnxruntime",), f"{folder} (an ONNX export)")
        return onnx_logits(file, threads)
    if fmt == "torchscript":
        with _exporter_noise_hidden():
            module = torch.jit.load(str(file), map_location="cpu").eval()
        return torch_logits(module, names, keywords=False)
    from finetune.export.int8 import load_int8
    from finetune.modeling import (
        FinetuneForSequenceClassification,
        FinetuneForTokenClassification,
    )

    classes = {cls.__name__: cls for cls in (FinetuneForSequenceClassification, FinetuneForTokenClassification)}
    return torch_logits(load_int8(folder, classes[meta["architecture"]], meta["model_file"]), names, keywords=True)
