"""Data: length-grouped sampling, label sets, loading split files, tokenisation and collation."""

import math
import random
import shutil
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_tsv
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from finetune.config import RecipeError
from finetune.data import (
    LengthGroupedSampler,
    expand_path,
    label_names,
    load_splits,
    make_collator,
    tokenize,
)


def recipe_for(data_path, tmp_path, **sections):
    """A tiny recipe whose backbone is never loaded (only data functions run)."""
    return tiny_recipe(Path("unused-backbone"), data_path, tmp_path, **sections)


def splits(**columns_by_split) -> DatasetDict:
    """An in-memory DatasetDict, e.g. splits(train={"label": [...]}, validation={...})."""
    return DatasetDict({name: Dataset.from_dict(cols) for name, cols in columns_by_split.items()})


@pytest.fixture(scope="module")
def tokenizer(tiny_backbone):
    return AutoTokenizer.from_pretrained(tiny_backbone)


# --- LengthGroupedSampler -----------------------------------------------------------------


def padded_tokens(order, lengths, batch_size):
    """Tokens a DataLoader batches the order into, after padding each batch to its longest example."""
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(max(lengths[i] for i in chunk) * len(chunk) for chunk in chunks)


_rng = random.Random(0)
LENGTHS = [_rng.randint(1, 128) for _ in range(1003)]  # 1003 = 2.5 mega-batches of 16, not divisible by 16


@pytest.mark.parametrize("group", [True, False])
def test_sampler_is_a_permutation_every_epoch(group):
    """Each epoch yields every index exactly once, with or without grouping."""
    sampler = LengthGroupedSampler(LENGTHS, batch_size=16, seed=3, group_by_length=group)
    assert len(sampler) == len(LENGTHS)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        assert sorted(sampler) == list(range(len(LENGTHS)))


@pytest.mark.parametrize("group", [True, False])
def test_sampler_order_is_seeded_per_epoch(group):
    """The same seed and epoch repeat the order; another epoch or seed changes it."""
    def order(seed, epoch):
        sampler = LengthGroupedSampler(LENGTHS, batch_size=16, seed=seed, group_by_length=group)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1, 0) == order(1, 0)
    assert order(1, 2) == order(1, 2)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(7, 0)


def test_grouping_cuts_padding_but_stays_shuffled():
    """Grouped batches pad far fewer tokens than a plain shuffle, yet batches are not sorted by length."""
    grouped = list(LengthGroupedSampler(LENGTHS, batch_size=16, seed=0))
    plain = list(LengthGroupedSampler(LENGTHS, batch_size=16, seed=0, group_by_length=False))
    assert padded_tokens(grouped, LENGTHS, 16) < 0.7 * padded_tokens(plain, LENGTHS, 16)
    assert padded_tokens(grouped, LENGTHS, 16) >= sum(LENGTHS)
    batch_max = [max(LENGTHS[i] for i in grouped[j:j + 16]) for j in range(0, len(grouped), 16)]
    assert batch_max != sorted(batch_max) and batch_max != sorted(batch_max, reverse=True)


@pytest.mark.parametrize("seed", range(5))
def test_short_batch_is_last_and_groups_stay_aligned(seed):
    """With 100 distinct lengths and batch 16, each consecutive chunk is one length band; the 4 shortest come last."""
    lengths = random.Random(seed).sample(range(1, 101), 100)
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=seed)
    sampler.set_epoch(seed)
    order = list(sampler)
    chunks = [sorted(lengths[i] for i in order[j:j + 16]) for j in range(0, 100, 16)]
    assert chunks[-1] == [1, 2, 3, 4]
    for chunk in chunks[:-1]:
        assert len(chunk) == 16
        assert chunk == list(range(chunk[0], chunk[0] + 16))  # a contiguous band of lengths
        assert (100 - chunk[-1]) % 16 == 0  # cut from the longest down, as the sampler batches


# --- label_names ----------------------------------------------------------------------------


def test_inferred_labels_sort_naturally(tmp_path):
    """Inferred labels sort numbers numerically ("2" before "10"), then names."""
    raw = splits(train={"label": ["10", "2", "1", "b", "a", "2"]}, validation={"label": ["1", "10"]})
    assert label_names(recipe_for("d", tmp_path), raw) == ["1", "2", "10", "a", "b"]
    raw = splits(train={"label": [10, 2, 1, -3]}, validation={"label": [1]})
    assert label_names(recipe_for("d", tmp_path), raw) == ["-3", "1", "2", "10"]


