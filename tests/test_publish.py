"""What leaves the run folder is true: the saved tokenizer truncates where training did, the model card
says what the scores were computed on, and the load lines in the card work as written."""

from __future__ import annotations

import json
import re
import shutil
import stat

import pytest
import torch
import yaml
from conftest import tiny_recipe

import finetune  # noqa: F401  registers the architecture with the Auto classes
from finetune import Recipe
from finetune.predict import load_run, predict
from finetune.publish import SplitRows, write_model_card

MAX_LENGTH = 8
# each one tokenises to far more than MAX_LENGTH tokens, and the part past the cut changes the prediction
LONG_TEXTS = [
    "the movie was dull and boring and the plot was poor but the actor was great lovely superb nice fine good",
    "a great and lovely film really quite superb yet the story was awful terrible bad dull boring and poor",
    "the actor",
]


def _python_block(card: str) -> str:
    """The first python code block of the card's Load section."""
    load = card.split("## Load", 1)[1]
    return re.search(r"```python\n(.*?)```", load, re.S).group(1)


def _header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def _probabilities(run_dir, texts) -> torch.Tensor:
    run = load_run(run_dir)
    return torch.tensor([[r["probabilities"][name] for name in run.labels] for r in predict(run, texts)])


def _pipeline_probabilities(classify, texts, labels) -> torch.Tensor:
    rows = []
    for scores in classify(texts, top_k=None):
        by_label = {s["label"]: s["score"] for s in scores}
        rows.append([by_label[name] for name in labels])
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def plain_run(tiny_backbone, sentiment_dir, tmp_path_factory):
    return tiny_recipe(tiny_backbone, sentiment_dir, tmp_path_factory.mktemp("plain"), train={"max_steps": 6},
                       data={"max_length": MAX_LENGTH, "max_test_samples": 20}).run().run_dir


