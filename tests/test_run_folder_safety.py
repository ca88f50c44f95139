"""Run folders that lose nothing: --overwrite never deletes a user's file, a stopped run can be
started again or resumed with one line telling how, resume refuses changed data and damaged
checkpoints, a running run's folder is locked, files are flushed and get the folder's permissions,
and a sweep's best/ is always a model its own folder holds."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from battery import refuses, snapshot
from conftest import REPO, tiny_recipe, write_tsv
from safetensors.torch import load_file

import finetune.run
import finetune.runs
import finetune.weights
from finetune.cli import main
from finetune.errors import Interrupted, TrainingDiverged
from finetune.fingerprint import data_fingerprint
from finetune.runs import RunFolderLock, new_file_mode, train_command

FAST = {"max_steps": 4, "eval_every": 2}  # checkpoints at steps 2 and 4
RESUMABLE = {"keep": "model+checkpoint"}  # a finished run keeps checkpoints/last, which these tests resume or damage


def recipe_file(recipe, folder: Path) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_backbone, sentiment_dir, tmp_path_factory) -> Path:
    """A finished full fine-tuning run (with checkpoints/last), copied by the tests that change it."""
    root = tmp_path_factory.mktemp("finished")
    return tiny_recipe(tiny_backbone, sentiment_dir, root, train=FAST, output=RESUMABLE).run().run_dir


@pytest.fixture()
def copied_run(finished_run, tiny_backbone, sentiment_dir, tmp_path) -> tuple[Path, Path]:
    """(recipe file, run folder): a copy of the finished run and the recipe that made it, pointing at the copy."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=FAST, output=RESUMABLE)
    return recipe_file(recipe, tmp_path), run_dir


# --- --overwrite and --resume ---------------------------------------------------------------


@pytest.mark.parametrize("user_file, named", [("notes.txt", "notes.txt"), ("analysis/plot.py", "analysis/plot.py"),
                                              ("notebooks/plot.py", "notebooks/"),
                                              ("pruned/mine.csv", "pruned/mine.csv")])
def test_overwrite_refuses_to_delete_files_finetune_did_not_write(capsys, copied_run, tmp_path, user_file, named):
    path, run_dir = copied_run
    (run_dir / user_file).parent.mkdir(exist_ok=True)
    (run_dir / user_file).write_text("the user's own")
    message = refuses(capsys, ["train", "--recipe", str(path), "--overwrite"], [str(run_dir), named, "nothing was deleted"],
                      tree=tmp_path)
    assert "model.safetensors" not in message  # only the unknown names are listed


