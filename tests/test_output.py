"""What a run prints and where it goes: progress fit for a log file, --quiet, and $FINETUNE_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml
from conftest import REPO, tiny_recipe

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _recipe_file(tmp_path, backbone, data, **output) -> str:
    recipe = tiny_recipe(backbone, data, tmp_path, train={"max_steps": 40, "eval_every": 20, "batch_size": 4})
    raw = recipe.to_dict()
    raw["output"] = {**raw["output"], **output}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _train(args: list[str], env: dict, log_path, cwd=REPO) -> subprocess.CompletedProcess:
    """The train command with stderr redirected to a file, as `... 2> train.out` in a job script."""
    with open(log_path, "w") as stderr:
        return subprocess.run([sys.executable, str(REPO / "scripts" / "finetune.py"), *args], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=stderr, text=True)


def test_a_redirected_log_gets_whole_progress_lines_not_carriage_returns(tiny_backbone, sentiment_dir, tmp_path):
    recipe = _recipe_file(tmp_path, tiny_backbone, sentiment_dir)
    proc = _train(["--recipe", recipe, f"output.dir={tmp_path / 'run'}"], ENV, tmp_path / "err.log")
    text = (tmp_path / "err.log").read_text()
    assert proc.returncode == 0, text[-2000:]
    assert "\r" not in text  # a log file reads line by line
    progress = [line for line in text.splitlines() if line.startswith("training:")]
    assert 2 <= len(progress) <= 11, progress  # a line per tenth of the way, not one per step
    assert progress[-1].startswith("training: 100%")
    assert not any(line.startswith(("evaluating", "testing")) for line in text.splitlines())
    assert "step 20 validation" in text and "step 40 validation" in text  # each evaluation still gets its line


def test_quiet_keeps_only_warnings_and_the_result(tiny_backbone, sentiment_dir, tmp_path):
    recipe = _recipe_file(tmp_path, tiny_backbone, sentiment_dir)
    run_dir = tmp_path / "run"
    proc = _train(["--recipe", recipe, "--quiet", f"output.dir={run_dir}"], ENV, tmp_path / "err.log")
    text = (tmp_path / "err.log").read_text()
    assert proc.returncode == 0, text[-2000:]
    assert not any("training:" in line or " INFO " in line for line in text.splitlines()), text
    assert "# resolved recipe" not in proc.stdout
    final = json.loads(proc.stdout.strip().splitlines()[-1])  # the result is still printed
    assert final["run_dir"] == str(run_dir)
    assert "step 40 validation" in (run_dir / "train.log").read_text()  # the run folder's log has everything


def test_finetune_home_collects_runs_from_anywhere(tiny_backbone, sentiment_dir, tmp_path):
    """Without output.dir, runs go under $FINETUNE_HOME/runs whatever the current folder."""
    recipe = _recipe_file(tmp_path, tiny_backbone, sentiment_dir, dir=None)
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _train(["--recipe", recipe, "--quiet"], {**ENV, "FINETUNE_HOME": str(home)}, tmp_path / "err.log",
                  cwd=elsewhere)
    assert proc.returncode == 0, (tmp_path / "err.log").read_text()[-2000:]
    run_dir = json.loads(proc.stdout.strip().splitlines()[-1])["run_dir"]
    assert run_dir.startswith(str(home / "runs" / "tiny-"))
    assert (home / "runs").is_dir() and not any(elsewhere.iterdir())


def test_finetune_home_holds_sweeps_too(tiny_backbone, sentiment_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"max_steps": 2, "eval_every": 2},
                         output={"dir": None})
    result = recipe.sweep({"train.lr": [1e-3]}, method="grid")
    assert result.sweep_dir == tmp_path / "home" / "sweeps" / "tiny"
    assert (result.sweep_dir / "trials").is_dir()


def _mb(folder) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def test_a_finished_run_keeps_only_its_model_unless_asked(tiny_backbone, sentiment_dir, tmp_path):
    from finetune.predict import load_run, predict

    lean = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path / "a", train={"max_steps": 4, "eval_every": 2}).run()
    kept = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path / "b", train={"max_steps": 4, "eval_every": 2},
                       output={"keep": "model+checkpoint"}).run()
    assert not (lean.run_dir / "checkpoints").exists() and lean.best_checkpoint is None
    assert kept.best_checkpoint.is_file() and (kept.run_dir / "checkpoints" / "last" / "optimizer.bin").is_file()
    assert _mb(lean.run_dir) < _mb(kept.run_dir) / 2  # the optimizer state and a second copy of the weights went
    removed = next(line for line in (lean.run_dir / "train.log").read_text().splitlines() if "output.keep=model" in line)
    assert "removed" in removed and " MB" in removed
    texts = ["a lovely film", "dull"]
    assert predict(load_run(lean.run_dir), texts) == predict(load_run(kept.run_dir), texts)  # same seed, same model


def test_a_sweep_keeps_trial_checkpoints_only_with_keep_all(tiny_backbone, sentiment_dir, tmp_path):
    for keep in ("model", "all"):
        recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"max_steps": 2, "eval_every": 2},
                             output={"keep": keep})
        result = recipe.sweep({"train.lr": [1e-3]}, method="grid", dir=str(tmp_path / keep))
        assert (result.sweep_dir / "trials" / "0000" / "checkpoints").exists() == (keep == "all")
        assert (result.sweep_dir / "best" / "model.safetensors").is_file()
