"""Data sets by hub id: mirrors, this project's copies, the carve-out of validation, and one-line refusals."""

from __future__ import annotations

import random

import datasets
import pytest
import yaml
from battery import refuses, snapshot
from conftest import SHARED_DATA, tiny_recipe

import recipes
from finetune import sources
from finetune.config import DataConfig
from finetune.data import label_names, load_splits
from finetune.errors import DataError


@pytest.fixture
def mirrors(tmp_path, monkeypatch):
    """Write a $FINETUNE_MIRRORS file (id -> folder) and point the environment at it."""
    def write(entries: dict[str, str]):
        path = tmp_path / "mirrors.yaml"
        path.write_text(yaml.safe_dump(entries))
        monkeypatch.setenv("FINETUNE_MIRRORS", str(path))
        return path
    monkeypatch.delenv("FINETUNE_MIRRORS", raising=False)
    return write


def toy_recipe(tiny_backbone, tmp_path, data: dict, **sections):
    return tiny_recipe(tiny_backbone, tmp_path, tmp_path, data={"path": "someone/toy", **data}, **sections)


# --- mirrors ---------------------------------------------------------------------------------


def test_mirror_entry_trains_a_recipe_that_names_a_hub_id(tiny_backbone, sentiment_dir, mirrors, tmp_path, capsys):
    """A recipe with data.path: someone/toy trains offline from the folder the mirror file maps it to."""
    mirrors({"someone/toy": str(sentiment_dir)})
    recipe = toy_recipe(tiny_backbone, tmp_path, {"max_train_samples": 64},
                        train={"epochs": 1, "batch_size": 32, "eval_every": "epoch"})
    source = sources.locate(recipe.data)
    assert (source.kind, source.folder) == ("files", sentiment_dir)
    result = recipe.run()
    assert f"someone/toy: reading mirror {sentiment_dir}" in capsys.readouterr().err  # where the data came from
    assert {"accuracy", "f1_macro"} <= set(result.metrics["test"])
    assert sources.describe(recipe.data) == f"someone/toy from mirror {sentiment_dir}"
    assert sorted(p.name for p in sources.local_files(recipe.data)) == ["test.tsv", "train.tsv", "validation.tsv"]


def test_mirror_folder_may_be_relative_to_the_file_and_keyed_by_configuration(sentiment_dir, mirrors, tmp_path):
    """'id:name' entries serve data.name; a relative folder is relative to the mirror file."""
    (tmp_path / "copies").mkdir()
    (tmp_path / "copies" / "toy").symlink_to(sentiment_dir)
    mirrors({"someone/toy:small": "copies/toy"})
    raw = load_splits(DataConfig(path="someone/toy", name="small", columns={"text": "sentence"}))
    assert [len(raw[s]) for s in ("train", "validation", "test")] == [192, 64, 64]
    with pytest.raises(DataError, match="someone/toy"):  # without the name, no entry matches
        load_splits(DataConfig(path="someone/toy", columns={"text": "sentence"}))


