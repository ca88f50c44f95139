"""Sweeps across processes: a killed worker, two workers on one journal file, two workers on
PostgreSQL, and trials trained by 2 DDP processes. Each worker is a real `scripts/sweep.py` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO, tiny_recipe
from test_distributed import launch_two

from finetune.sweep import load_sweep_file, run_sweep
from finetune.sweep.study import open_storage

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def sweep_file(tmp_path: Path, recipe, **sweep) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**recipe.to_dict(), "sweep": sweep}))
    return path


def start_worker(path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "scripts/sweep.py", "--recipe", str(path), *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out + "\n".join(line for line in err.splitlines() if "[sweep]" in line)


def trials(storage, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def test_a_killed_workers_trial_is_run_again_and_finished_trials_are_kept(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 3, "eval_every": 2})
    sweep_dir = tmp_path / "sweep"
    path = sweep_file(tmp_path, recipe, method="grid", dir=str(sweep_dir), heartbeat_seconds=1,
                      parameters={"train.lr": [3e-3, 5e-3, 1e-2]})
    worker = start_worker(path)
    deadline = time.time() + 300
    while not (sweep_dir / "trials" / "0001" / "train.log").exists():  # trial 0 done, trial 1 training
        if worker.poll() is not None or time.time() > deadline:
            pytest.fail(f"the worker ended before trial 1 began: {worker.communicate()[1][-3000:]}")
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    storage = open_storage(None, sweep_dir)
    before = {t.number: t for t in trials(storage, "tiny")}
    assert before[0].state.name == "COMPLETE" and before[1].state.name == "RUNNING"

    result = run_sweep(*load_sweep_file(path))  # the same command again

    after = {t.number: t for t in trials(storage, "tiny")}
    assert after[0].value == before[0].value and after[0].datetime_complete == before[0].datetime_complete
    assert after[1].state.name == "FAIL" and "no heartbeat" in after[1].user_attrs["error"]
    retry = [t for t in after.values() if t.user_attrs.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == before[1].params
    complete = [t for t in after.values() if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["slot"] for t in complete) == [0, 1, 2]  # every slot ran to the end once
    assert {row["number"] for row in result.trials} == set(after)  # the report shows the failed attempt too


def test_two_workers_on_one_journal_never_run_the_same_trial(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 20, "eval_every": "epoch",
                                                                         "cpu_threads": 1})
    lrs = [1e-3, 2e-3, 3e-3, 5e-3, 7e-3, 1e-2]
    path = sweep_file(tmp_path, recipe, method="grid", dir=str(tmp_path / "shared"), parameters={"train.lr": lrs})
    workers = [start_worker(path), start_worker(path)]
    for worker in workers:
        finish(worker)
    found = trials(open_storage(None, tmp_path / "shared"), "tiny")
    assert len(found) == 6, "a worker added trials beyond the grid"
    assert all(t.state.name == "COMPLETE" for t in found)
    assert sorted(t.params["train.lr"] for t in found) == lrs  # each combination exactly once
    assert len({t.user_attrs["worker"] for t in found}) == 2, "one worker did everything: no concurrency tested"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A real PostgreSQL server: $FINETUNE_TEST_POSTGRES_URL, else one started by scripts/start_postgres.sh."""
    url = os.environ.get("FINETUNE_TEST_POSTGRES_URL")
    if url:
        return url
    proc = subprocess.run(["bash", str(REPO / "scripts" / "start_postgres.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, f"could not start PostgreSQL (scripts/start_postgres.sh):\n{proc.stderr[-2000:]}"
    return proc.stdout.strip().splitlines()[-1]


def test_two_workers_share_a_study_on_postgresql(postgres_url, tiny_backbone, sentiment_dir, tmp_path):
    """Like two machines: separate sweep folders, one study in PostgreSQL."""
    # one thread per worker: two workers on two cores; trials long enough (20 epochs) that both workers get some
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 20, "eval_every": "epoch",
                                                                         "cpu_threads": 1})
    study = f"pg-{uuid.uuid4().hex[:8]}"
    path = sweep_file(tmp_path, recipe, method="random", n_trials=6, seed=3,
                      parameters={"train.lr": {"loguniform": [1e-3, 1e-2]}})
    workers = [start_worker(path, "--storage", postgres_url, "--study", study, f"sweep.dir={tmp_path / name}")
               for name in ("machine-a", "machine-b")]
    outputs = [finish(worker) for worker in workers]
    found = trials(optuna.storages.RDBStorage(postgres_url), study)
    assert len(found) == 6 and all(t.state.name == "COMPLETE" for t in found)
    assert sorted(t.user_attrs["slot"] for t in found) == list(range(6))
    by_worker = Counter(t.user_attrs["worker"] for t in found)
    if len(by_worker) != 2:
        pytest.fail(f"one worker ran every trial: {by_worker}\n" + "\n=====\n".join(outputs))
    assert len({t.params["train.lr"] for t in found}) == 6  # the workers' samplers don't propose alike
    for name in ("machine-a", "machine-b"):  # each machine keeps the run folders of the trials it ran
        ran = {p.name for p in (tmp_path / name / "trials").iterdir()}
        assert ran and all((tmp_path / name / "trials" / r / "metrics.json").is_file() for r in ran)
    best = [json.loads(line) for out in outputs for line in out.splitlines() if line.startswith('{"sweep_dir"')]
    assert len(best) == 2 and best[0]["best_trial"] == best[1]["best_trial"]


def test_ddp_trials_train_on_two_processes_and_agree_on_pruning(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 2, "eval_every": 2, "batch_size": 8})
    sweep_dir = tmp_path / "ddp-sweep"
    path = sweep_file(tmp_path, recipe, method="grid", dir=str(sweep_dir),
                      parameters={"train.lr": [1e-2, 1e-7]}, pruner={"kind": "median", "startup_trials": 1})
    proc = launch_two("scripts/sweep.py", "--recipe", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    finals = [line for line in proc.stdout.splitlines() if line.startswith('{"sweep_dir"')]
    assert len(finals) == 1 and json.loads(finals[0])["best_trial"] == 0
    found = {t.number: t for t in trials(open_storage(None, sweep_dir), "tiny")}
    assert len(found) == 2  # one study, not one per process
    assert found[0].state.name == "COMPLETE" and found[1].state.name == "PRUNED"
    assert "(2 processes" in (sweep_dir / "trials" / "0000" / "train.log").read_text()
    # 192 rows / (8 per rank x 2 ranks) = 12 steps per epoch: the pruned trial stopped before 24; validations are
    # reported at per-mille of each trial's steps (the median pruner compares by share of budget)
    assert max(found[0].intermediate_values) == 1000 and max(found[1].intermediate_values) < 1000
    assert found[1].user_attrs["pruned_at_step"] < 24
    assert (sweep_dir / "best" / "model.safetensors").is_file()