def test_overwrite_replaces_a_run_made_only_of_finetune_files(tiny_backbone, sentiment_dir, tmp_path):
    """LoRA with base/ and merged/, tensorboard logs, a stale lock and a leftover temporary: all finetune's."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"max_steps": 2, "eval_every": 1},
                         policy={"kind": "lora"},
                         output={"dir": str(tmp_path / "run"), "merge_lora": True, "report_to": ["tensorboard"]})
    first = recipe.run()
    assert (first.run_dir / "tiny").is_dir() and (first.run_dir / "merged").is_dir()
    (first.run_dir / ".lock").write_text("pid 999999 on a host long gone")
    (first.run_dir / ".model.tmp").mkdir()
    second = recipe.with_overrides(["train.max_steps=3"]).run(overwrite=True)
    assert json.loads((second.run_dir / "metrics.json").read_text())["optimizer_steps"] == 3
    assert not (second.run_dir / ".model.tmp").exists() and not (second.run_dir / ".lock").exists()
    assert "stopped before" not in (second.run_dir / "train.log").read_text()


def test_resume_and_overwrite_together_are_refused(capsys, copied_run, tmp_path):
    path, _ = copied_run
    refuses(capsys, ["train", "--recipe", str(path), "--resume", "--overwrite"], ["--resume", "--overwrite"],
            tree=tmp_path, seconds=5)


@pytest.mark.parametrize("change", ["flip a label", "drop rows"])
def test_resume_refuses_changed_data_naming_the_file(capsys, tiny_backbone, sentiment_dir, tmp_path, change):
    data = tmp_path / "data"
    shutil.copytree(sentiment_dir, data)
    recipe = tiny_recipe(tiny_backbone, data, tmp_path, data={"path": str(data)}, train=FAST, output=RESUMABLE)
    path = recipe_file(recipe, tmp_path)
    recipe.run()
    lines = (data / "train.tsv").read_bytes().splitlines(keepends=True)
    if change == "flip a label":  # same size: only the content hash can tell
        at = lines[5].rindex(b"\t") + 1
        lines[5] = lines[5][:at] + (b"1" if lines[5][at:at + 1] == b"0" else b"0") + lines[5][at + 1:]
    else:
        lines = lines[:-10]
    (data / "train.tsv").write_bytes(b"".join(lines))
    message = refuses(capsys, ["train", "--recipe", str(path), "--resume"], [str(data / "train.tsv"), "changed"],
                      tree=tmp_path)
    assert ("same size" in message) == (change == "flip a label")


def test_a_run_killed_before_its_first_checkpoint_starts_again_with_the_same_command(tiny_backbone, sentiment_dir,
                                                                                       tmp_path):
    """kill -9 while training: the folder keeps a stale lock, recipe.yaml and train.log, no checkpoint."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=FAST)
    path, run_dir, marker = recipe_file(recipe, tmp_path), tmp_path / "run", tmp_path / "training"
    code = (f"import time, pathlib, finetune.run\n"
            f"def hang(self):\n    pathlib.Path({str(marker)!r}).write_text('')\n    time.sleep(600)\n"
            f"finetune.run.Run.train = hang\n"
            f"from finetune.cli import main\nmain(['train', '--recipe', {str(path)!r}])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the run never started training: {proc.communicate()[1][-3000:]}")
        time.sleep(0.1)
    proc.kill()
    proc.communicate()
    assert (run_dir / ".lock").is_file() and (run_dir / "recipe.yaml").is_file()
    assert not (run_dir / "checkpoints" / "last").exists()

    assert main(["train", "--recipe", str(path)]) == 0  # the same command, no --resume or --overwrite
    assert (run_dir / "model.safetensors").is_file() and not (run_dir / ".lock").exists()
    assert "stopped before its first checkpoint: starting it afresh" in (run_dir / "train.log").read_text()


def test_ctrl_c_before_the_first_checkpoint_is_one_line_and_resume_starts_afresh(tiny_backbone, sentiment_dir,
                                                                                 tmp_path, monkeypatch):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=FAST)
    path, run_dir = recipe_file(recipe, tmp_path), tmp_path / "run"

    def interrupt(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune.run.Run, "save_checkpoint", interrupt)
    with pytest.raises(Interrupted) as info:
        recipe.run()
    message = str(info.value)
    assert "\n" not in message and "at step 2" in message and "before the first checkpoint" in message
    assert train_command(run_dir) in message
    assert message in (run_dir / "train.log").read_text()
    monkeypatch.undo()

    assert main(["train", "--recipe", str(path), "--resume"]) == 0
    log = (run_dir / "train.log").read_text()
    assert "starting it afresh (--resume: nothing to resume)" in log and message not in log


def test_ctrl_c_after_a_checkpoint_names_it_and_the_printed_command_resumes(tiny_backbone, sentiment_dir, tmp_path,
                                                                            monkeypatch):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=FAST)
    run_dir = tmp_path / "run"
    real_save = finetune.run.Run.save_checkpoint

    def save_then_interrupt(self):
        real_save(self)
        if self.state.global_step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(finetune.run.Run, "save_checkpoint", save_then_interrupt)
    with pytest.raises(Interrupted) as info:
        recipe.run()
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and f"the checkpoint at step 2 in {run_dir / 'checkpoints' / 'last'}" in message
    command = message.split("resume with: ")[1]
    assert command == train_command(run_dir, "--resume")
    assert not (run_dir / ".lock").exists()  # the lock goes with the run

    assert main(shlex.split(command)[1:]) == 0
    assert "resumed at step 2" in (run_dir / "train.log").read_text()
    assert [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())] == [2, 4]


