"""Data ingest you can trust: malformed split files end in one line naming the file and line (run
through ``finetune train`` as a user would), good files load with every row, the data.on_* policies
drop and count, and ``data_report`` tells the truth about each split."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from battery import refuses
from conftest import SHARED_DATA, tiny_recipe
from transformers import AutoTokenizer

from finetune import Recipe, ingest
from finetune.data import label_names, load_splits, read_lines, read_table, tokenize
from finetune.data_report import data_report, metrics_summary
from finetune.errors import DataError

GOOD_TSV = "sentence\tlabel\nthe movie was good\tpos\nthe plot was bad\tneg\na great film\tpos\nso dull\tneg\n"
GOOD_JSONL = "".join(json.dumps({"text": t, "label": y}) + "\n"
                     for t, y in [("good film", "pos"), ("bad plot", "neg"), ("great", "pos"), ("dull", "neg")])
NER = [{"tokens": ["to", "paris"], "tags": ["O", "B-LOC"]},
       {"tokens": ["a", "b", "berlin"], "tags": ["O", "O", "B-LOC"]}]


def folder_with(tmp_path: Path, files: dict[str, str | bytes], ext: str = "tsv") -> Path:
    """A data folder: good train/validation/test files of type ``ext``, some replaced by ``files``."""
    good = {"tsv": GOOD_TSV, "csv": GOOD_TSV.replace("\t", ","), "jsonl": GOOD_JSONL,
            "reg.tsv": "text\tscore\na\t1.5\nb\t0.5\n",
            "ner.jsonl": "".join(json.dumps(r) + "\n" for r in NER * 2)}.get(ext)
    if ext in ("json", "parquet"):  # the good records, as a JSON array or a parquet file
        records = [json.loads(line) for line in GOOD_JSONL.splitlines()]
        good = json.dumps(records).encode() if ext == "json" else _parquet(records)
    folder = tmp_path / "data"
    folder.mkdir(parents=True)
    suffix = ext.split(".")[-1]
    for split in ("train", "validation", "test"):
        content = files.get(f"{split}.{suffix}", good)
        (folder / f"{split}.{suffix}").write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def _parquet(records: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buffer)
    return buffer.getvalue()


def recipe_yaml(backbone: Path, folder: Path, tmp_path: Path, **sections) -> Path:
    recipe = tiny_recipe(backbone, folder, tmp_path, **sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    return path


TEXT = {"data": {"columns": {"text": "text"}}}
REGRESSION = {"task": "regression", "eval": {"metrics": ["pearson"], "primary": "pearson"},
              "data": {"columns": {"text": "text", "label": "score"}}}
TOKENS = {"task": "token_classification", "eval": {"metrics": ["entity_f1"], "primary": "entity_f1"},
          "data": {"columns": {"tokens": "tokens", "tags": "tags"}}}

# (case id, format, {file: content}, recipe sections, texts the one-line message must name)
BAD_INPUTS = [
    ("unbalanced-quote-swallows-rows", "tsv",
     {"train.tsv": 'sentence\tlabel\ngood one\tpos\n"an open quote\tneg\nnice\tpos\nawful"\tneg\nok\tpos\n'},
     {}, ["train.tsv", "line 3", "runs on to line 5"]),
    ("quote-never-closes", "tsv", {"train.tsv": 'sentence\tlabel\ngood\tpos\n"open\tneg\nfine\tpos\n'},
     {}, ["train.tsv", "line 3", "never closes"]),
    ("quote-closes-mid-field", "csv", {"train.csv": 'sentence,label\ngood,pos\n"she said "hi" twice,neg\n'},
     {}, ["train.csv", "line 3", "quoting"]),
    ("ragged-row-extra-field", "tsv", {"train.tsv": "sentence\tlabel\ngood\tpos\nbad\tneg\tx\nok\tpos\n"},
     {}, ["train.tsv", "line 3", "3 field(s), expected 2"]),
    ("ragged-row-missing-field", "tsv", {"validation.tsv": "sentence\tlabel\ngood\tpos\nbad\nok\tneg\n"},
     {}, ["validation.tsv", "line 3", "1 field(s)"]),
    ("ragged-row-in-quoted-csv", "csv", {"train.csv": 'sentence,label\n"good, really",pos\nbad,neg,extra\n'},
     {}, ["train.csv", "line 3"]),
    ("ragged-row-crlf", "tsv", {"train.tsv": "sentence\tlabel\r\ngood\tpos\r\nbad\tneg\r\nworse\r\n"},
     {}, ["train.tsv", "line 4"]),
    ("header-repeated", "tsv", {"train.tsv": GOOD_TSV + "sentence\tlabel\nfine\tpos\n"},
     {}, ["train.tsv", "line 6", "header"]),
    ("header-repeated-quoted-csv", "csv",
     {"train.csv": 'sentence,label\n"a, b",pos\nc,neg\nsentence,label\nd,pos\n'},
     {}, ["train.csv", "line 4", "header"]),
    ("header-repeated-at-end", "tsv", {"test.tsv": GOOD_TSV + "sentence\tlabel"},
     {}, ["test.tsv", "line 6", "header"]),
    ("duplicate-column-name", "tsv", {"train.tsv": "sentence\tlabel\tlabel\nx\tpos\tneg\n"},
     {}, ["train.tsv", "line 1", "'label' appears twice"]),
    ("invalid-utf8-tsv", "tsv", {"train.tsv": b"sentence\tlabel\ngood\tpos\nbad \xff film\tneg\n"},
     {}, ["train.tsv", "line 3", "UTF-8"]),
    ("invalid-utf8-jsonl", "jsonl", {"validation.jsonl": GOOD_JSONL.encode() + b'{"text": "\xc3(", "label": "pos"}\n'},
     TEXT, ["validation.jsonl", "line 5", "UTF-8"]),
    ("malformed-json-line", "jsonl", {"train.jsonl": GOOD_JSONL + '{"text": "x", "label": "pos"\n'},
     TEXT, ["train.jsonl", "line 5", "not valid JSON"]),
    ("json-line-not-an-object", "jsonl", {"train.jsonl": "[1, 2]\n" + GOOD_JSONL},
     TEXT, ["train.jsonl", "line 1"]),
    ("empty-text", "tsv", {"train.tsv": GOOD_TSV + "\tpos\n"},
     {}, ["train.tsv", "line 6", "empty", "data.on_empty_text"]),
    ("whitespace-only-texts", "tsv", {"train.tsv": GOOD_TSV + "   \tpos\n \t neg\n"},
     {}, ["train.tsv", "line 6", "2 such row(s)"]),
    ("empty-text-in-validation", "tsv", {"validation.tsv": "sentence\tlabel\ngood\tpos\n\tneg\n"},
     {}, ["validation.tsv", "line 3"]),
    ("null-text-jsonl", "jsonl", {"train.jsonl": GOOD_JSONL + '{"text": null, "label": "pos"}\n'},
     TEXT, ["train.jsonl", "line 5", "empty"]),
    ("empty-text-pair", "tsv", {"train.tsv": "a\tb\tlabel\nx\ty\tpos\nx\t \tneg\n"},
     {"data": {"columns": {"text": "a", "text_pair": "b"}}}, ["train.tsv", "line 3", "a/b"]),
    ("empty-label", "tsv", {"train.tsv": GOOD_TSV + "an orphan\t\n"},
     {}, ["train.tsv", "line 6", "no label", "data.on_missing_label"]),
    ("null-label-jsonl", "jsonl", {"test.jsonl": GOOD_JSONL + '{"text": "x", "label": null}\n'},
     TEXT, ["test.jsonl", "line 5", "no label"]),
    ("unlabeled-test-split", "tsv", {"test.tsv": "sentence\tlabel\ngood\t\nbad\t\n"},
     {}, ["test.tsv", "line 2", "data.splits.test: null"]),
    ("absent-label-key-jsonl", "jsonl", {"train.jsonl": '{"text": "x"}\n' + GOOD_JSONL},
     TEXT, ["train.jsonl", "line 1", "no label"]),
    ("fractional-float-labels", "tsv", {"train.tsv": "sentence\tlabel\na\t0.1\nb\t0.35\nc\t0.72\nd\t0.9\n"},
     {}, ["train.tsv", "line 2", "task: regression"]),
    ("regression-nan-target", "reg.tsv", {"train.tsv": "text\tscore\na\t1.5\nb\tnan\n"},
     REGRESSION, ["train.tsv", "line 3", "finite"]),
    ("regression-inf-target", "reg.tsv", {"validation.tsv": "text\tscore\na\t1.5\nb\t2\nc\t-inf\n"},
     REGRESSION, ["validation.tsv", "line 4", "finite"]),
    ("regression-text-target", "reg.tsv", {"train.tsv": "text\tscore\na\t1.5\nb\thigh\n"},
     REGRESSION, ["train.tsv", "line 3", "not a number"]),
    ("tags-fewer-than-tokens", "ner.jsonl",
     {"train.jsonl": json.dumps(NER[0]) + "\n" + json.dumps({"tokens": ["a", "b", "c"], "tags": ["O", "O"]}) + "\n"},
     TOKENS, ["train.jsonl", "line 2", "3 tokens but 2 tags"]),
    ("tokens-not-a-list", "ner.jsonl",
     {"train.jsonl": json.dumps(NER[0]) + "\n" + json.dumps({"tokens": "to paris", "tags": ["O", "B-LOC"]}) + "\n"},
     TOKENS, ["train.jsonl", "line 2", "list of words"]),
    ("tags-not-a-list", "ner.jsonl", {"validation.jsonl": '{"tokens": ["to", "paris"], "tags": "O B-LOC"}\n'},
     TOKENS, ["validation.jsonl", "line 1", "one tag per word"]),
    ("empty-token-list", "ner.jsonl", {"test.jsonl": json.dumps(NER[0]) + '\n{"tokens": [], "tags": []}\n'},
     TOKENS, ["test.jsonl", "line 2", "empty"]),
    ("label-only-outside-train", "tsv", {"test.tsv": GOOD_TSV + "meh\tneutral\n"},
     {}, ["test.tsv", "line 6", "'neutral'", "not in the label set"]),
    ("listed-label-only-outside-train", "tsv", {"test.tsv": GOOD_TSV + "meh\tneutral\n"},
     {"data": {"columns": {"text": "sentence"}, "labels": ["neg", "neutral", "pos"]}},
     ["test.tsv", "line 6", "'neutral'", "never appears in the training split"]),
    ("nan-label-in-json-lines", "jsonl",
     {"train.jsonl": '{"text": "good", "label": 1}\n{"text": "bad", "label": NaN}\n{"text": "ok", "label": 0}\n'},
     TEXT, ["train.jsonl", "line 2", "missing"]),
    ("test-file-read-by-no-split", "tsv", {}, {"data": {"columns": {"text": "sentence"},
                                                 "splits": {"validation_from_train": 0.25, "test": "validation"}}},
     ["test.tsv", "read by no split", "data.splits.test=test"]),
    ("single-class-train", "tsv", {"train.tsv": "sentence\tlabel\na\tpos\nb\tpos\n"},
     {"data": {"columns": {"text": "sentence"}, "labels": ["pos", "neg"]}}, ["train.tsv", "only one class"]),
    ("header-only-train", "tsv", {"train.tsv": "sentence\tlabel\n"}, {}, ["train.tsv", "has no rows"]),
    ("empty-validation-file", "tsv", {"validation.tsv": ""}, {}, ["validation.tsv", "has no rows"]),
    ("label-column-missing-in-one-split", "tsv", {"validation.tsv": "sentence\ngood\nbad\n"},
     {}, ["validation.tsv", "no column 'label'"]),
    ("json-array-empty-text", "json", {"train.json": '[{"text": "good", "label": "pos"}, {"text": " ", "label": "neg"}]'},
     TEXT, ["train.json", "row 2", "empty"]),
    ("corrupt-parquet", "parquet", {"validation.parquet": b"PAR1 this is not really parquet"},
     TEXT, ["validation.parquet", "parquet"]),
    ("everything-dropped", "tsv", {"train.tsv": "sentence\tlabel\n \tpos\n\tneg\n"},
     {"data": {"columns": {"text": "sentence"}, "on_empty_text": "drop"}}, ["train.tsv", "every row"]),
]


@pytest.mark.parametrize("name, ext, files, sections, names", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_data_is_refused_naming_file_and_line(capsys, tiny_backbone, tmp_path, name, ext, files, sections, names):
    folder = folder_with(tmp_path, files, ext)
    sections = {key: ({**value, "path": str(folder)} if key == "data" else value) for key, value in sections.items()}
    path = recipe_yaml(tiny_backbone, folder, tmp_path, **sections)
    refuses(capsys, ["train", "--recipe", str(path)], names, tree=tmp_path)


# --- good data still loads, every row of it -------------------------------------------------------


def recipe_for(folder: Path, tmp_path: Path, **sections) -> Recipe:
    return tiny_recipe(Path("unused-backbone"), folder, tmp_path, **sections)


def test_quoted_multiline_field_and_na_texts_load_every_row(tmp_path):
    """A quoted field over three lines is one row (not a swallow: its lines don't read as rows);
    "NA", "null" and "None" stay texts; rows keep their own line numbers."""
    text = ('sentence,label\n"first line, part one\nsecond line\nthird, end",pos\nNA,neg\nnull,pos\n'
            'None,neg\n"with ""quotes"", and a comma",pos\n')
    folder = folder_with(tmp_path, {"train.csv": text}, "csv")
    raw = load_splits(recipe_for(folder, tmp_path).data)
    train = raw["train"]
    assert train["sentence"][:] == ["first line, part one\nsecond line\nthird, end", "NA", "null", "None",
                                    'with "quotes", and a comma']
    assert ingest.origin_of(train).positions == [2, 5, 6, 7, 8]
    assert label_names(recipe_for(folder, tmp_path), raw) == ["neg", "pos"]


def test_blank_and_crlf_lines_are_not_rows(tmp_path):
    """Blank lines (also whitespace-only ones) are skipped, as pandas does; CRLF files count the same."""
    text = "sentence\tlabel\r\ngood\tpos\r\n\r\n   \r\nbad\tneg\r\n\r\n"
    raw = load_splits(recipe_for(folder_with(tmp_path, {"train.tsv": text}), tmp_path).data)
    assert raw["train"]["sentence"][:] == ["good", "bad"]
    assert ingest.origin_of(raw["train"]).positions == [2, 5]


def test_integer_valued_float_labels_are_class_names(tmp_path, tiny_backbone):
    """1.0 (pandas reads a label column with a gap as floats; JSON may write them) is the class '1'."""
    lines = [{"text": "a", "label": 1.0}, {"text": "b", "label": 0}, {"text": "c", "label": 1}]
    content = "".join(json.dumps(r) + "\n" for r in lines)
    folder = folder_with(tmp_path, {"train.jsonl": content, "validation.jsonl": content, "test.jsonl": content},
                         "jsonl")
    recipe = recipe_for(folder, tmp_path, data={"path": str(folder), "columns": {"text": "text"}})
    raw = load_splits(recipe.data)
    labels = label_names(recipe, raw)
    assert labels == ["0", "1"]
    out = tokenize(recipe, raw, AutoTokenizer.from_pretrained(tiny_backbone), labels)
    assert out["train"]["labels"][:] == [1, 0, 1]


def test_fractional_labels_listed_in_data_labels_are_accepted(tmp_path):
    """Declared label names are the user's choice, even when they look like numbers."""
    text = "sentence\tlabel\na\t0.5\nb\t1.5\n"
    folder = folder_with(tmp_path, {"train.tsv": text, "validation.tsv": text, "test.tsv": text})
    recipe = recipe_for(folder, tmp_path, data={"path": str(folder), "columns": {"text": "sentence"},
                                                "labels": ["0.5", "1.5"]})
    assert label_names(recipe, load_splits(recipe.data)) == ["0.5", "1.5"]


def test_drop_policies_drop_and_count(tmp_path):
    """on_empty_text / on_missing_label: drop removes those rows, counts them per reason, and the
    remaining rows still name their own lines."""
    text = GOOD_TSV + "\tpos\n   \tneg\nno label here\t\nfine film\tpos\n"
    folder = folder_with(tmp_path, {"train.tsv": text})
    recipe = recipe_for(folder, tmp_path, data={"path": str(folder), "columns": {"text": "sentence"},
                                                "on_empty_text": "drop", "on_missing_label": "drop"})
    raw = load_splits(recipe.data)
    origin = ingest.origin_of(raw["train"])
    assert raw["train"]["sentence"][:] == ["the movie was good", "the plot was bad", "a great film", "so dull",
                                           "fine film"]
    assert origin.dropped == {"empty_text": 2, "missing_label": 1}
    assert origin.rows_read == 8 and origin.positions == [2, 3, 4, 5, 9]
    with pytest.raises(DataError, match=r"train\.tsv line 8: no label"):
        load_splits(recipe_for(folder, tmp_path, data={"path": str(folder), "columns": {"text": "sentence"},
                                                       "on_empty_text": "drop"}).data)


def test_subsample_is_the_rows_datasets_shuffle_picks_and_keeps_lines(sentiment_dir, tmp_path):
    """The subsample is ds.shuffle(seed).select(range(n)) (the rows earlier versions trained on), and
    a row of it still names its line in the file."""
    recipe = recipe_for(sentiment_dir, tmp_path, data={"path": str(sentiment_dir), "columns": {"text": "sentence"},
                                                       "max_train_samples": 50, "subsample_seed": 3})
    full = load_splits(recipe_for(sentiment_dir, tmp_path).data)["train"]
    sub = load_splits(recipe.data)["train"]
    assert sub["sentence"][:] == full.shuffle(seed=3).select(range(50))["sentence"][:]
    origin = ingest.origin_of(sub)
    assert origin.subsampled_from == 192 and len(origin.positions) == 50
    lines = (sentiment_dir / "train.tsv").read_text().split("\n")
    assert all(lines[line - 1].startswith(text) for line, text in zip(origin.positions, sub["sentence"][:]))


def test_data_report(tmp_path, tiny_backbone):
    """Rows, drops, label counts, duplicates, overlap with train, and token lengths before truncation:
    the truncated count is exact (rows at the limit are tokenised again without truncation)."""
    long = "the movie was really quite good and the plot was fine and the actor was lovely"
    train = ("sentence\tlabel\n" + f"{long}\tpos\n" + "good\tpos\nbad\tneg\nbad\tneg\n\tpos\n"
             + "one two three four five\tneg\n")
    validation = "sentence\tlabel\ngood\tpos\nnew text\tneg\n"
    folder = folder_with(tmp_path, {"train.tsv": train, "validation.tsv": validation})
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    limit = len(tokenizer("one two three four five")["input_ids"])  # this row fits exactly: not truncated
    recipe = recipe_for(folder, tmp_path, data={"path": str(folder), "columns": {"text": "sentence"},
                                                "max_length": limit, "on_empty_text": "drop"})
    raw = load_splits(recipe.data)
    labels = label_names(recipe, raw)
    report = data_report(recipe, raw, tokenize(recipe, raw, tokenizer, labels), tokenizer)
    train_entry = report["splits"]["train"]
    assert train_entry["rows"] == 5 and train_entry["rows_in_file"] == 6
    assert train_entry["dropped"] == {"empty_text": 1} and report["dropped"] == {"empty_text": 1}
    assert train_entry["labels"] == {"pos": 2, "neg": 3} and train_entry["duplicate_texts"] == 1
    assert train_entry["source"].endswith("train.tsv")
    true_lengths = sorted(len(tokenizer(t)["input_ids"]) for t in raw["train"]["sentence"][:])
    tokens = train_entry["tokens"]
    assert tokens["max"] == true_lengths[-1] > limit
    assert tokens["truncated_rows"] == 1 and tokens["truncated_share"] == 0.2 and tokens["exact"]
    assert tokens["p50"] == int(np.percentile(true_lengths, 50, method="higher"))
    assert report["splits"]["validation"]["texts_also_in_train"] == 1
    assert metrics_summary(report) == {"rows": {"train": 5, "validation": 2, "test": 4},
                                              "dropped": {"train": {"empty_text": 1}}}
    json.dumps(report)  # it is written as data_report.json


def test_data_report_for_tokens_and_regression(tmp_path, tiny_backbone, regression_dir, ner_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    for folder, sections in ((ner_dir, TOKENS), (regression_dir, REGRESSION)):
        recipe = recipe_for(folder, tmp_path, **{**sections, "data": {**sections["data"], "path": str(folder)}})
        if folder == ner_dir:
            recipe = recipe.with_overrides(["data.columns.tags=ner_tags"])
        raw = load_splits(recipe.data)
        labels = label_names(recipe, raw)
        report = data_report(recipe, raw, tokenize(recipe, raw, tokenizer, labels), tokenizer)
        entry = report["splits"]["train"]
        assert entry["rows"] == 96 and entry["tokens"]["truncated_rows"] == 0
        if folder == ner_dir:
            assert set(entry["tags"]) == {"O", "B-LOC", "I-LOC"}
        else:
            assert 0 <= entry["target"]["min"] <= entry["target"]["max"] <= 3


def test_parquet_and_json_array_files_load_and_number_their_records(tmp_path):
    for ext in ("parquet", "json"):
        folder = folder_with(tmp_path / ext, {}, ext)
        raw = load_splits(recipe_for(folder, tmp_path, data={"path": str(folder), "columns": {"text": "text"}}).data)
        assert raw["train"]["text"][:] == ["good film", "bad plot", "great", "dull"]
        assert ingest.where(raw["train"], "train", 1) == f"{folder / ('train.' + ext)} row 2"


def test_a_row_count_the_library_disagrees_with_names_the_first_differing_line(tmp_path):
    """The safety net behind the scan: the library's rows against the file's, first difference named."""
    path = tmp_path / "train.csv"
    path.write_text('text,label\na,pos\n"b\nc",neg\nd,pos\n')
    origin = ingest.scan_file(path, "csv")
    assert origin.positions == [2, 3, 5]
    swallowed = datasets.Dataset.from_dict({"text": ["a", "d"]})  # as if a reader had lost the quoted row
    message = str(ingest._count_mismatch(path, swallowed, origin))
    assert message.startswith(f"{path} line 3: read 2 rows but the file holds 3 data rows")


# --- predict inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "sentence\tlabel\n", "sentence\n\n\n"])
def test_read_table_without_rows(tmp_path, content):
    path = tmp_path / "inputs.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"{path} has no rows"):
        read_table(path)


def test_read_table_names_other_formats_and_reads_a_good_file(tmp_path):
    path = tmp_path / "inputs.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match=r"expected one of \.txt, \.tsv, \.csv"):
        read_table(path, other_formats=(".txt",))
    good = tmp_path / "inputs.csv"
    good.write_text('text\n"a, b"\nNA\n')
    assert read_table(good)["text"][:] == ["a, b", "NA"]


def test_read_lines(tmp_path):
    path = tmp_path / "inputs.txt"
    path.write_text("\n  \n")
    with pytest.raises(DataError, match=rf"{path} has no rows"):
        read_lines(path)
    path.write_bytes(b"good\nbad \xff\n")
    with pytest.raises(DataError, match=rf"{path} line 2: not valid UTF-8"):
        read_lines(path)
    path.write_text("one\n\ntwo\n")
    assert read_lines(path) == ["one", "two"]


# --- the shipped data sets pass -------------------------------------------------------------------

SHARED = {"sst2": {"text": "sentence"}, "agnews": {}, "trec": {},
          "mrpc": {"text": "sentence1", "text_pair": "sentence2"},
          "conll2003": {"tokens": "tokens", "tags": "ner_tags"}}


@pytest.mark.parametrize("name", SHARED)
def test_shared_data_sets_pass_every_check(name, tmp_path):
    """No false alarm on real data: every shipped data set loads with as many rows as its files have."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is not here")
    task = "token_classification" if name == "conll2003" else "classification"
    recipe = Recipe.from_dict({"name": name, "backbone": {"name": "x"}, "task": task,
                               "data": {"path": str(folder), "columns": SHARED[name]}})
    raw = load_splits(recipe.data)
    assert len(label_names(recipe, raw)) >= 2
    for split, ds in raw.items():
        file = next(folder.glob(f"{split}.*"))
        if file.suffix == ".jsonl" or '"' not in file.read_text():  # one row per line
            assert len(ds) == sum(1 for line in file.read_text().splitlines()[1 if file.suffix == ".tsv" else 0:]
                                  if line.strip())
        assert ingest.origin_of(ds).dropped == {}


def test_a_split_joined_from_two_files_keeps_each_rows_file_line_and_drops(tmp_path):
    """Rows of a split read from two files (a hub train split kept here as train + validation files)
    still name their own file and line, and both files' drops are counted."""
    from finetune import ingest

    folder = folder_with(tmp_path, {"train.tsv": GOOD_TSV + " \tpos\n", "validation.tsv": GOOD_TSV + "\tneg\n"})
    raw = load_splits(recipe_for(folder, tmp_path, data={"path": str(folder), "columns": {"text": "sentence"},
                                                        "on_empty_text": "drop"}).data)
    joined = ingest.join([raw["train"], raw["validation"]])
    origin = ingest.origin_of(joined)
    assert len(joined) == 8 and origin.rows_read == 10 and origin.dropped == {"empty_text": 2}
    assert ingest.where(joined, "train", 0).endswith("train.tsv line 2")
    assert ingest.where(joined, "train", 5).endswith("validation.tsv line 3")
    assert origin.derive([5]).where(0).endswith("validation.tsv line 3")  # what a subsample of it keeps
