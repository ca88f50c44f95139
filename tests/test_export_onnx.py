"""``finetune export``: ONNX, TorchScript and int8 exports of tiny runs of every task head, read back by
``finetune predict`` and by the folder's own predict.py, and the export's refusals."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FILLER, tiny_recipe

from finetune import cli
from finetune.errors import RecipeError, RunFolderError
from finetune.export import (
    add_arguments,
    command,
    export_run,
    is_exported,
    load_exported,
)
from finetune.policies import plain
from finetune.predict import load_run, predict

TOPICS = {"sport": ["football", "tennis"], "music": ["piano", "guitar"], "food": ["bread", "cheese"]}


@pytest.fixture(scope="module")
def topics_dir(tmp_path_factory) -> Path:
    """Multi-label: each topic word present makes its label apply; some rows have none."""
    folder = tmp_path_factory.mktemp("topics")
    rng = random.Random(4)
    for split, n in {"train": 96, "validation": 24, "test": 24}.items():
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                labels = sorted(t for t in TOPICS if rng.random() < 0.4) if i % 4 else []
                words = rng.sample(FILLER, 3) + [rng.choice(TOPICS[t]) for t in labels]
                rng.shuffle(words)
                f.write(json.dumps({"text": " ".join(words), "labels": labels}) + "\n")
    return folder


# one tiny run per task head, an adapter policy on two of them (exported merged); the sentiment run trains a
# whole epoch, so that some of its predictions are clear enough to survive int8
RUNS = {
    "sentiment": ("sentiment_dir", {"data": {"columns": {"text": "sentence"}}, "train": {"epochs": 1}}),
    "pairs_mlp": ("pairs_dir", {"data": {"columns": {"text": "s1", "text_pair": "s2", "label": "relation"},
                                         "splits": {"test": None}},
                                "head": {"type": "mlp", "hidden_size": 16, "pooling": "cls"}}),
    "regression_lora": ("regression_dir", {"task": "regression", "data": {"columns": {"text": "text", "label": "score"}},
                                           "policy": {"kind": "lora", "lora": {"rank": 4}}}),
    "multi_label": ("topics_dir", {"task": "multi_label_classification",
                                   "data": {"columns": {"text": "text", "label": "labels"}}}),
    "tokens_ia3": ("ner_dir", {"task": "token_classification",
                               "data": {"columns": {"tokens": "tokens", "tags": "ner_tags"}},
                               "policy": {"kind": "ia3"}}),
}


@pytest.fixture(scope="module")
def trained(request, tiny_backbone, tmp_path_factory):
    """RUNS[name] trained once per module (on demand), by name."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            data_fixture, sections = RUNS[name]
            data_dir = request.getfixturevalue(data_fixture)
            sections = {**sections, "data": {"path": str(data_dir), "max_length": 32, **sections["data"]}}
            train = {"batch_size": 16, "lr": 5e-3, "eval_every": "epoch", **sections.pop("train", {"max_steps": 4})}
            recipe = tiny_recipe(tiny_backbone, data_dir, tmp_path_factory.mktemp(name), train=train,
                                 eval={"analyze": False}, **sections)
            done[name] = recipe.run().run_dir
        return done[name]

    return get


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """export_run(RUNS[name], format, quantize) once per module, by (name, format, quantize)."""
    done: dict[tuple, tuple[Path, object]] = {}

    def get(name: str, fmt: str = "onnx", quantize: str | None = None):
        key = (name, fmt, quantize)
        if key not in done:
            output = tmp_path_factory.mktemp("exports") / f"{name}-{fmt}-{quantize}"
            done[key] = (output, export_run(trained(name), output, format=fmt, quantize=quantize))
        return done[key]

    return get


def _split_rows(run_dir: Path) -> tuple[list, list | None]:
    """The inputs of the run's test split (validation when it has none)."""
    from finetune.analysis.collect import _read_split

    run = load_run(run_dir)
    split = "test" if run.recipe.data.splits.test else "validation"
    rows = _read_split(run.recipe, run.labels, split, run_dir)
    return rows.texts, rows.pairs