def test_nan_loss_is_one_line_with_the_retry_command_and_the_same_command_starts_again(tiny_backbone, sentiment_dir,
                                                                                       tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={**FAST, "lr": 1e30})
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as info:
        recipe.run()
    message = str(info.value)
    assert "\n" not in message and "at step" in message and "kept: no checkpoint yet" in message
    assert message.endswith(train_command(run_dir, "train.lr=1e+29"))
    assert message in (run_dir / "train.log").read_text()
    with pytest.raises(TrainingDiverged):  # not "already holds a run": nothing was kept to protect
        recipe.run()


# --- the lock -------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_a_folder_in_use_by_another_run_is_refused_naming_the_pid(capsys, copied_run, tmp_path, flags):
    path, run_dir = copied_run
    lock = RunFolderLock(run_dir)  # as a run still training would hold it
    try:
        refuses(capsys, ["train", "--recipe", str(path), *flags], [str(run_dir), f"pid {os.getpid()}", "in use"],
                tree=tmp_path)
    finally:
        lock.release()
    assert (run_dir / "model.safetensors").is_file()


# --- damaged files and file-system errors ------------------------------------------------------


@pytest.mark.parametrize("damaged, named", [("best.safetensors", "best.safetensors"),
                                            ("model.safetensors", "model.safetensors"),
                                            ("optimizer.bin", "checkpoints/last")])
def test_a_damaged_checkpoint_file_is_named_on_resume(capsys, copied_run, tmp_path, damaged, named):
    path, run_dir = copied_run
    target = run_dir / "checkpoints" / "last" / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    refuses(capsys, ["train", "--recipe", str(path), "--resume"], [named, "--overwrite"], tree=tmp_path)


def test_an_output_dir_under_a_file_is_named(capsys, tiny_backbone, sentiment_dir, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, output={"dir": str(tmp_path / "afile" / "run")})
    refuses(capsys, ["train", "--recipe", str(recipe_file(recipe, tmp_path))],
            [str(tmp_path / "afile" / "run"), "not a directory"], tree=tmp_path)


def test_a_full_disk_while_checkpointing_names_the_path(capsys, tiny_backbone, sentiment_dir, tmp_path, monkeypatch):
    def disk_full(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(finetune.weights, "save_file", disk_full)
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=FAST)
    message = refuses(capsys, ["train", "--recipe", str(recipe_file(recipe, tmp_path))],
                      [str(tmp_path / "run" / "checkpoints"), "best.safetensors", "no space left", "free some disk space"])
    assert "kept: no checkpoint yet" in message


# --- what the folder holds ---------------------------------------------------------------------


def test_weight_files_get_the_same_permissions_as_the_other_files(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"max_steps": 2, "eval_every": 1},
                         policy={"kind": "lora"}, output={"dir": str(tmp_path / "run"), "merge_lora": True, **RESUMABLE})
    run_dir = recipe.run().run_dir
    weights = sorted(run_dir.rglob("*.safetensors"))
    assert {w.relative_to(run_dir).as_posix() for w in weights} >= {
        "adapter_model.safetensors", "base/model.safetensors", "merged/model.safetensors",
        "checkpoints/last/best.safetensors", "checkpoints/last/model.safetensors"}
    expected = (run_dir / "recipe.yaml").stat().st_mode & 0o777
    assert expected == new_file_mode()
    assert {w.relative_to(run_dir).as_posix(): oct(w.stat().st_mode & 0o777) for w in weights} == {
        w.relative_to(run_dir).as_posix(): oct(expected) for w in weights}


def test_fp16_on_cpu_is_recorded_as_what_ran(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={**FAST, "mixed_precision": "fp16"},
                         output=RESUMABLE)
    first = recipe.run()
    assert yaml.safe_load((first.run_dir / "recipe.yaml").read_text())["train"]["mixed_precision"] == "no"
    assert "fp16 has no effect on CPU" in (first.run_dir / "train.log").read_text()
    # the same command resumes: the saved recipe and the command's one agree on what runs
    assert recipe.run(resume=True).best_step == first.best_step


