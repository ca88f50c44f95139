"""Run folders load with plain transformers / peft and predict exactly what the framework predicts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_recipe

import finetune  # noqa: F401  registers the architecture with the Auto classes
from finetune.predict import load_run, predict

TEXTS = ["the movie was great and lovely", "a dull and boring plot", "the actor", "superb"]


def _framework_probabilities(run_dir) -> torch.Tensor:
    run = load_run(run_dir)
    results = predict(run, TEXTS)
    return torch.tensor([[r["probabilities"][name] for name in run.labels] for r in results])


def _pipeline_probabilities(model_dir, **kwargs) -> torch.Tensor:
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(model_dir), top_k=None, **kwargs)
    rows = []
    for scores in classify(TEXTS):
        by_label = {s["label"]: s["score"] for s in scores}
        rows.append([by_label[name] for name in sorted(by_label)])
    return torch.tensor(rows)


@pytest.mark.parametrize("kind", ["full", "head_only"])
def test_pipeline_loads_plain_runs_with_identical_predictions(kind, tiny_backbone, sentiment_dir, tmp_path):
    """transformers.pipeline(model=RUN_DIR) gives the framework's probabilities for full and head-only runs."""
    result = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, policy={"kind": kind}, train={"max_steps": 6}).run()
    ours = _framework_probabilities(result.run_dir)
    assert torch.allclose(_pipeline_probabilities(result.run_dir), ours, atol=1e-5)


def test_lora_adapter_loads_with_peft_and_merged_model_with_pipeline(tiny_backbone, sentiment_dir, tmp_path):
    """AutoPeftModel loads the adapter run; the merged model loads with pipeline; both match the framework."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, policy={"kind": "lora", "lora": {"rank": 4}},
                         train={"max_steps": 6, "lr": 1e-2}, output={"dir": str(tmp_path / "run"), "merge_lora": True})
    run_dir = recipe.run().run_dir
    assert (run_dir / "adapter_model.safetensors").is_file() and not (run_dir / "model.safetensors").exists()
    ours = _framework_probabilities(run_dir)

    model = AutoPeftModelForSequenceClassification.from_pretrained(str(run_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    assert torch.allclose(logits.softmax(-1), ours, atol=1e-5)
    assert torch.allclose(_pipeline_probabilities(run_dir / "merged"), ours, atol=1e-4)
    # the trained head is part of the adapter, not left at its random initialisation
    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    assert "classifier" in adapter["modules_to_save"]


def test_run_folder_loads_without_finetune_installed_via_remote_code(tiny_backbone, sentiment_dir, tmp_path):
    """A fresh interpreter that never imports finetune loads the run with trust_remote_code=True."""
    run_dir = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"max_steps": 4}).run().run_dir
    expected = _framework_probabilities(run_dir)
    code = f"""
import json, sys
sys.modules['finetune'] = None  # make any import of our package fail
from transformers import pipeline
classify = pipeline('text-classification', model={str(run_dir)!r}, top_k=None, trust_remote_code=True)
print(json.dumps([sorted((s['label'], s['score']) for s in row) for row in classify({TEXTS!r})]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    got = torch.tensor([[score for _, score in row] for row in json.loads(out.stdout.strip().splitlines()[-1])])
    assert torch.allclose(got, expected, atol=1e-5)


def test_token_classification_run_loads_with_auto_class(tiny_backbone, ner_dir, tmp_path):
    """AutoModelForTokenClassification loads a tagging run and agrees with finetune.predict."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    recipe = tiny_recipe(tiny_backbone, ner_dir, tmp_path, task="token_classification",
                         data={"path": str(ner_dir), "columns": {"tokens": "tokens", "tags": "ner_tags"}},
                         train={"max_steps": 4}, eval={"metrics": ["entity_f1"], "primary": "entity_f1"})
    run_dir = recipe.run().run_dir
    words = [["paris", "the", "movie"], ["kuala", "lumpur", "and", "it"]]
    ours = predict(load_run(run_dir), words)
    model = AutoModelForTokenClassification.from_pretrained(str(run_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    enc = tokenizer(words, is_split_into_words=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**enc).logits.argmax(-1)
    for i, sentence in enumerate(ours):
        firsts = [p for p, w in enumerate(enc.word_ids(i)) if w is not None and (p == 0 or enc.word_ids(i)[p - 1] != w)]
        assert sentence["tags"] == [model.config.id2label[int(predicted[i, p])] for p in firsts]
        assert len(sentence["tags"]) == len(words[i])


def test_moved_lora_run_still_loads_and_predicts_the_same(tiny_backbone, sentiment_dir, tmp_path):
    """A LoRA run folder copied elsewhere loads its own base/, not the absolute path it was saved with."""
    import shutil

    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, policy={"kind": "lora", "lora": {"rank": 4}},
                         train={"max_steps": 4, "lr": 1e-2})
    run_dir = recipe.run().run_dir
    before = _framework_probabilities(run_dir)
    moved = tmp_path / "elsewhere"
    shutil.move(str(run_dir), moved)
    assert torch.allclose(_framework_probabilities(moved), before, atol=1e-6)