@pytest.fixture(scope="module")
def lora_run(tiny_backbone, sentiment_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    return tiny_recipe(tiny_backbone, sentiment_dir, folder, policy={"kind": "lora", "lora": {"rank": 4}},
                       train={"max_steps": 6, "lr": 1e-2}, data={"max_length": MAX_LENGTH},
                       output={"dir": str(folder / "run"), "merge_lora": True}).run().run_dir


# --- the saved tokenizer ----------------------------------------------------------------------


def test_pipeline_from_the_cards_line_matches_predict_on_inputs_over_max_length(plain_run, monkeypatch):
    """The card's pipeline line, run in the run folder, truncates at data.max_length like finetune predict."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plain_run)
    assert tokenizer.model_max_length == MAX_LENGTH
    assert json.loads((plain_run / "tokenizer_config.json").read_text())["model_max_length"] == MAX_LENGTH
    assert all(len(tokenizer(text, truncation=False)["input_ids"]) > MAX_LENGTH for text in LONG_TEXTS[:2])
    expected = _probabilities(plain_run, LONG_TEXTS)

    namespace: dict = {}
    monkeypatch.chdir(plain_run)
    exec(_python_block((plain_run / "README.md").read_text()), namespace)
    labels = load_run(plain_run).labels
    assert torch.allclose(_pipeline_probabilities(namespace["classify"], LONG_TEXTS, labels), expected, atol=1e-5)
    # the inputs do reach past the cut: read whole, they are classified differently
    untruncated = _pipeline_probabilities(namespace["classify"].__class__(
        model=namespace["classify"].model, tokenizer=namespace["classify"].tokenizer), LONG_TEXTS, labels)
    assert (untruncated - expected).abs().max() > 1e-4


def test_token_classification_pipeline_truncates_like_predict(tiny_backbone, ner_dir, tmp_path):
    """pipeline('token-classification') cuts at the saved model_max_length and tags like finetune predict."""
    from transformers import pipeline

    recipe = tiny_recipe(tiny_backbone, ner_dir, tmp_path, task="token_classification",
                         data={"path": str(ner_dir), "columns": {"tokens": "tokens", "tags": "ner_tags"},
                               "max_length": MAX_LENGTH},
                         train={"max_steps": 4}, eval={"metrics": ["entity_f1"], "primary": "entity_f1"})
    run_dir = recipe.run().run_dir
    words = ["kuala", "lumpur", "and", "the", "movie", "was", "quite", "really", "a", "plot", "paris", "berlin"]
    ours = predict(load_run(run_dir), [words])[0]
    assert len(ours["tags"]) < len(words)  # the cut falls inside the sentence

    tag = pipeline("token-classification", model=str(run_dir), ignore_labels=[])
    found = tag(" ".join(words))
    enc = tag.tokenizer(" ".join(words), truncation=True)
    word_ids = enc.word_ids()
    firsts = [p for p, w in enumerate(word_ids) if w is not None and (p == 0 or word_ids[p - 1] != w)]
    assert max(entity["index"] for entity in found) < MAX_LENGTH
    by_index = {entity["index"]: entity["entity"] for entity in found}
    assert [by_index[p] for p in firsts] == ours["tags"]


def test_lora_run_loads_with_pipeline_and_matches_predict(lora_run):
    """pipeline(model=LORA_RUN) loads the adapter on base/ (whose tokenizer it reads) and agrees with predict."""
    from transformers import AutoTokenizer, pipeline

    assert AutoTokenizer.from_pretrained(lora_run / "base").model_max_length == MAX_LENGTH
    assert AutoTokenizer.from_pretrained(lora_run / "merged").model_max_length == MAX_LENGTH
    expected = _probabilities(lora_run, LONG_TEXTS)
    labels = load_run(lora_run).labels
    classify = pipeline("text-classification", model=str(lora_run), truncation=True)
    assert torch.allclose(_pipeline_probabilities(classify, LONG_TEXTS, labels), expected, atol=1e-5)
    merged = pipeline("text-classification", model=str(lora_run / "merged"), truncation=True)
    assert torch.allclose(_pipeline_probabilities(merged, LONG_TEXTS, labels), expected, atol=1e-4)


def test_moved_lora_run_loads_with_the_cards_line(tiny_backbone, sentiment_dir, tmp_path, monkeypatch):
    """After shutil.move, the card's load line gives the logits AutoPeftModel gave before the move."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer, pipeline

    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, policy={"kind": "lora", "lora": {"rank": 4}},
                         train={"max_steps": 4, "lr": 1e-2}, data={"max_length": MAX_LENGTH})
    run_dir = recipe.run().run_dir
    enc = AutoTokenizer.from_pretrained(run_dir)(LONG_TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        before = AutoPeftModelForSequenceClassification.from_pretrained(str(run_dir)).eval()(**enc).logits

    moved = tmp_path / "elsewhere" / "my-model"
    moved.parent.mkdir()
    shutil.move(str(run_dir), moved)
    # what the card warns about: peft and pipeline() look for the base where it was, not beside the adapter;
    # their errors at least name that old path
    with pytest.raises(Exception, match=re.escape(str(run_dir / "base"))):
        AutoPeftModelForSequenceClassification.from_pretrained(str(moved))
    with pytest.raises(Exception, match=re.escape(str(run_dir / "base"))):
        pipeline("text-classification", model=str(moved))

    namespace: dict = {}
    monkeypatch.chdir(moved)
    exec(_python_block((moved / "README.md").read_text()), namespace)
    moved_enc = namespace["tokenizer"](LONG_TEXTS, padding=True, truncation=True, return_tensors="pt")
    assert torch.equal(moved_enc["input_ids"], enc["input_ids"])
    with torch.no_grad():
        after = namespace["model"].eval()(**moved_enc).logits
    assert torch.allclose(after, before, atol=1e-5)


def test_exported_files_have_the_folders_permissions(plain_run, lora_run):
    """Weights are not left 0600 beside 0644 json: every exported file has recipe.yaml's mode."""
    for run_dir in (plain_run, lora_run):
        expected = stat.S_IMODE((run_dir / "recipe.yaml").stat().st_mode)
        for folder in (run_dir, run_dir / "base", run_dir / "merged"):
            exported = [p for p in folder.glob("*") if p.is_file()] if folder.is_dir() else []
            assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in exported} == {p.name: expected for p in exported}
    assert (lora_run / "base" / "model.safetensors").is_file() and (lora_run / "merged" / "model.safetensors").is_file()


# --- the model card ---------------------------------------------------------------------------


def test_card_of_a_run_is_true(plain_run):
    """Metadata header, expanded source, rows per split, truncation, relative load line, no PyPI link."""
    card = (plain_run / "README.md").read_text()
    metrics = json.loads((plain_run / "metrics.json").read_text())
    header = _header(card)
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "text-classification"
    assert {"finetune", "classification", "policy-full"} <= set(header["tags"])
    assert "base_model" not in header and "datasets" not in header  # local folders are not hub ids
    results = {r["dataset"]["split"]: {m["type"]: m["value"] for m in r["metrics"]}
               for r in header["model-index"][0]["results"]}
    for split in ("validation", "test"):
        assert results[split] == pytest.approx(metrics[split], abs=1e-6)
    assert "test (`test`): 20 rows, a seeded subsample of 64 (data.max_test_samples=20" in card
    assert f"{MAX_LENGTH} tokens" in card
    assert "pypi" not in card.lower() and "finetune (this project)" in card
    load = card.split("## Load", 1)[1]
    assert 'model="."' in load and "Run this from this folder" in load and str(plain_run) not in load