def test_given_labels_keep_their_order(tmp_path):
    """data.labels fixes the id order even when it is not sorted."""
    raw = splits(train={"label": ["neg", "pos", "neg"]}, validation={"label": ["pos"]})
    recipe = recipe_for("d", tmp_path, data={"path": "d", "labels": ["pos", "neutral", "neg"]})
    assert label_names(recipe, raw) == ["pos", "neutral", "neg"]


@pytest.mark.parametrize("split", ["validation", "test"])
def test_unknown_label_in_eval_split(split, tmp_path):
    """A label outside the set in another split names the split, the column and the value."""
    columns = {"train": {"y": ["a", "b"]}, "validation": {"y": ["a"]}, "test": {"y": ["b"]}}
    columns[split] = {"y": ["a", "zzz"]}
    recipe = recipe_for("d", tmp_path, data={"path": "d", "columns": {"label": "y"}})
    with pytest.raises(RecipeError, match=rf"split '{split}' column 'y' has label 'zzz' not in the label set \['a', 'b'\]"):
        label_names(recipe, splits(**columns))


def test_given_labels_must_cover_train(tmp_path):
    """With data.labels given, a training label outside it is an error too."""
    recipe = recipe_for("d", tmp_path, data={"path": "d", "labels": ["a", "b"]})
    with pytest.raises(RecipeError, match=r"split 'train' column 'label' has label 'c'.*\(data\.labels\)"):
        label_names(recipe, splits(train={"label": ["a", "c"]}, validation={"label": ["a"]}))


def test_fewer_than_two_labels(tmp_path):
    """A single class can't be classified."""
    with pytest.raises(RecipeError, match=r"1 label\(s\) \['same'\].*at least 2"):
        label_names(recipe_for("d", tmp_path), splits(train={"label": ["same"] * 3}, validation={"label": ["same"]}))


def test_token_classification_labels_come_from_tag_sequences(tmp_path):
    """Token classification infers the tag set from every tag in every sequence."""
    raw = splits(train={"tokens": [["a", "b"], ["c"]], "tags": [["O", "B-X"], ["I-X"]]},
                 validation={"tokens": [["a"]], "tags": [["O"]]})
    assert label_names(recipe_for("d", tmp_path, task="token_classification"), raw) == ["B-X", "I-X", "O"]


# --- load_splits ----------------------------------------------------------------------------


def test_missing_split_file_names_the_split(sentiment_dir, tmp_path):
    """A configured split without a file is named in the error; splits.test=null skips it."""
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "validation"):
        shutil.copy(sentiment_dir / f"{split}.tsv", folder)
    with pytest.raises(RecipeError, match=r"data\.splits\.test: no file 'test'"):
        load_splits(recipe_for(folder, tmp_path).data)
    raw = load_splits(recipe_for(folder, tmp_path, data={"path": str(folder), "splits": {"test": None}}).data)
    assert set(raw) == {"train", "validation"}


def test_empty_split_is_an_error(sentiment_dir, tmp_path):
    """A split file with only a header row is reported as an empty split."""
    folder = tmp_path / "data"
    shutil.copytree(sentiment_dir, folder)
    write_tsv(folder / "validation.tsv", ["sentence", "label"], [])
    with pytest.raises(RecipeError, match=r"split 'validation' .*validation\.tsv\) has no rows \(only a header line\)"):
        load_splits(recipe_for(folder, tmp_path).data)


def test_max_train_samples_is_a_seeded_subsample(sentiment_dir, tmp_path):
    """Subsamples have the requested sizes, repeat for a seed, and change with it."""
    def load(seed, **data):
        return load_splits(recipe_for(sentiment_dir, tmp_path,
                                      data={"path": str(sentiment_dir), "subsample_seed": seed, **data}).data)

    full = load(0)
    assert [len(full[s]) for s in ("train", "validation", "test")] == [192, 64, 64]
    a, b, c = load(0, max_train_samples=50), load(0, max_train_samples=50), load(1, max_train_samples=50)
    assert [len(a[s]) for s in ("train", "validation", "test")] == [50, 64, 64]
    assert a["train"]["sentence"] == b["train"]["sentence"]
    assert a["train"]["sentence"] != c["train"]["sentence"]
    assert set(a["train"]["sentence"]) <= set(full["train"]["sentence"])
    assert a["train"]["sentence"] != full["train"]["sentence"][:50]  # random, not the head of the file
    evals = load(0, max_eval_samples=10, max_test_samples=7, max_train_samples=500)
    assert [len(evals[s]) for s in ("train", "validation", "test")] == [192, 10, 7]


