"""``export_run``: a finished run -> a self-contained folder that serves its model, checked on a split.

The story: check the request (cheap: formats, packages, folders), load the run (adapters merged), write the
model, tokenizer, label map, export.json, README.md and predict.py into a temporary folder beside the output,
check the written model against the run's PyTorch model on the split, and only then move the folder into
place. A float32 export that disagrees is refused and nothing is left behind; an int8 one is reported.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from finetune import runs
from finetune.config import RecipeConfig, RecipeError
from finetune.errors import RunFolderError
from finetune.export import formats
from finetune.export.check import FP32_TOLERANCE, Comparison, compare
from finetune.export.served import EXPORT_FILE, is_exported, load_exported
from finetune.export.writing import (
    describe_check,
    example_batch,
    versions,
    write_readme,
)

FP32_GRAPH = "model-fp32.onnx"  # onnx int8: the graph before quantization, checked, then dropped
# what an exported folder holds: --overwrite replaces a folder with these names only
EXPORT_FILES = (*runs.MODEL_FILES, EXPORT_FILE, "predict.py", "int8_linear.py", "model.onnx", "model.onnx.data",
                "model.pt", "model-int8.safetensors")


@dataclass
class ExportReport:
    output_dir: Path
    format: str
    quantization: str | None
    files: list[str]
    size_bytes: int
    check: dict
    summary: list[str] = field(default_factory=list)
    """What the command prints: where the export went and what its check found."""


def default_output(run_dir: Path, fmt: str, quantize: str | None) -> Path:
    """Beside the run (a run folder holds only what training writes): RUN-onnx, RUN-onnx-int8, ..."""
    suffix = fmt + ("-int8" if quantize and fmt != "safetensors-int8" else "")
    return run_dir.parent / f"{run_dir.name}-{suffix}"


def check_request(run_dir: Path, output: Path, fmt: str, quantize: str | None, overwrite: bool,
                  check_split: str) -> tuple[RecipeConfig, str, str | None]:
    """Everything checkable before the model loads. Returns (recipe, split to check on, a note about it).

    Raises:
        RecipeError: an unknown format, quantization or split, a redundant --quantize, a missing package.
        RunFolderError: not a finished run (an ensemble, an export), or an output folder that can't be replaced.
    """
    from finetune.analysis.collect import SPLITS
    from finetune.ensemble import ARTEFACT, is_ensemble
    from finetune.predict import check_run_folder

    if fmt not in formats.FORMATS:
        raise RecipeError(f"--format {fmt!r}: expected one of {', '.join(formats.FORMATS)}")
    if quantize is not None and quantize not in formats.QUANTIZATIONS:
        raise RecipeError(f"--quantize {quantize!r}: expected {' or '.join(formats.QUANTIZATIONS)}, or none")
    if quantize and fmt == "safetensors-int8":
        raise RecipeError(f"--quantize {quantize}: --format safetensors-int8 is always int8 (dynamic, linear layers);"
                          " drop --quantize")
    if check_split not in SPLITS:
        raise RecipeError(f"--check-split {check_split!r}: expected one of {', '.join(SPLITS)}")
    if is_ensemble(run_dir):
        raise RunFolderError(f"export: {run_dir} is an ensemble; export its members one by one (listed in "
                             f"{run_dir / ARTEFACT}) and combine their predictions")
    if is_exported(run_dir):
        raise RunFolderError(f"export: {run_dir} is already an exported model; export the run it came from "
                             f"(named in {run_dir / EXPORT_FILE})")
    recipe = check_run_folder(run_dir, "export")
    if fmt == "onnx":
        formats.require(formats.ONNX_PACKAGES, "--format onnx")
    _check_output(run_dir, output, overwrite)
    note = None
    if check_split == "test" and not recipe.data.splits.test:
        check_split, note = "validation", "the run's recipe has no test split: checked on validation"
    return recipe, check_split, note


def _check_output(run_dir: Path, output: Path, overwrite: bool) -> None:
    if output.resolve() == run_dir.resolve() or run_dir.resolve() in output.resolve().parents:
        raise RunFolderError(f"--output: {output} is inside the run folder {run_dir}, which holds only what training "
                             f"writes; choose a folder beside it (the default is {default_output(run_dir, 'onnx', None)})")
    runs.check_output_folder(output, "--output")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not overwrite:
        kind = "an earlier export" if is_exported(output) else "a folder that is not empty"
        raise RunFolderError(f"--output: {output} exists ({kind}); pass --overwrite to replace it, or choose another "
                             "folder")
    if not is_exported(output):
        raise RunFolderError(f"--output: {output} holds no export ({EXPORT_FILE}); --overwrite replaces only a "
                             "folder finetune export wrote: move its files out, or choose another folder")
    theirs = [p.name + ("/" if p.is_dir() else "") for p in sorted(output.iterdir())
              if p.is_dir() or not any(fnmatchcase(p.name, pattern) for pattern in EXPORT_FILES)]
    if theirs:  # replacing the export would delete them
        raise RunFolderError(f"--output: {output} holds files finetune export did not write ({', '.join(theirs[:5])});"
                             " move them out, or choose another folder")


def weights_fingerprint(run_dir: Path) -> str:
    """blake2b of the run's weight files (an adapter run: the adapter and its base)."""
    digest = hashlib.blake2b(digest_size=16)
    files = [run_dir / name for name in runs.WEIGHTS] + [run_dir / "base" / "model.safetensors"]
    for path in (p for p in files if p.is_file()):
        digest.update(path.relative_to(run_dir).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def export_run(run_dir: str | Path, output_dir: str | Path | None = None, format: str = "onnx",
               quantize: str | None = None, overwrite: bool = False, check_split: str = "test",
               check_rows: int | None = None, batch_size: int = 64) -> ExportReport:
    """Export a finished run's model (backbone + pooling + head; adapters merged) for serving.

    ``format``: onnx, torchscript or safetensors-int8; ``quantize``: None or "dynamic-int8" (onnx, torchscript).
    ``output_dir``: default ``RUN-<format>[-int8]`` beside the run. ``check_split``: the split the export is
    checked on (test; validation when the recipe has none); ``check_rows``: only its first rows.

    Raises:
        RecipeError: see ``check_request``; a float32 export whose logits differ by more than 1e-3 or whose
            predictions differ on the split (nothing is written then).
        RunFolderError: see ``check_request``; the run's files are damaged.
    """
    # the split's rows (inputs, gold labels in the model's label ids) exactly as finetune analyze reads them
    from finetune.analysis.collect import _read_split
    from finetune.export.int8 import quantize_linears
    from finetune.policies import plain
    from finetune.predict import load_run
    from finetune.tasks import TASKS

    run_dir = Path(run_dir)
    output = Path(output_dir) if output_dir is not None else default_output(run_dir, format, quantize)
    recipe, split, note = check_request(run_dir, output, format, quantize, overwrite, check_split)
    if check_rows is not None and check_rows < 1:
        raise RecipeError(f"--check-rows {check_rows}: give 1 or more")
    run = load_run(run_dir)
    model, merged = plain(run.model)
    model = model.float().eval()  # served on CPUs: a bf16/fp16 backbone is exported in float32
    rows = _read_split(recipe, run.labels, split, run_dir)
    quantized = quantize is not None or format == "safetensors-int8"
    # PyTorch int8 is deterministic: the model whose int8 weights are exported, to check the export exactly against
    torch_int8 = quantize_linears(model) if quantized and format != "onnx" else None
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        example = example_batch(run.tokenizer, rows, recipe.data.max_length, TASKS[recipe.task].words)
        meta = _describe(run_dir, run, model, merged, format, quantized, example)
        _write_files(run_dir, run.tokenizer, model, tmp, format)
        exact = _write_model(model, torch_int8, example, tmp, meta, rows, batch_size)
        (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        served = load_exported(tmp)
        _check_tokenizer(run.tokenizer, served, rows, TASKS[recipe.task].words)
        if torch_int8 is not None:
            exact = _exactly(_torch(torch_int8, meta), served.forward, served, rows, batch_size)
        found = compare(_torch(model, meta), served.forward, served, rows, batch_size, limit=check_rows)
        if not quantized and not found.passes():
            raise RecipeError(f"export refused: the {format} model differs from the run's PyTorch model on the "
                              f"{split} split ({_numbers(found)}; allowed: max {FP32_TOLERANCE:g} and every prediction "
                              f"equal); nothing was written. Try another --format, and report it with --debug")
        meta["check"] = {"split": split, "note": note, "rows_in_split": len(rows), **found.to_dict(),
                         "tolerance": None if quantized else FP32_TOLERANCE, "refused_if_different": not quantized,
                         **({"int8_mechanics": exact.to_dict()} if exact is not None else {})}
        summary = describe_check(meta)
        (tmp / EXPORT_FILE).write_text(json.dumps({**meta, "summary": summary}, indent=2) + "\n")
        write_readme(tmp, meta, summary, run_dir, output.name)
        output.parent.mkdir(parents=True, exist_ok=True)
        runs.replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in output.iterdir())
    size = sum(p.stat().st_size for p in output.iterdir() if p.is_file())
    megabytes = (output / meta["model_file"]).stat().st_size / 1e6
    lines = [f"exported {run_dir} -> {output} ({format}{', int8' if quantized else ''}, model {megabytes:.1f} MB)",
             *summary]
    return ExportReport(output, format, meta["quantization"], files, size, meta["check"], lines)


def _describe(run_dir: Path, run, model, merged: bool, fmt: str, quantized: bool, example: dict) -> dict:
    """export.json, less the check: what loading and predicting need, where it came from, how it was made."""
    from finetune.tasks import TASKS

    recipe, tokenizer = run.recipe, run.tokenizer
    thresholds = TASKS[recipe.task].thresholds(model.config, recipe, run.labels)
    exporter = {"onnx": f"torch.onnx.export(dynamo=True), opset {formats.OPSET}", "torchscript": "torch.jit.trace",
                "safetensors-int8": "torch.ao.quantization.quantize_dynamic (per channel), unpacked into safetensors",
                }[fmt]
    if quantized and fmt != "safetensors-int8":
        exporter += (", then onnxruntime quantize_dynamic (QInt8, per channel)" if fmt == "onnx"
                     else ", of torch.ao.quantization.quantize_dynamic's model (per channel)")
    return {
        "format": fmt, "quantization": "dynamic-int8" if quantized else None,
        "model_file": formats.MODEL_FILES[fmt], "architecture": type(model).__name__,
        "inputs": list(formats.example_inputs(example)), "task": recipe.task, "labels": run.labels,
        "text_pair": bool(recipe.data.columns.text_pair), "max_length": recipe.data.max_length,
        "pooling": model.config.pooling, "head": model.config.head_type,
        "thresholds": None if thresholds is None else [float(t) for t in thresholds], "temperature": run.temperature,
        "tokenizer": {"pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
                      "padding_side": tokenizer.padding_side},
        "source": {"run": str(run_dir.resolve()), "weights_blake2b": weights_fingerprint(run_dir),
                   "policy": recipe.policy.kind, "adapter_merged": merged},
        "exporter": exporter, "versions": versions(fmt), "recipe": recipe.to_dict(),
    }


def _torch(model, meta: dict):
    return formats.torch_logits(model, meta["inputs"], keywords=True)


def _write_model(model, torch_int8, example: dict, folder: Path, meta: dict, rows,
                 batch_size: int) -> Comparison | None:
    """The model file: ``torch_int8`` (the int8 model) when given, else ``model``. An onnx int8 export's float32
    graph is checked against PyTorch before it is quantized: that comparison is returned."""
    from finetune.export.int8 import save_int8

    fmt, target = meta["format"], folder / meta["model_file"]
    if fmt == "onnx" and not meta["quantization"]:
        formats.export_onnx(model, example, target)
    elif fmt == "onnx":
        formats.export_onnx(model, example, folder / FP32_GRAPH)
        (folder / EXPORT_FILE).write_text(json.dumps({**meta, "model_file": FP32_GRAPH}) + "\n")
        float_graph = load_exported(folder)
        checked = _exactly(_torch(model, meta), float_graph.forward, float_graph, rows, batch_size)
        formats.quantize_onnx(folder / FP32_GRAPH, target)
        for path in folder.glob(f"{FP32_GRAPH}*"):
            path.unlink()
        return checked
    elif fmt == "torchscript":
        formats.export_torchscript(torch_int8 if torch_int8 is not None else model, example, target)
    else:
        save_int8(torch_int8, target)
    return None


def _exactly(reference, exported, served, rows, batch_size: int) -> Comparison:
    """A comparison on the first batch that must pass: an int8 export's mechanics, quantization aside.

    Raises:
        RecipeError: it doesn't (nothing is written).
    """
    found = compare(reference, exported, served, rows, batch_size, limit=batch_size, desc="export check (exact)")
    if not found.passes():
        raise RecipeError(f"export refused: the exported model does not reproduce the model it was made from "
                          f"({_numbers(found)} on the first {found.rows} rows); nothing was written. Try another "
                          "--format, and report it with --debug")
    return found


def _numbers(found: Comparison) -> str:
    return f"max |logit difference| {found.max_abs_diff:.3g}, {found.agreement_text()}"


def _check_tokenizer(tokenizer, served, rows, words: bool) -> None:
    """The saved tokenizer encodes the split as the run's does.

    Raises:
        RunFolderError: it doesn't (a tokenizer that does not survive save_pretrained).
    """
    options = {"truncation": True, "max_length": served.max_length, "is_split_into_words": words}
    ours = tokenizer(rows.texts, rows.pairs, **options)["input_ids"]
    theirs = served.tokenizer(rows.texts, rows.pairs, **options)["input_ids"]
    different = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if different is not None:
        raise RunFolderError(f"export refused: the saved tokenizer encodes row {different} of the split differently "
                             "from the run's; nothing was written")


def _write_files(run_dir: Path, tokenizer, model, folder: Path, fmt: str) -> None:
    """Tokenizer, label map and predict.py; the int8 format also the model's config and code to rebuild it."""
    from finetune.publish import MODELING_FILE

    tokenizer.save_pretrained(folder)  # the run saved it with model_max_length = data.max_length
    shutil.copyfile(run_dir / runs.LABEL_MAP, folder / runs.LABEL_MAP)
    here = Path(__file__).parent
    shutil.copyfile(here / "standalone.py", folder / "predict.py")
    if fmt == "safetensors-int8":
        model.config.save_pretrained(folder)
        shutil.copyfile(MODELING_FILE, folder / "modeling_finetune.py")
        shutil.copyfile(here / "int8.py", folder / "int8_linear.py")
