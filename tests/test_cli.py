"""The three entry points: scripts/finetune.py, the finetune command, and Python imports of recipes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, tiny_recipe

from finetune.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _write_recipe(tmp_path, backbone, data) -> str:
    recipe = tiny_recipe(backbone, data, tmp_path, train={"max_steps": 6, "eval_every": 3})
    path = tmp_path / "tiny.yaml"
    path.write_text(recipe.to_yaml())
    return str(path)


def test_script_help_lists_shipped_recipes():
    """`python scripts/finetune.py --help` names every shipped recipe."""
    out = subprocess.run([sys.executable, "scripts/finetune.py", "--help"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, check=True).stdout
    for name in ["sst2_minilm_full", "sst2_minilm_lora", "sst2_minilm_head", "agnews_minilm_lora",
                 "trec_minilm_full", "mrpc_minilm_lora", "conll_minilm_ner"]:
        assert name in out


def test_script_trains_with_overrides_and_saves_the_resolved_recipe(tiny_backbone, sentiment_dir, tmp_path):
    """Overrides reach the run; the resolved recipe is printed and saved; the last line is the metrics JSON."""
    recipe = _write_recipe(tmp_path, tiny_backbone, sentiment_dir)
    run_dir = tmp_path / "cli-run"
    proc = subprocess.run([sys.executable, "scripts/finetune.py", "--recipe", recipe, "train.lr=1e-3",
                           "head.type=mlp", f"output.dir={run_dir}"], cwd=REPO, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "# resolved recipe" in proc.stdout
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["train"]["lr"] == 1e-3 and saved["head"]["type"] == "mlp"
    assert saved["head"]["pooling"] == "mean"
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["run_dir"] == str(run_dir) and "accuracy" in final["test"]


def test_script_rejects_unknown_key_with_suggestion(tmp_path):
    """A typo exits with status 2 and a suggestion, and creates nothing."""
    proc = subprocess.run([sys.executable, "scripts/finetune.py", "--recipe", "sst2_minilm_lora",
                           "policy.lora.rnak=16", f"output.dir={tmp_path / 'x'}"], cwd=REPO, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "did you mean 'policy.lora.rank'" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_console_train_predict_and_eval(tiny_backbone, sentiment_dir, tmp_path, capsys):
    """finetune train, then predict prints a label and probabilities per line, and eval reproduces test metrics."""
    recipe = _write_recipe(tmp_path, tiny_backbone, sentiment_dir)
    run_dir = tmp_path / "console-run"
    assert main(["train", "--recipe", recipe, f"output.dir={run_dir}"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    inputs = tmp_path / "inputs.txt"
    inputs.write_text("a great and lovely film\nthe plot was dull\n")
    assert main(["predict", "--model", str(run_dir), "--input", str(inputs)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["input"] for line in lines] == ["a great and lovely film", "the plot was dull"]
    for line in lines:
        assert line["label"] in {"0", "1"}
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert line["label"] == max(line["probabilities"], key=line["probabilities"].get)

    assert main(["eval", "--model", str(run_dir), "--split", "test"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["accuracy"] == pytest.approx(final["test"]["accuracy"])


def test_console_predict_reads_the_recipe_columns_from_a_tsv(tiny_backbone, sentiment_dir, tmp_path, capsys):
    """A TSV input is read through the recipe's column mapping (here: 'sentence')."""
    recipe = _write_recipe(tmp_path, tiny_backbone, sentiment_dir)
    run_dir = tmp_path / "run-tsv"
    assert main(["train", "--recipe", recipe, f"output.dir={run_dir}"]) == 0
    capsys.readouterr()
    assert main(["predict", "--model", str(run_dir), "--input", str(sentiment_dir / "test.tsv")]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert len(lines) == 64 and all(line["columns"].keys() == {"label"} for line in lines)  # gold label kept
    assert captured.err.strip().splitlines()[-1].startswith("predicted 64 rows in ")

    # --top-k 1 keeps the predicted class only; --output writes a TSV with the input's columns beside it
    out = tmp_path / "predictions.tsv"
    assert main(["predict", "--model", str(run_dir), "--input", str(sentiment_dir / "test.tsv"), "--top-k", "1",
                 "--output", str(out)]) == 0
    assert capsys.readouterr().out == ""
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    source = list(csv.DictReader(open(sentiment_dir / "test.tsv", newline=""), delimiter="\t"))
    assert [r["sentence"] for r in rows] == [r["sentence"] for r in source]
    assert [r["label"] for r in rows] == [r["label"] for r in source]
    for row, line in zip(rows, lines):
        assert row["predicted_label"] == line["label"]
        assert json.loads(row["predicted_probabilities"]) == {line["label"]: line["probabilities"][line["label"]]}
    for bad, named in ((["--top-k", "0"], "--top-k 0"), (["--output", str(tmp_path / "p.xlsx")], "p.xlsx"),
                       (["--output", str(tmp_path / "missing" / "p.tsv")], "does not exist")):
        assert main(["predict", "--model", str(run_dir), "--input", str(sentiment_dir / "test.tsv"), *bad]) == 2
        assert named in capsys.readouterr().err


def test_console_reports_bad_input_without_traceback(tmp_path, capsys):
    """predict on a folder that is not a run: exit status 2 with a message naming the folder."""
    assert main(["predict", "--model", str(tmp_path), "--input", "x.txt"]) == 2
    assert f"{tmp_path} is not a finished run folder" in capsys.readouterr().err


def test_quiet_holds_for_its_command_only(tmp_path, capsys, monkeypatch):
    """--quiet silences the command it is given to, not what a notebook or test runs after it in-process."""
    monkeypatch.delenv("FINETUNE_QUIET", raising=False)
    assert main(["predict", "--model", str(tmp_path), "--input", "x.txt", "--quiet"]) == 2
    assert "is not a finished run folder" in capsys.readouterr().err  # errors still print under --quiet
    assert "FINETUNE_QUIET" not in os.environ
    monkeypatch.setenv("FINETUNE_QUIET", "1")  # set by the caller: left as it was
    main(["predict", "--model", str(tmp_path), "--input", "x.txt", "--quiet"])
    assert os.environ["FINETUNE_QUIET"] == "1"


def test_python_entry_point_recipes_import(tmp_path):
    """`from recipes import sst2_minilm_lora` gives a validated Recipe that accepts attribute edits."""
    from recipes import sst2_minilm_lora

    recipe = sst2_minilm_lora("train.epochs=1")
    recipe.train.lr = 1e-4
    assert recipe.policy.kind == "lora" and recipe.train.epochs == 1 and recipe.train.lr == 1e-4
    assert sst2_minilm_lora().train.lr != 1e-4  # a fresh recipe each call


def test_predict_refuses_a_txt_file_for_a_pair_model(tiny_backbone, pairs_dir, tmp_path, capsys):
    """Single lines cannot feed a text-pair model: exit 2 naming the two columns it needs."""
    recipe = tiny_recipe(tiny_backbone, pairs_dir, tmp_path, train={"max_steps": 2},
                         data={"path": str(pairs_dir), "columns": {"text": "s1", "text_pair": "s2", "label": "relation"}})
    run_dir = recipe.run().run_dir
    capsys.readouterr()
    inputs = tmp_path / "lines.txt"
    inputs.write_text("just one sentence\n")
    assert main(["predict", "--model", str(run_dir), "--input", str(inputs)]) == 2
    assert "'s1' and 's2'" in capsys.readouterr().err