def test_tsv_quoting_and_na_strings(tmp_path):
    """TSV fields with doubled quotes or quoted tabs are read intact; NA/null stay strings; an empty
    text is an error by default, and dropped (and counted) with data.on_empty_text: drop."""
    folder = tmp_path / "data"
    folder.mkdir()
    text = 'sentence\tlabel\n"she said ""hi"" twice"\tpos\n"a\ttab inside"\tneg\nNA\tpos\nnull\tneg\n\tpos\n'
    for split in ("train", "validation", "test"):
        (folder / f"{split}.tsv").write_text(text)
    with pytest.raises(RecipeError, match=r"train\.tsv line 6: empty or whitespace-only text in column 'sentence'"):
        load_splits(recipe_for(folder, tmp_path).data)
    raw = load_splits(recipe_for(folder, tmp_path, data={"path": str(folder), "columns": {"text": "sentence"},
                                                          "on_empty_text": "drop"}).data)
    assert raw["train"]["sentence"][:] == ['she said "hi" twice', "a\ttab inside", "NA", "null"]
    assert raw["test"]["label"][:] == ["pos", "neg", "pos", "neg"]


def test_null_label_stays_a_label(tmp_path):
    """A label written NA is a label named 'NA', not a missing value."""
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "validation", "test"):
        write_tsv(folder / f"{split}.tsv", ["sentence", "label"], [["x", "NA"], ["y", "yes"]])
    recipe = recipe_for(folder, tmp_path)
    raw = load_splits(recipe.data)
    assert label_names(recipe, raw) == ["NA", "yes"]


def test_data_dir_variable_is_expanded(sentiment_dir, tmp_path, monkeypatch):
    """${FINETUNE_DATA_DIR} in data.path expands to the environment variable."""
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(sentiment_dir.parent))
    path = "${FINETUNE_DATA_DIR}/" + sentiment_dir.name
    assert expand_path(path) == str(sentiment_dir)
    raw = load_splits(recipe_for(path, tmp_path, data={"path": path}).data)
    assert len(raw["train"]) == 192


def test_jsonl_folder_and_missing_path(regression_dir, tmp_path):
    """JSON-lines folders load by extension; a path that doesn't exist is a RecipeError naming it."""
    raw = load_splits(recipe_for(regression_dir, tmp_path).data)
    assert raw["train"].column_names == ["text", "score"] and len(raw["validation"]) == 32
    with pytest.raises(RecipeError, match=r"data\.path: .*nowhere does not exist"):
        load_splits(recipe_for(tmp_path / "nowhere", tmp_path).data)


# --- tokenize and collate --------------------------------------------------------------------


def test_missing_column_lists_available_columns(tokenizer, tmp_path):
    """A configured column the data lacks is named, with the columns that do exist."""
    raw = splits(train={"s1": ["a b"], "s2": ["c"], "relation": ["x"]})
    with pytest.raises(RecipeError, match=r"no column 'sentence'; its columns are \['s1', 's2', 'relation'\]"):
        tokenize(recipe_for("d", tmp_path), raw, tokenizer, ["x", "y"])


def test_max_length_above_tokenizer_limit(tokenizer, tmp_path):
    """data.max_length beyond what the backbone supports is refused."""
    recipe = recipe_for("d", tmp_path, data={"path": "d", "columns": {"text": "sentence"}, "max_length": 512})
    with pytest.raises(RecipeError, match=rf"max_length=512 exceeds .*model_max_length of {tokenizer.model_max_length}"):
        tokenize(recipe, splits(train={"sentence": ["a"], "label": ["x"]}), tokenizer, ["x", "y"])


