"""Every command-line entry point ends bad input the same way: one `error:` line naming the thing,
a non-zero exit, no traceback; a real bug keeps its traceback and says it is one; --debug re-raises."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import warnings

import pytest
from battery import refuses
from conftest import REPO, tiny_recipe

from finetune import cli
from finetune.cli import main, sweep_main
from finetune.errors import Interrupted, RecipeError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def run_dir(tiny_backbone, sentiment_dir, tmp_path_factory):
    """A finished run (2 steps) that the predict/eval/prune/ensemble cases point at."""
    tmp = tmp_path_factory.mktemp("errors-run")
    return tiny_recipe(tiny_backbone, sentiment_dir, tmp, train={"max_steps": 2}).run().run_dir


@pytest.fixture(scope="module")
def recipe_file(tiny_backbone, sentiment_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors-recipe")
    path = tmp / "tiny.yaml"
    path.write_text(tiny_recipe(tiny_backbone, sentiment_dir, tmp, train={"max_steps": 2}).to_yaml())
    return path


def _damaged_copy(run_dir, tmp_path, file: str, content: bytes):
    copy = tmp_path / "damaged"
    shutil.copytree(run_dir, copy)
    (copy / file).write_bytes(content)
    return copy


# --- predict ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, content, names", [
    ("header.tsv", "sentence\tlabel\n", ["header.tsv", "no rows"]),
    ("empty.tsv", "", ["empty.tsv", "no rows"]),
    ("empty.txt", "", ["empty.txt", "no rows"]),
    ("blank.txt", "\n   \n\n", ["blank.txt", "no rows"]),
    ("empty.jsonl", "", ["empty.jsonl", "no rows"]),
    ("other.tsv", "foo\tbar\nhello\tthere\n", ["other.tsv", "'sentence'", "'foo'"]),
    ("sheet.xlsx", "x", ["sheet.xlsx", ".txt", ".tsv", ".parquet"]),
])
def test_predict_refuses_bad_input_files(name, content, names, run_dir, tmp_path, capsys):
    (tmp_path / name).write_text(content)
    refuses(capsys, ["predict", "--model", str(run_dir), "--input", str(tmp_path / name)], names, tree=tmp_path)


def test_predict_refuses_a_missing_input_or_a_folder(run_dir, tmp_path, capsys):
    refuses(capsys, ["predict", "--model", str(run_dir), "--input", str(tmp_path / "nope.txt")],
            ["nope.txt", "does not exist"])
    refuses(capsys, ["predict", "--model", str(run_dir), "--input", str(tmp_path)], [str(tmp_path), "folder"])


def test_predict_names_a_model_folder_that_does_not_exist(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("hello\n")
    refuses(capsys, ["predict", "--model", str(tmp_path / "gone"), "--input", str(tmp_path / "in.txt")],
            ["--model", "gone", "does not exist"], tree=tmp_path)


def test_predict_names_what_a_non_run_folder_lacks(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "in.txt").write_text("hello\n")
    refuses(capsys, ["predict", "--model", str(tmp_path / "folder"), "--input", str(tmp_path / "in.txt")],
            ["folder", "not a finished run folder", "recipe.yaml", "label_map.json"], tree=tmp_path)


@pytest.mark.parametrize("file, content", [
    ("model.safetensors", b"\x10\x00\x00\x00"),      # truncated weights
    ("label_map.json", b'{"0": '),                     # broken JSON
    ("tokenizer_config.json", b"{"),                   # read by transformers, named all the same
])
def test_predict_names_a_damaged_file_of_the_run(file, content, run_dir, tmp_path, capsys):
    damaged = _damaged_copy(run_dir, tmp_path, file, content)
    (tmp_path / "in.txt").write_text("hello\n")
    refuses(capsys, ["predict", "--model", str(damaged), "--input", str(tmp_path / "in.txt")],
            [str(damaged / file), "damaged"], tree=tmp_path)


# --- eval ----------------------------------------------------------------------------------------


def test_eval_refuses_an_unknown_split(run_dir, capsys):
    refuses(capsys, ["eval", "--model", str(run_dir), "--split", "tset"], ["--split", "'tset'", "validation"])


def test_eval_refuses_a_test_split_the_recipe_does_not_have(run_dir, capsys):
    refuses(capsys, ["eval", "--model", str(run_dir), "--split", "test", "data.splits.test="],
            ["--split test", "data.splits.test"], tree=run_dir, seconds=10)


def test_eval_names_a_missing_run_folder(tmp_path, capsys):
    refuses(capsys, ["eval", "--model", str(tmp_path / "gone")], ["gone", "does not exist"])


# --- train, sweep, sweep-report, recipes ----------------------------------------------------------


def test_train_names_a_recipe_that_does_not_exist(tmp_path, capsys):
    refuses(capsys, ["train", "--recipe", str(tmp_path / "nope.yaml")], ["--recipe", "nope.yaml"], tree=tmp_path)


@pytest.mark.parametrize("argv, names", [
    (["train"], ["finetune train", "--recipe", "--help"]),
    (["bogus"], ["'bogus'", "finetune --help"]),
    (["recipes", "--everything"], ["--everything"]),
])
def test_usage_mistakes_are_one_line_too(argv, names, capsys):
    refuses(capsys, argv, names)


def test_sweep_names_a_recipe_that_does_not_exist(capsys):
    refuses(capsys, ["sweep", "--recipe", "no_such_sweep"], ["no_such_sweep"])


def test_sweep_report_names_a_missing_or_wrong_folder(tmp_path, capsys):
    refuses(capsys, ["sweep-report", str(tmp_path / "gone")], ["gone", "does not exist"])
    refuses(capsys, ["sweep-report", str(tmp_path)], [str(tmp_path), "sweep.yaml"], tree=tmp_path)


# --- prune, ensemble, compare --------------------------------------------------------------------


def test_prune_names_a_missing_run(tmp_path, capsys):
    refuses(capsys, ["prune", "--model", str(tmp_path / "gone"), "--method", "magnitude"], ["gone"])


def test_prune_refuses_an_output_under_a_file_before_any_work(run_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    refuses(capsys, ["prune", "--model", str(run_dir), "--method", "magnitude", "--output",
                     str(tmp_path / "a_file" / "pruned")], ["--output", "a_file", "not a folder"],
            tree=tmp_path, seconds=10)


def test_prune_puts_every_bad_flag_on_one_line(run_dir, tmp_path, capsys):
    line = refuses(capsys, ["prune", "--model", str(run_dir), "--method", "magnitude", "--sparsity", "1.5",
                            "--heads-fraction", "-1", "--output", str(tmp_path / "p")],
                   ["--sparsity", "--heads-fraction"], tree=tmp_path)
    assert "; " in line


def test_ensemble_names_a_missing_member_or_sweep(run_dir, tmp_path, capsys):
    refuses(capsys, ["ensemble", "--models", str(run_dir), str(tmp_path / "gone"), "--output", str(tmp_path / "e")],
            ["--models", "gone"], tree=tmp_path)
    refuses(capsys, ["ensemble", "--from-sweep", str(tmp_path / "nosweep")], ["--from-sweep", "nosweep", "does not exist"])
    refuses(capsys, ["ensemble", "--from-sweep", str(tmp_path), "--output", str(tmp_path / "e")],
            ["--from-sweep", "sweep.yaml"], tree=tmp_path)


def test_ensemble_refuses_an_output_under_a_file(run_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    refuses(capsys, ["ensemble", "--models", str(run_dir), "--output", str(tmp_path / "a_file" / "e")],
            ["--output", "a_file"], tree=tmp_path)


def test_compare_names_a_missing_recipe_and_a_bad_output(recipe_file, tmp_path, capsys):
    refuses(capsys, ["compare", "--recipe", str(tmp_path / "nope.yaml"), "--variants", "full"], ["nope.yaml"])
    (tmp_path / "a_file").write_text("x")
    refuses(capsys, ["compare", "--recipe", str(recipe_file), "--variants", "full", "--output", str(tmp_path / "a_file")],
            ["--output", "a_file", "is a file"], tree=tmp_path)


# --- the funnel itself --------------------------------------------------------------------------


def _failing(monkeypatch, err: BaseException) -> None:
    def recipes_command(args):
        raise err
    monkeypatch.setattr(cli, "recipes_command", recipes_command)


def test_a_bug_keeps_its_traceback_and_says_it_is_a_bug(monkeypatch, capsys):
    _failing(monkeypatch, RuntimeError("something inside broke"))
    assert main(["recipes"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: something inside broke" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("bug: finetune recipes") and "report" in last and "issue tracker" in last


def test_debug_re_raises_bugs_and_expected_errors(monkeypatch, run_dir):
    _failing(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        main(["recipes", "--debug"])
    with pytest.raises(RecipeError, match="does not exist"):
        main(["--debug", "eval", "--model", "/no/such/run"])
    with pytest.raises(RecipeError, match="neither a file"):
        sweep_main(["--recipe", "no_such_sweep", "--debug"])


@pytest.mark.parametrize("err, line, status", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/out/run"), "error: /data/out/run: permission denied", 1),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/file/run"), "error: /data/file/run: a part of", 1),
    (OSError(errno.ENOSPC, "No space left on device"), "error: no space left on device", 1),
    (KeyboardInterrupt(), "interrupted: finetune recipes stopped by Ctrl-C", 130),
    (Interrupted("interrupted (Ctrl-C) at step 3; kept: checkpoints/step-2; resume with: finetune train ..."),
     "interrupted (Ctrl-C) at step 3; kept", 130),
    (RecipeError("first line\n  second line"), "error: first line; second line", 2),
])
def test_expected_failures_are_one_line(err, line, status, monkeypatch, capsys):
    _failing(monkeypatch, err)
    assert main(["recipes"]) == status
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), lines


def test_a_damaged_file_outside_load_run_is_named_from_the_reader(monkeypatch, tmp_path, capsys):
    from safetensors.torch import load_file

    broken = tmp_path / "checkpoint.safetensors"
    broken.write_bytes(b"\x01\x00")
    monkeypatch.setattr(cli, "recipes_command", lambda args: load_file(str(broken)))
    assert main(["recipes"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(broken) in lines[0] and "damaged" in lines[0]


def test_only_the_main_process_prints_the_error(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert main(["sweep-report", "/no/such/sweep"]) == 2
    assert capsys.readouterr().err == ""


def test_loading_a_lora_run_shows_no_warning_a_user_cannot_act_on(tiny_backbone, sentiment_dir, tmp_path, capsys):
    lora = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"max_steps": 1},
                       policy={"kind": "lora"}).run().run_dir
    (tmp_path / "in.txt").write_text("a lovely film\n")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        assert main(["predict", "--model", str(lora), "--input", str(tmp_path / "in.txt")]) == 0
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]
    assert '"label"' in capsys.readouterr().out


def test_script_bad_recipe_is_exactly_one_line(tmp_path):
    """scripts/finetune.py as a user runs it: one stderr line, no traceback, nothing created."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: x\nbackbone: {name: some/model}\ntrain: {lr: fast}\n")
    proc = subprocess.run([sys.executable, "scripts/finetune.py", "--recipe", str(recipe),
                           f"output.dir={tmp_path / 'out'}"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "train.lr" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