def _card_for(tmp_path, rows=None, extra="", **sections) -> str:
    raw = {"name": "card", "backbone": {"name": "sentence-transformers/all-MiniLM-L6-v2"},
           "data": {"path": "stanfordnlp/sst2", "columns": {"text": "sentence"}, "max_length": 64}}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    metrics = {"best_step": 30, "validation": {"loss": 0.31, "accuracy": 0.875},
               "test": {"loss": 0.35, "accuracy": 0.8624}}
    write_model_card(Recipe.from_dict(raw), tmp_path, metrics, 1000, 5000, rows=rows, extra=extra)
    return (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("policy, library, relation", [("full", "transformers", "finetune"),
                                                       ("lora", "peft", "adapter")])
def test_card_header_names_hub_backbone_and_dataset(policy, library, relation, tmp_path, monkeypatch):
    """Hub ids become base_model and datasets; metrics carry their values per split."""
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(tmp_path / "no-copies"))  # no local copy: the hub
    card = _card_for(tmp_path, policy={"kind": policy})
    header = _header(card)
    assert header["library_name"] == library
    assert header["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert header["base_model_relation"] == relation
    assert header["datasets"] == ["stanfordnlp/sst2"]
    assert f"policy-{policy}" in header["tags"] and "classification" in header["tags"]
    assert header["metrics"] == ["loss", "accuracy"]
    results = header["model-index"][0]["results"]
    assert [(r["dataset"]["split"], r["metrics"][1]["value"]) for r in results] == [("validation", 0.875),
                                                                                     ("test", 0.8624)]
    assert "| data | `stanfordnlp/sst2 from the hub` |" in card


def test_card_shows_the_expanded_data_path(tmp_path, monkeypatch):
    """${FINETUNE_DATA_DIR} is shown as the folder it was at training time."""
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "data" / "sst2").mkdir(parents=True)
    card = _card_for(tmp_path, data={"path": "${FINETUNE_DATA_DIR}/sst2"})
    assert f"`{tmp_path / 'data' / 'sst2'}`" in card
    assert "datasets" not in _header(card)


@pytest.mark.parametrize("counted, limit, expected", [
    (SplitRows(200, 872), 200, "test (`test`): 200 rows, a seeded subsample of 872 (data.max_test_samples=200, "
                               "data.subsample_seed=0)"),
    (SplitRows(872, 872), None, "test (`test`): 872 rows, no subsample"),
    (SplitRows(50), 200, "test (`test`): 50 rows, no subsample"),  # a split smaller than the limit
    (SplitRows(200), 200, "test (`test`): 200 rows (data.max_test_samples=200: a seeded subsample if the split "
                          "holds more)"),
    (None, 200, "test (`test`): a seeded subsample of at most 200 rows (data.max_test_samples=200"),
    (None, None, "test (`test`): every row of the split"),
    (SplitRows(870, 870, {"empty_text": 2}), None,
     "test (`test`): 870 rows, no subsample; 2 row(s) with empty text dropped (data.on_empty_text: drop)"),
])
def test_card_says_which_rows_each_score_was_computed_on(counted, limit, expected, tmp_path):
    """A subsample is never presented as the full split, and dropped rows are counted."""
    card = _card_for(tmp_path, rows={"test": counted} if counted else None, data={"max_test_samples": limit})
    assert expected in card


def test_card_names_a_carved_validation_split(tmp_path):
    card = _card_for(tmp_path, data={"splits": {"validation": None, "validation_from_train": 0.1}})
    assert "validation (carved from `train`, data.splits.validation_from_train=0.1)" in card
    assert [r["dataset"]["split"] for r in _header(card)["model-index"][0]["results"]] == ["validation", "test"]


def test_card_without_test_split_says_so(tmp_path):
    card = _card_for(tmp_path, data={"splits": {"test": None}}, extra="## Pruning\n\nreport")
    assert "No test split" in card and "test (" not in card.split("## Data", 1)[1].split("##", 1)[0]
    assert card.rstrip().endswith("## Pruning\n\nreport")