def test_classification_labels_and_truncation(tokenizer, tmp_path):
    """Class names become ids in label order and inputs are truncated to max_length, not padded."""
    recipe = recipe_for("d", tmp_path, data={"path": "d", "columns": {"text": "sentence"}, "max_length": 8})
    raw = splits(train={"sentence": ["good", "a b c d e f g h i j k l"], "label": ["pos", "neg"]})
    out = tokenize(recipe, raw, tokenizer, ["pos", "neg"])["train"]
    assert out["labels"] == [0, 1]
    assert [len(ids) for ids in out["input_ids"]] == [3, 8]


def test_token_labels_align_to_first_subword(tokenizer, tmp_path):
    """Only a word's first sub-word carries its tag; later sub-words and special tokens get -100."""
    words, tags = ["flights", "to", "ouagadougou", "today"], ["O", "O", "B-LOC", "O"]
    assert len(tokenizer.tokenize("ouagadougou")) > 1  # the test needs a word WordPiece splits
    labels = ["O", "B-LOC", "I-LOC"]
    recipe = recipe_for("d", tmp_path, task="token_classification",
                        data={"path": "d", "columns": {"tokens": "words", "tags": "ner"}})
    out = tokenize(recipe, splits(train={"words": [words], "ner": [tags]}), tokenizer, labels)["train"][0]
    word_ids = tokenizer(words, is_split_into_words=True).word_ids()
    assert out["input_ids"] == tokenizer(words, is_split_into_words=True)["input_ids"]
    expected, previous = [], None
    for word in word_ids:
        expected.append(-100 if word is None or word == previous else labels.index(tags[word]))
        previous = word
    assert out["labels"] == expected
    city = [label for label, word in zip(out["labels"], word_ids) if word == 2]
    assert city[0] == 1 and set(city[1:]) == {-100} and len(city) > 1
    assert out["labels"][0] == -100 and out["labels"][-1] == -100
    assert sum(label != -100 for label in out["labels"]) == len(words)


def test_text_pairs_get_both_segments(tokenizer, pairs_dir, tmp_path):
    """Pairs are encoded as one input whose token_type_ids mark the second text."""
    recipe = recipe_for(pairs_dir, tmp_path, data={"path": str(pairs_dir),
                                                   "columns": {"text": "s1", "text_pair": "s2", "label": "relation"}})
    raw = load_splits(recipe.data)
    labels = label_names(recipe, raw)
    assert labels == ["neutral", "opposite", "same"]
    out = tokenize(recipe, raw, tokenizer, labels)
    first = out["train"][0]
    second_len = len(tokenizer(raw["train"][0]["s2"])["input_ids"]) - 1  # its tokens and the final [SEP]
    assert set(first["token_type_ids"]) == {0, 1}
    assert first["token_type_ids"] == [0] * (len(first["input_ids"]) - second_len) + [1] * second_len
    assert first["labels"] == labels.index(raw["train"][0]["relation"])


def test_regression_labels_are_floats(tokenizer, regression_dir, tmp_path):
    """Regression keeps the target as a float and has no label set."""
    recipe = recipe_for(regression_dir, tmp_path, task="regression",
                        data={"path": str(regression_dir), "columns": {"text": "text", "label": "score"}})
    raw = load_splits(recipe.data)
    assert label_names(recipe, raw) is None
    out = tokenize(recipe, raw, tokenizer, None)
    assert out["validation"]["labels"] == [float(v) for v in raw["validation"]["score"]]
    assert out["train"].features["labels"].dtype.startswith("float")


@pytest.mark.parametrize("multiple", [8, None])
@pytest.mark.parametrize("task", ["classification", "token_classification"])
def test_collator_pads_per_batch(task, multiple, tokenizer, tmp_path):
    """Batches are padded to the longest example (rounded up to 8 on GPUs), not to max_length."""
    texts = ["a", "a b c", "the movie was really quite good and the plot fine"]
    if task == "token_classification":
        raw = splits(train={"tokens": [t.split() for t in texts], "tags": [["O"] * len(t.split()) for t in texts]})
        labels = ["O", "B"]
    else:
        raw = splits(train={"sentence": texts, "label": ["x", "y", "x"]})
        labels = ["x", "y"]
    recipe = recipe_for("d", tmp_path, task=task, data={"path": "d", "columns": {"text": "sentence"}, "max_length": 64})
    out = tokenize(recipe, raw, tokenizer, labels)["train"]
    longest = max(len(ids) for ids in out["input_ids"])
    batch = make_collator(recipe, tokenizer, multiple)([out[i] for i in range(len(out))])
    assert batch["input_ids"].shape == (3, math.ceil(longest / 8) * 8 if multiple else longest)
    assert batch["input_ids"].shape[1] < 64
    assert batch["attention_mask"].sum(1).tolist() == [len(ids) for ids in out["input_ids"]]
    if task == "token_classification":
        assert batch["labels"].shape == batch["input_ids"].shape
        assert (batch["labels"][0, len(out[0]["input_ids"]):] == -100).all()
    else:
        assert batch["labels"].tolist() == [0, 1, 0]


