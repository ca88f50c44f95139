"""Two processes under `accelerate launch` (DDP over gloo on CPU) train one model and agree on metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO, tiny_recipe

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def launch_two(*args: str) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 ARGS` on a free port (CPU: DDP over gloo)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
         *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_two_process_launch_trains_one_model_and_counts_each_example_once(kind, tiny_backbone, sentiment_dir, tmp_path):
    """2 ranks split the data (half the steps), evaluation gathers exactly 13 examples (no padded duplicates)."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 2, "eval_every": "epoch"},
                         policy={"kind": kind},
                         data={"path": str(sentiment_dir), "max_eval_samples": 13, "max_test_samples": 13})
    path = tmp_path / "tiny.yaml"
    path.write_text(recipe.to_yaml())
    run_dir = tmp_path / "ddp-run"
    proc = launch_two("scripts/finetune.py", "--recipe", str(path), f"output.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 processes" in (run_dir / "train.log").read_text()
    finals = [line for line in proc.stdout.splitlines() if line.startswith('{"run_dir"')]
    assert len(finals) == 1  # only the main process reports
    final = json.loads(finals[0])
    assert final["optimizer_steps"] == 12  # 192 rows / (16 per rank x 2 ranks) = 6 steps per epoch
    for split in ("validation", "test"):
        correct = final[split]["accuracy"] * 13
        assert abs(correct - round(correct)) < 1e-6, f"{split}: accuracy is not k/13, duplicates were counted"
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [6, 12]
    assert (run_dir / ("adapter_model.safetensors" if kind == "lora" else "model.safetensors")).is_file()


def test_two_process_resume_in_a_later_epoch_matches_an_uninterrupted_run(tiny_backbone, sentiment_dir, tmp_path):
    """Killed mid-way through epoch 2 under DDP and resumed: the final weights equal a straight 2-process run."""
    import torch
    from safetensors.torch import load_file

    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path,
                         train={"epochs": 3, "eval_every": 4, "checkpoint_every": 1, "batch_size": 8, "lr": 3e-3},
                         head={"pooling": "mean", "dropout": 0.2})
    path = tmp_path / "tiny.yaml"
    path.write_text(recipe.to_yaml())
    straight = launch_two("tests/ddp_train.py", str(path), str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    # 192 rows / (8 x 2 ranks) = 12 steps per epoch; die after the checkpoint of step 17 (epoch 2, mid-way)
    died = launch_two("tests/ddp_train.py", str(path), str(tmp_path / "b"), "--die-after", "17")
    assert died.returncode != 0
    state = json.loads((tmp_path / "b" / "checkpoints" / "last" / "train_state.json").read_text())
    assert state["epoch"] == 1 and state["batches_in_epoch"] == 5 and state["num_processes"] == 2
    resumed = launch_two("tests/ddp_train.py", str(path), str(tmp_path / "b"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)