def test_data_fingerprint_of_60k_rows_costs_little_and_sees_one_changed_byte(tiny_backbone, sentiment_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [[f"a sentence of a movie review number {i} which was rather good or bad", str(i % 2)] for i in range(60_000)]
    write_tsv(data / "train.tsv", ["sentence", "label"], rows)
    shutil.copy(sentiment_dir / "validation.tsv", data)
    cfg = tiny_recipe(tiny_backbone, data, tmp_path, data={"path": str(data), "splits": {"test": None}}).data
    started = time.perf_counter()
    before = data_fingerprint(cfg)
    assert time.perf_counter() - started < 0.5
    train = str(data / "train.tsv")
    assert set(before) == {train, str(data / "validation.tsv")} and before[train]["size"] > 4_000_000
    text = (data / "train.tsv").read_bytes()
    (data / "train.tsv").write_bytes(text[:-2] + (b"0" if text[-2:-1] == b"1" else b"1") + b"\n")
    assert data_fingerprint(cfg)[train]["blake2b"] != before[train]["blake2b"]


# --- sweeps: best/ holds this folder's best -----------------------------------------------------


def test_a_sweep_worker_never_claims_a_best_trial_that_ran_in_another_folder(tiny_backbone, sentiment_dir, tmp_path,
                                                                            monkeypatch):
    """Two workers on one study, each with its own sweep folder (as on two machines): worker A runs
    trial 0 (the good learning rate), worker B trial 1. B's best/ must hold trial 1, and B must say
    that the study's best ran elsewhere."""
    from finetune.sweep import parse_sweep, run_sweep, runner

    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 1, "eval_every": 6})
    storage = str(tmp_path / "study.journal")

    def settings(folder: str):
        return parse_sweep({"method": "grid", "parameters": {"train.lr": [5e-3, 1e-7]}, "dir": str(tmp_path / folder),
                            "storage": storage, "objective": {"metric": "loss"}})

    real_pop, popped = runner.studies.pop_trial, []

    def one_trial_only(study, cfg):  # worker A stops after its first trial
        popped.append(1)
        return real_pop(study, cfg) if len(popped) == 1 else None

    monkeypatch.setattr(runner.studies, "pop_trial", one_trial_only)
    a = run_sweep(recipe, settings("machine-a"))
    monkeypatch.undo()
    b = run_sweep(recipe, settings("machine-b"))

    assert a.here_trial == 0 and b.here_trial == 1
    by_number = {row["number"]: row for row in b.trials}
    if not by_number[0]["value"] < by_number[1]["value"]:
        pytest.fail(f"lr 5e-3 did not beat lr 1e-7 on validation loss: {by_number}")
    held = json.loads((tmp_path / "machine-b" / "best" / "sweep_trial.json").read_text())
    assert held["trial"] == 1
    best_b = load_file(str(tmp_path / "machine-b" / "best" / "model.safetensors"))
    trial_b = load_file(str(tmp_path / "machine-b" / "trials" / "0001" / "model.safetensors"))
    assert all((best_b[k] == trial_b[k]).all() for k in trial_b)
    assert b.best_trial == 0 and b.best_run_dir is None  # the study's best is not here ...
    assert "trial 0" in b.note and str((tmp_path / "machine-a").resolve()) in b.note  # ... and it says where
    assert "best/ here holds trial 1" in b.note
    assert "trial 0" in (tmp_path / "machine-b" / "sweep.log").read_text().splitlines()[-1]
    assert a.best_run_dir == tmp_path / "machine-a" / "best" and a.note is None
    assert not (tmp_path / "machine-b" / "trials" / "0000").exists()


def test_overwrite_of_a_folder_that_holds_no_run_lists_what_is_there(capsys, tiny_backbone, sentiment_dir, tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "README.md").write_text("my project")  # a name finetune uses, but no run is here
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, output={"dir": str(folder)})
    before = snapshot(folder)
    refuses(capsys, ["train", "--recipe", str(recipe_file(recipe, tmp_path)), "--overwrite"],
            [str(folder), "holds no finetune run", "README.md"], tree=tmp_path)
    assert snapshot(folder) == before
