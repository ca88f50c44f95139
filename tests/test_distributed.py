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


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_two_process_launch_trains_one_model_and_counts_each_example_once(kind, tiny_backbone, sentiment_dir, tmp_path):
    """2 ranks split the data (half the steps), evaluation gathers exactly 13 examples (no padded duplicates)."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 2, "eval_every": "epoch"},
                         policy={"kind": kind},
                         data={"path": str(sentiment_dir), "max_eval_samples": 13, "max_test_samples": 13})
    path = tmp_path / "tiny.yaml"
    path.write_text(recipe.to_yaml())
    run_dir = tmp_path / "ddp-run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
         "scripts/finetune.py", "--recipe", str(path), f"output.dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
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