def _random_batch(inputs: list[str], batch: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids with random real lengths (the rest padding), as a tokenizer would give them."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(batch, length))
    mask = np.zeros((batch, length), dtype=np.int64)
    for row, real in enumerate(rng.integers(1, length + 1, size=batch)):
        mask[row, :real] = 1
    ids[:, 0], ids[mask == 0] = 101, 0
    types = (rng.random((batch, length)) < 0.5).astype(np.int64) * mask
    arrays = {"input_ids": ids.astype(np.int64), "attention_mask": mask, "token_type_ids": types}
    return {name: arrays[name] for name in inputs}


@pytest.mark.parametrize("name", list(RUNS))
def test_onnx_export_of_every_head_matches_pytorch_and_predicts_the_same(name, trained, exported):
    """Exported at one batch shape, run at others (dynamic batch and sequence), on random ids and padding:
    the logits are PyTorch's; finetune's predictions on the split are the run's."""
    output, report = exported(name)
    served = load_exported(output)
    model = plain(load_run(trained(name)).model)[0].float().eval()
    for batch, length, seed in [(1, 3, 0), (3, 17, 1), (6, 32, 2)]:
        arrays = _random_batch(served.meta["inputs"], batch, length, seed)
        with torch.no_grad():
            expected = model(**{k: torch.from_numpy(v) for k, v in arrays.items()}).logits.numpy()
        got = served.logits(arrays)
        assert got.shape == expected.shape
        real = arrays["attention_mask"].astype(bool) if served.meta["task"] == "token_classification" else ...
        assert np.abs(got - expected)[real].max() < 1e-4, (batch, length)
    assert report.check["agreement"] in (1.0, None) and report.check["max_abs_diff"] < 1e-3
    texts, pairs = _split_rows(trained(name))
    ours, theirs = predict(load_run(trained(name)), texts, pairs), served.predict(texts, pairs)
    for a, b in zip(ours, theirs):
        assert {k: v for k, v in a.items() if k != "probabilities" and k != "score"} == \
               {k: v for k, v in b.items() if k != "probabilities" and k != "score"}
        assert b.get("score", 0) == pytest.approx(a.get("score", 0), abs=1e-4)
        assert b.get("probabilities", {}) == pytest.approx(a.get("probabilities", {}), abs=1e-5)


@pytest.mark.parametrize("fmt", ["torchscript", "safetensors-int8"])
def test_torch_exports_run_at_other_shapes_than_they_were_made_at(fmt, trained, exported):
    """The traced TorchScript graph is the model's; the int8 file rebuilds exactly PyTorch's int8 model."""
    from finetune.export.int8 import quantize_linears

    output, _ = exported("tokens_ia3", fmt)
    served = load_exported(output)
    model = plain(load_run(trained("tokens_ia3")).model)[0].float().eval()
    model = quantize_linears(model) if fmt == "safetensors-int8" else model
    for batch, length, seed in [(1, 2, 3), (5, 29, 4)]:
        arrays = _random_batch(served.meta["inputs"], batch, length, seed)
        with torch.no_grad():
            expected = model(**{k: torch.from_numpy(v) for k, v in arrays.items()}).logits.numpy()
        real = arrays["attention_mask"].astype(bool)
        assert np.abs(served.logits(arrays) - expected)[real].max() < 1e-5


def test_an_export_records_what_serving_needs_and_checks_on_validation_without_a_test_split(trained, exported):
    output, report = exported("pairs_mlp")
    meta = json.loads((output / "export.json").read_text())
    assert meta["inputs"] == ["input_ids", "attention_mask", "token_type_ids"] and meta["text_pair"] is True
    assert meta["task"] == "classification" and meta["labels"] == ["neutral", "opposite", "same"]
    assert meta["head"] == "mlp" and meta["quantization"] is None
    assert meta["check"]["split"] == "validation" and "no test split" in meta["check"]["note"]
    assert meta["check"]["rows"] == 30 and meta["check"]["agreeing"] == 30
    assert len(meta["source"]["weights_blake2b"]) == 32 and meta["versions"]["onnxruntime"]
    assert {"model.onnx", "tokenizer.json", "label_map.json", "README.md", "predict.py"} <= set(report.files)
    assert not [p for p in output.parent.iterdir() if p.name.endswith(".tmp")]
    assert is_exported(output) and not is_exported(trained("pairs_mlp"))
    lora = json.loads((exported("regression_lora")[0] / "export.json").read_text())
    assert lora["source"]["adapter_merged"] is True and lora["labels"] is None


def _cli_predict(model: Path, inputs: Path, out: Path) -> list[dict]:
    assert cli.main(["predict", "--model", str(model), "--input", str(inputs), "--output", str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("fmt, quantize", [("onnx", None), ("onnx", "dynamic-int8"), ("torchscript", None),
                                           ("torchscript", "dynamic-int8"), ("safetensors-int8", None)])
def test_finetune_predict_on_an_exported_folder_gives_the_runs_labels(fmt, quantize, trained, exported, tmp_path):
    run_dir = trained("sentiment")
    output, report = exported("sentiment", fmt, quantize)
    texts, _ = _split_rows(run_dir)
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(texts) + "\n")
    ours, theirs = _cli_predict(run_dir, inputs, tmp_path / "run.jsonl"), _cli_predict(output, inputs, tmp_path / "x.jsonl")
    assert [r["input"] for r in theirs] == texts
    check = report.check
    if not report.quantization:
        assert [r["label"] for r in theirs] == [r["label"] for r in ours]
        return
    # int8 changes the numbers, by at most the check's max difference per logit: a label can only change
    # where the run's two logits are closer than twice that; everywhere else it holds
    margins = [abs(float(np.log(r["probabilities"]["1"] / r["probabilities"]["0"]))) for r in ours]
    clear = [i for i, margin in enumerate(margins) if margin > 2 * check["max_abs_diff"]]
    assert clear and all(theirs[i]["label"] == ours[i]["label"] for i in clear)
    agreeing = sum(a["label"] == b["label"] for a, b in zip(ours, theirs))
    assert check["agreeing"] == agreeing and check["decisions"] == len(texts) and check["tolerance"] is None
    assert check["metric"] == "accuracy" and 0 <= check["exported_score"] <= 1
    assert check["int8_mechanics"]["max_abs_diff"] < 1e-3
    assert "never refused" in "\n".join(report.summary)


@pytest.mark.parametrize("name", list(RUNS))
def test_the_folders_own_predict_script_needs_no_finetune_and_agrees(name, trained, exported):
    output, _ = exported(name)
    texts, pairs = _split_rows(trained(name))
    words = isinstance(texts[0], list)
    texts, pairs = texts[:5], pairs[:5] if pairs else None
    arguments = [" ".join(t) if words else t for t in texts] + [f"--pair={p}" for p in pairs or []]
    # finetune made unimportable: the script must do without it
    script = ("import sys, runpy; sys.modules['finetune'] = None; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", script, str(output / "predict.py"), *arguments], capture_output=True,
                          text=True, timeout=120, cwd=output.parent, check=False)
    assert done.returncode == 0, done.stderr
    printed = [json.loads(line) for line in done.stdout.splitlines()]
    expected = load_exported(output).predict(texts, pairs)
    assert [p["input"] for p in printed] == texts
    for p, e in zip(printed, expected):
        assert {k: v for k, v in p.items() if k not in ("input", "probabilities", "score")} == \
               {k: v for k, v in e.items() if k not in ("probabilities", "score")}
        assert p.get("probabilities", {}) == pytest.approx(e.get("probabilities", {}), abs=1e-5)
        assert p.get("score", 0) == pytest.approx(e.get("score", 0), abs=1e-5)


def test_the_command_prints_where_and_what_the_check_found(trained, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    output = tmp_path / "served"
    args = parser.parse_args([str(trained("multi_label")), "--format", "torchscript", "--output", str(output),
                              "--check-rows", "10"])
    assert command(args) == 0
    printed = capsys.readouterr().out
    assert f"-> {output}" in printed and "10 rows, the first of 24" in printed and "exact_match" in printed
    meta = json.loads((output / "export.json").read_text())
    assert meta["thresholds"] == [0.5, 0.5, 0.5] and meta["check"]["rows"] == 10


def test_a_fitted_temperature_travels_with_an_export_written_beside_the_run(trained, tmp_path):
    import shutil

    run_dir = tmp_path / "calibrated"
    shutil.copytree(trained("sentiment"), run_dir)
    (run_dir / "calibration.json").write_text(json.dumps({"temperature": 2.5}))
    report = export_run(run_dir, format="torchscript")
    assert report.output_dir == tmp_path / "calibrated-torchscript"
    served = load_exported(report.output_dir)
    assert served.temperature == 2.5
    texts = _split_rows(run_dir)[0][:16]
    for a, b in zip(predict(load_run(run_dir), texts), served.predict(texts)):
        assert a["label"] == b["label"] and b["probabilities"] == pytest.approx(a["probabilities"], abs=1e-5)


# --- refusals ----------------------------------------------------------------------------------


def test_what_is_not_a_finished_run_is_refused(trained, tmp_path):
    with pytest.raises(RunFolderError, match="does not exist"):
        export_run(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFolderError, match="not a finished run folder"):
        export_run(tmp_path / "empty", tmp_path / "out")
    ensemble = tmp_path / "ens"
    ensemble.mkdir()
    (ensemble / "ensemble.json").write_text("{}")
    with pytest.raises(RunFolderError, match="is an ensemble; export its members"):
        export_run(ensemble, tmp_path / "out")
    with pytest.raises(RunFolderError, match="inside the run folder"):
        export_run(trained("sentiment"), trained("sentiment") / "onnx")
    with pytest.raises(RecipeError, match="always int8.*drop --quantize"):
        export_run(trained("sentiment"), tmp_path / "out", format="safetensors-int8", quantize="dynamic-int8")
    with pytest.raises(RecipeError, match="--format 'tflite': expected one of onnx, torchscript, safetensors-int8"):
        export_run(trained("sentiment"), tmp_path / "out", format="tflite")
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_replaced_only_when_asked_and_only_if_it_is_an_export(trained, tmp_path):
    run_dir, output = trained("sentiment"), tmp_path / "served"
    export_run(run_dir, output, format="torchscript")
    with pytest.raises(RunFolderError, match="exists \\(an earlier export\\); pass --overwrite"):
        export_run(run_dir, output, format="torchscript")
    report = export_run(run_dir, output, format="safetensors-int8", overwrite=True)
    assert report.format == "safetensors-int8" and not (output / "model.pt").exists()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="did not write \\(notes.txt\\)"):
        export_run(run_dir, output, format="torchscript", overwrite=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("a,b\n")
    with pytest.raises(RunFolderError, match="holds no export"):
        export_run(run_dir, other, format="torchscript", overwrite=True)
    assert (other / "data.csv").is_file() and (output / "notes.txt").is_file()


def test_a_missing_onnxruntime_names_the_extra_to_install(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(RecipeError, match=r"needs onnxruntime \(not installed\): pip install 'finetune\[export\]'"):
        export_run(trained("sentiment"), tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_an_export_that_differs_from_pytorch_is_refused_and_leaves_nothing(trained, tmp_path, monkeypatch):
    from finetune.export import served

    def drifting(folder, meta, threads=None):
        forward = original(folder, meta, threads)
        return lambda arrays: forward(arrays) + 0.01

    original = served.open_model
    monkeypatch.setattr(served, "open_model", drifting)
    with pytest.raises(RecipeError, match=r"export refused: .*max \|logit difference\| 0\.01.*nothing was written"):
        export_run(trained("sentiment"), tmp_path / "out", format="torchscript")
    assert not list(tmp_path.iterdir())
