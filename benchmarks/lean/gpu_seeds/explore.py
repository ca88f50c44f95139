"""Device exploration (not part of the repo): which distillation setting brings a 3-layer student within 0.5 pt."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OUT = Path(os.environ["OUT"]); T0 = time.time(); BUDGET = float(sys.argv[1]) if len(sys.argv) > 1 else 480
teacher = Path(".devdata/teacher")
if (teacher / "model.fp16.safetensors").exists():
    sd = load_file(teacher / "model.fp16.safetensors")
    save_file({k: v.float().contiguous() for k, v in sd.items()}, teacher / "model.safetensors", metadata={"format": "pt"})
    (teacher / "model.fp16.safetensors").unlink()
print("cuda", torch.cuda.is_available(), torch.__version__, flush=True)

def finetune(args, name):
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "finetune.cli", *args], capture_output=True, text=True)
    (OUT / "logs").mkdir(exist_ok=True)
    (OUT / "logs" / f"{name}.log").write_text(proc.stdout[-4000:] + "\n---\n" + proc.stderr[-6000:])
    print(name, "rc", proc.returncode, f"{time.time()-t:.0f}s", proc.stdout.strip().splitlines()[-1:] , proc.stderr.strip().splitlines()[-2:], flush=True)
    return proc.returncode

runs = [  # name, epochs, alpha, T, seed, layers, lr
    ("L3-e1-a05-T2-s42", 1, 0.5, 2, 42, 3, None),
    ("L3-e3-a05-T2-s42", 3, 0.5, 2, 42, 3, None),
    ("L3-e3-a09-T2-s42", 3, 0.9, 2, 42, 3, None),
    ("L3-e3-a10-T4-s42", 3, 1.0, 4, 42, 3, None),
    ("L3-e3-a05-T2-s7", 3, 0.5, 2, 7, 3, None),
    ("L3-e3-a09-T2-s7", 3, 0.9, 2, 7, 3, None),
    ("L3-e3-a05-T2-s1", 3, 0.5, 2, 1, 3, None),
    ("L3-e3-a09-T2-s1", 3, 0.9, 2, 1, 3, None),
    ("L3-e5-a09-T2-s42", 5, 0.9, 2, 42, 3, None),
    ("L2-e3-a09-T2-s42", 3, 0.9, 2, 42, 2, None),
]
finetune(["eval", "--model", str(teacher), "--split", "test"], "teacher-eval")
results = OUT / "results.jsonl"
for name, epochs, alpha, temp, seed, layers, lr in runs:
    if time.time() - T0 > BUDGET:
        print("budget spent, skipping", name, flush=True); continue
    out = Path("/tmp/runs") / name
    args = ["distill", "--teacher", str(teacher), "--layers", str(layers), "backbone.keep_head=true",
            f"train.epochs={epochs}", f"distill.alpha={alpha}", f"distill.temperature={temp}", f"train.seed={seed}",
            f"output.dir={out}", "eval.analyze=false", "--quiet"] + ([f"train.lr={lr}"] if lr else [])
    rc = finetune(args, name)
    row = {"name": name, "rc": rc, "epochs": epochs, "alpha": alpha, "T": temp, "seed": seed, "layers": layers}
    if rc == 0:
        m = json.loads((out / "metrics.json").read_text())
        row.update(test=m["test"]["accuracy"], validation=m["validation"]["accuracy"], best_step=m["best_step"],
                   train_seconds=m["train_seconds"], teacher_test=m["distill"]["teacher_test"]["accuracy"])
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(row, flush=True)