def test_padding_to_a_multiple_of_8_only_on_gpus():
    from finetune.data import pad_multiple

    assert pad_multiple("cuda:0") == 8 and pad_multiple("cpu") is None


def test_missing_label_column_is_named_before_labels_are_read(tmp_path):
    """label_names reports a missing label column through the same friendly check as tokenize."""
    raw = splits(train={"sentence": ["a"], "lable": ["x"]})
    with pytest.raises(RecipeError, match=r"no column 'label'; its columns are \['sentence', 'lable'\]"):
        label_names(recipe_for("d", tmp_path), raw)


def test_regression_target_must_be_numeric(tmp_path):
    """A non-numeric regression target is named with its split, row and column."""
    recipe = recipe_for("d", tmp_path, task="regression", eval={"metrics": ["pearson"], "primary": "pearson"})
    raw = splits(train={"sentence": ["a", "b"], "label": ["1.5", "high"]})
    with pytest.raises(RecipeError, match=r"split 'train' row 2: column 'label' has 'high', not a number"):
        label_names(recipe, raw)


@pytest.mark.parametrize("subsample", [None, 100])
def test_tokenisation_is_cached_across_runs(tiny_backbone, sentiment_dir, tmp_path, subsample):
    """A second run (or sweep trial) over the same data and tokenizer reads the tokenised splits from
    the datasets cache: same fingerprints, same cache files, not rewritten."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path,
                         data={"path": str(sentiment_dir), "columns": {"text": "sentence"}, "max_length": 32,
                               "max_train_samples": subsample})
    outputs = []
    for _ in range(2):
        raw = load_splits(recipe.data)
        tokenised = tokenize(recipe, raw, AutoTokenizer.from_pretrained(tiny_backbone),
                                      label_names(recipe, raw))
        files = {split: [Path(c["filename"]) for c in ds.cache_files] for split, ds in tokenised.items()}
        outputs.append(({split: ds._fingerprint for split, ds in tokenised.items()}, files,
                        {f: f.stat().st_mtime_ns for fs in files.values() for f in fs}))
    (prints_1, files_1, times_1), (prints_2, files_2, times_2) = outputs
    assert prints_1 == prints_2 and files_1 == files_2
    assert all(files_1.values()) and times_1 == times_2  # read back, not written again
    other = recipe.with_overrides(["data.max_length=16"])
    raw = load_splits(other.data)
    shorter = tokenize(other, raw, AutoTokenizer.from_pretrained(tiny_backbone), label_names(other, raw))
    assert shorter["train"]._fingerprint != prints_1["train"]  # another max_length is another cache entry


def test_the_cuda_loader_path_gives_the_same_batches_on_cpu(tiny_backbone, sentiment_dir, tmp_path):
    """pin_memory (used on CUDA, where Accelerate copies batches non-blocking) changes where batches live,
    never what they hold: exercised here on CPU, where pinning falls back to ordinary memory."""
    import warnings

    import torch

    from finetune import data as data_lib
    from finetune.run import Run

    run = Run(tiny_recipe(tiny_backbone, sentiment_dir, tmp_path))
    assert run.accelerator.dataloader_config.non_blocking
    recipe, tokenised, collator = run.recipe, run.tokenised, run.collator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "pin_memory ... no accelerator is found"
        loaders = [(data_lib.make_train_loader(recipe, tokenised["train"], collator, pin_memory=pin),
                    data_lib.make_eval_loader(recipe, tokenised["validation"], collator, pin_memory=pin))
                   for pin in (False, True)]
        assert loaders[1][0].pin_memory and not loaders[0][0].pin_memory
        for plain, pinned in zip(loaders[0], loaders[1]):
            for a, b in zip(plain, pinned):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run.open_folder(resume=False, overwrite=True)
    assert not run.train_loader.pin_memory  # a CPU run does not pin