def _hub_like(tmp_path) -> datasets.DatasetDict:
    """A data set as the hub ships it: integer ClassLabel ids, an idx column, a test split without labels."""
    features = datasets.Features({"idx": datasets.Value("int32"), "sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    def split(n, labeled=True):
        return datasets.Dataset.from_dict({"idx": list(range(n)), "sentence": [f"text {i}" for i in range(n)],
                                           "label": [i % 2 if labeled else -1 for i in range(n)]}, features=features)
    return datasets.DatasetDict({"train": split(40), "validation": split(10), "test": split(12, labeled=False)})


def test_mirror_of_a_saved_data_set_names_its_classes(mirrors, tmp_path):
    """A save_to_disk folder reads like the hub: class ids become class names, splits by recipe role."""
    _hub_like(tmp_path).save_to_disk(tmp_path / "saved")
    mirrors({"someone/toy": str(tmp_path / "saved")})
    cfg = DataConfig(path="someone/toy", columns={"text": "sentence"},
                     splits={"validation_from_train": 8, "test": "validation"})
    before = snapshot(tmp_path / "saved")
    raw = load_splits(cfg)
    assert snapshot(tmp_path / "saved") == before  # no cache files written into the mirror
    assert [len(raw[s]) for s in ("train", "validation", "test")] == [32, 8, 10]
    assert set(raw["train"]["label"]) == {"negative", "positive"}


def test_mirror_of_a_downloaded_hub_repository(mirrors, tmp_path):
    """A folder laid out like a hub repository (data/<split>-00000-of-00001.parquet) loads through datasets."""
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    for name, ds in _hub_like(tmp_path).items():
        ds.to_parquet(repo / f"{name}-00000-of-00001.parquet")
    mirrors({"someone/toy": str(tmp_path / "repo")})
    assert sources.locate(DataConfig(path="someone/toy")).kind == "repo"
    raw = load_splits(DataConfig(path="someone/toy", columns={"text": "sentence"}, splits={"test": None}))
    assert (len(raw["train"]), len(raw["validation"])) == (40, 10)


# --- this project's copies -------------------------------------------------------------------


def test_shipped_id_resolves_to_the_shared_copy_with_hub_splits_and_class_names(monkeypatch):
    """stanfordnlp/sst2 offline: train = train.tsv + validation.tsv (the hub's train), the hub's validation
    = test.tsv, labels as the hub's class names; a carve-out gives back 10 % of train for validation."""
    monkeypatch.delenv("FINETUNE_MIRRORS", raising=False)
    cfg = DataConfig(path="stanfordnlp/sst2", columns={"text": "sentence"},
                     splits={"validation_from_train": 0.1, "test": "validation"})
    source = sources.locate(cfg)
    assert source.folder == SHARED_DATA / "sst2" and source.copy is not None
    raw = load_splits(cfg)
    assert [len(raw[s]) for s in ("train", "validation", "test")] == [60_614, 6_735, 872]
    assert set(raw["test"]["label"]) == {"negative", "positive"}


def test_a_mirror_entry_wins_over_the_shipped_copy(sentiment_dir, mirrors):
    mirrors({"stanfordnlp/sst2": str(sentiment_dir)})
    assert sources.locate(DataConfig(path="stanfordnlp/sst2")).folder == sentiment_dir


# data sets that exist only in this project's data folder (derived ones, with no hub id to name)
LOCAL_ONLY = {"conll2003_entity_types_minilm": "conll2003_entity_types"}


@pytest.mark.parametrize("name", sorted(recipes.available()))
def test_each_shipped_recipe_reads_its_hub_id_from_a_local_copy_here(name, monkeypatch):
    """Every shipped recipe names a hub id, which resolves offline to an existing folder of this project's
    data (a data set derived here names that folder); every split it reads loads, with the recipe's columns
    and labels."""
    monkeypatch.delenv("FINETUNE_MIRRORS", raising=False)
    recipe = recipes.load(name)
    source = sources.locate(recipe.data)
    if name in LOCAL_ONLY:
        assert recipe.data.path == "${FINETUNE_DATA_DIR}/" + LOCAL_ONLY[name] and source.folder.is_dir(), source
    else:
        assert "FINETUNE_DATA_DIR" not in recipe.data.path and sources.HUB_ID.fullmatch(recipe.data.path)
        assert source.copy is not None and source.folder.is_dir(), source
    assert all(f.is_file() for f in sources.local_files(recipe.data))
    raw = load_splits(recipe.data)
    assert set(raw) == {"train", "validation", "test"}
    assert label_names(recipe, raw)  # every label of every split is in the recipe's label set


# --- the carve-out ---------------------------------------------------------------------------


def _rows(n: int, seed: int = 0) -> datasets.Dataset:
    rng = random.Random(seed)
    return datasets.Dataset.from_dict({"text": [f"row {i} {rng.random()}" for i in range(n)],
                                       "label": [str(i % 3) for i in range(n)]})


@pytest.mark.parametrize(("carve", "held"), [(0.1, 100), (0.25, 250), (37, 37), (0.0004, 0)])
def test_carve_out_sizes_and_no_overlap(carve, held):
    rows = _rows(1000)
    cfg = DataConfig(path="x")
    if held == 0:  # 0.4 rows rounds to none
        with pytest.raises(DataError, match="validation_from_train"):
            sources.carve_validation(rows, carve, 0, cfg)
        return
    train, validation = sources.carve_validation(rows, carve, 0, cfg)
    assert (len(train), len(validation)) == (1000 - held, held)
    assert not set(list(train["text"])) & set(list(validation["text"]))
    assert sorted(list(train["text"]) + list(validation["text"])) == sorted(list(rows["text"]))


def test_carve_out_is_seeded_and_independent_of_row_order():
    """The same seed gives the same rows (in any row order); another seed gives other rows."""
    rows, cfg = _rows(500), DataConfig(path="x")
    _, first = sources.carve_validation(rows, 0.2, 3, cfg)
    _, again = sources.carve_validation(rows, 0.2, 3, cfg)
    _, shuffled = sources.carve_validation(rows.shuffle(seed=11), 0.2, 3, cfg)
    _, other = sources.carve_validation(rows, 0.2, 4, cfg)
    assert list(first["text"]) == list(again["text"])
    assert sorted(list(first["text"])) == sorted(list(shuffled["text"]))
    assert set(list(first["text"])) != set(list(other["text"]))


def _phrases() -> datasets.Dataset:
    """Sentences with their phrases, as SST-2's training split holds them (and a repeated sentence)."""
    sentences = [f"the {adj} film was {adv} {verdict} ." for adj in ("long", "short", "odd", "new", "old")
                 for adv, verdict in (("very", "good"), ("not", "bad"))]
    texts = []
    for sentence in sentences:
        words = sentence.split()
        texts += [sentence, " ".join(words[1:3]), " ".join(words[3:6]), " ".join(words[:2])]
    texts.append(sentences[0])
    return datasets.Dataset.from_dict({"text": texts, "label": [str(len(t) % 2) for t in texts]})


def test_whole_text_carve_out_holds_out_sentences_and_every_phrase_inside_them():
    rows = _phrases()
    cfg = DataConfig(path="x", splits={"validation_from_train": 0.3, "validation_by": "whole_text"})
    train, validation = sources.carve_validation(rows, 0.3, 0, cfg)
    held = list(validation["text"])
    assert len(held) == 3 and all(t.startswith("the ") and t.endswith(" .") for t in held)  # 30 % of 10 sentences
    for text in train["text"]:  # no training row is (a part of) a held-out sentence ...
        assert not any(f" {text} " in f" {sentence} " for sentence in held), text
    # ... and every other row trains: the rows gone are the held sentences' own phrases and repeats
    gone = [t for t in rows["text"] if t not in set(train["text"])]
    assert all(any(f" {t} " in f" {sentence} " for sentence in held) for t in gone)
    expected = [t for t in rows["text"] if not any(f" {t} " in f" {sentence} " for sentence in held)]
    assert list(train["text"]) == expected and len(expected) == 15  # phrases shared with other sentences go too
    _, again = sources.carve_validation(rows.shuffle(seed=3), 0.3, 0, cfg)
    assert sorted(held) == sorted(again["text"])  # seeded by content, not position
    _, other = sources.carve_validation(rows, 0.3, 1, cfg)
    assert set(other["text"]) != set(held)
    pairs = DataConfig(path="x", columns={"text": "text", "text_pair": "other"},
                       splits={"validation_from_train": 0.3, "validation_by": "whole_text"})
    with pytest.raises(DataError, match="validation_by=whole_text reads one text column"):
        sources.carve_validation(rows, 0.3, 0, pairs)
    with pytest.raises(DataError, match="has 10 whole texts, which leaves no training texts"):
        sources.carve_validation(rows, 10, 0, cfg)
    with pytest.raises(ValueError, match="validation_by=whole_text chooses how validation_from_train draws"):
        DataConfig(path="x", splits={"validation_by": "whole_text"})


def test_carve_out_from_a_local_folder_leaves_the_test_file_alone(sentiment_dir, tmp_path):
    """A local folder with validation_from_train: validation.tsv is not read, test.tsv is read as is."""
    folder = tmp_path / "two-files"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.tsv").write_text((sentiment_dir / f"{split}.tsv").read_text())
    cfg = DataConfig(path=str(folder), columns={"text": "sentence"},
                     splits={"validation_from_train": 0.25}, subsample_seed=5)
    raw = load_splits(cfg)
    assert [len(raw[s]) for s in ("train", "validation", "test")] == [144, 48, 64]
    assert list(load_splits(cfg)["validation"]["sentence"]) == list(raw["validation"]["sentence"])


@pytest.mark.parametrize(("splits", "message"), [
    ({"validation": "dev", "validation_from_train": 0.1}, "both give the validation split"),
    ({"validation": None}, "carve one with validation_from_train"),
    ({"validation_from_train": 0}, "a fraction in"),
    ({"validation_from_train": True}, "not a yes/no"),
])
def test_splits_keys_are_checked(splits, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(path="x", splits=splits)


# --- refusals: one line, nothing written -----------------------------------------------------


def _recipe_file(tmp_path, tiny_backbone, data: dict) -> str:
    raw = {"name": "t", "backbone": {"name": str(tiny_backbone)}, "head": {"pooling": "mean"},
           "data": {"columns": {"text": "sentence"}, "max_length": 16, **data},
           "train": {"epochs": 1, "batch_size": 16}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _unlabeled_mirror(tmp_path, mirrors):
    _hub_like(tmp_path).save_to_disk(tmp_path / "saved")
    mirrors({"someone/toy": str(tmp_path / "saved")})


CASES = {
    # id: (data section, mirror set-up, names the message must contain)
    "unknown id offline": ({"path": "nobody/nothing"}, None, ["nobody/nothing", "FINETUNE_MIRRORS", "offline"]),
    "id missing from the mirror file": ({"path": "nobody/nothing"}, {"someone/else": "/tmp"},
                                        ["nobody/nothing", "mirrors.yaml", "no entry"]),
    "mirror folder missing": ({"path": "someone/toy"}, {"someone/toy": "/nonexistent/toy"},
                              ["someone/toy", "/nonexistent/toy"]),
    "pinned revision skips mirrors": ({"path": "someone/toy", "revision": "v2"}, "sentiment",
                                      ["someone/toy", "revision=v2", "drop data.revision"]),
    "split the shipped copy lacks": ({"path": "stanfordnlp/sst2", "splits": {"test": "test"}}, None,
                                     ["data.splits.test", "'test'", "stanfordnlp/sst2"]),
    "hub test split is unlabeled": ({"path": "someone/toy"}, "unlabeled", ["data.splits.test", "split 'test'", "unlabeled"]),
    "carve-out larger than train": ({"path": "someone/toy", "splits": {"validation_from_train": 500}}, "sentiment",
                                    ["validation_from_train=500", "192 rows"]),
    "carve-out fraction of 1.5": ({"path": "someone/toy", "splits": {"validation_from_train": 1.5}}, "sentiment",
                                  ["validation_from_train"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_source_is_refused_in_one_line(case, tiny_backbone, sentiment_dir, mirrors, tmp_path, capsys):
    data, mirror, names = CASES[case]
    if mirror == "sentiment":
        mirrors({"someone/toy": str(sentiment_dir)})
    elif mirror == "unlabeled":
        _unlabeled_mirror(tmp_path, mirrors)
    elif mirror is not None:
        mirrors(mirror)
    recipe = _recipe_file(tmp_path, tiny_backbone, data)
    refuses(capsys, ["train", "--recipe", recipe, f"output.dir={tmp_path / 'run'}"], names, tree=tmp_path,
            may_appear=("run",))


def test_unreadable_mirror_file_is_named_with_its_line(tiny_backbone, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "mirrors.yaml"
    bad.write_text("someone/toy: /data/toy\n  nested: [unclosed\n")
    monkeypatch.setenv("FINETUNE_MIRRORS", str(bad))
    recipe = _recipe_file(tmp_path, tiny_backbone, {"path": "someone/toy"})
    refuses(capsys, ["train", "--recipe", recipe, f"output.dir={tmp_path / 'run'}"], ["mirrors.yaml", "line 2"],
            tree=tmp_path, may_appear=("run",))
