"""The ``data:`` section of a recipe: where the data is, which columns and splits to read, which labels,
how much of it, and what to do with rows that lack a text or a label."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from finetune.schema import Strict


class ColumnsConfig(Strict):
    text: str = "text"
    """Column with the (first) text, for classification and regression."""
    text_pair: str | None = None
    """Column with the second text of a pair (e.g. MRPC's sentence2)."""
    label: str = "label"
    """Column with the label (class name or number; a float for regression; for multi-label classification
    the row's labels: a list in JSON, text split at data.label_separator in csv/tsv)."""
    tokens: str = "tokens"
    """Token classification: column with the list of words."""
    tags: str = "tags"
    """Token classification: column with one tag per word."""


class SplitsConfig(Strict):
    train: str = "train"
    """Split (file stem or hub split name) to train on."""
    validation: str | None = "validation"
    """Split used for evaluation during training and model selection (null with validation_from_train)."""
    test: str | None = "test"
    """Held-out split evaluated once with the best model (null to skip)."""
    validation_from_train: int | float | None = None
    """Carve the validation split out of the training split instead of reading one: a fraction (0.1) or a
    number of rows (500), chosen by data.subsample_seed from each row's content, so the hub and a local
    copy of the same rows give the same split (e.g. SST-2, whose hub test split is unlabeled)."""

    validation_by: Literal["row", "whole_text"] = "row"
    """How validation_from_train draws: ``row``, any rows; ``whole_text``, texts that no other training row
    contains (word for word), with every row inside a drawn text leaving training too. For data sets of
    phrases cut from sentences (SST-2's training split holds every phrase of its sentences, the test split
    full sentences): validation then looks like the test set, and no part of it was trained on. The share
    or number counts whole texts."""

    @field_validator("validation_from_train", mode="before")
    @classmethod
    def _carve_not_bool(cls, value):
        if isinstance(value, bool):  # YAML yes/true would otherwise read as 1 row
            raise ValueError("expected a fraction in (0, 1) or a number of rows >= 1, not a yes/no")
        return value

    @model_validator(mode="before")
    @classmethod
    def _carving_replaces_validation(cls, raw: Any) -> Any:
        # a recipe that carves validation out of train reads no validation split unless it names one
        if isinstance(raw, dict) and raw.get("validation_from_train") is not None and "validation" not in raw:
            return {**raw, "validation": None}
        return raw

    @model_validator(mode="after")
    def _one_validation_source(self) -> SplitsConfig:
        carve = self.validation_from_train
        if carve is not None:
            if carve <= 0 or (isinstance(carve, float) and carve >= 1):
                raise ValueError(f"validation_from_train={carve!r}: expected a fraction in (0, 1) or a number of rows >= 1")
            if self.validation is not None:
                raise ValueError(f"validation={self.validation!r} and validation_from_train={carve!r} both give the "
                                 "validation split; set validation: null to carve it from train, or drop validation_from_train")
        elif self.validation is None:
            raise ValueError("validation is null: name the validation split, or carve one with validation_from_train")
        elif self.validation_by != "row":
            raise ValueError(f"validation_by={self.validation_by} chooses how validation_from_train draws; it needs "
                             "validation_from_train (e.g. 0.1)")
        return self

    def named(self) -> dict[str, str]:
        """Role -> split name (file stem or hub split) for the splits that are read, not carved or skipped."""
        roles = {"train": self.train, "validation": self.validation, "test": self.test}
        return {role: name for role, name in roles.items() if name is not None}


class DataConfig(Strict):
    path: str
    """Local folder (holding <split>.tsv/csv/json/jsonl/parquet) or a hub dataset id.
    ${FINETUNE_DATA_DIR} expands to that environment variable (default: ../shared/data next to the repo)."""
    name: str | None = None
    """Hub dataset configuration name."""
    revision: str | None = None
    """Hub dataset revision."""
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet"] = "auto"
    """File format; auto uses the file extension."""
    columns: ColumnsConfig = ColumnsConfig()
    """Which columns hold the inputs and targets."""
    splits: SplitsConfig = SplitsConfig()
    """Split names."""
    labels: list[str] | None = None
    """Label names in id order; inferred from the training split when omitted."""
    label_separator: str | None = None
    """task=multi_label_classification (where it defaults to "|"): a csv/tsv label cell holds the row's labels
    separated by this, e.g. "PER|LOC"; an empty cell means none applies (JSON gives a list, possibly empty)."""

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, value):
        # YAML reads `[0, 1]` as numbers; label names are text, as in the data files
        if isinstance(value, list):
            if any(isinstance(v, bool) for v in value):
                raise ValueError("label names must be text; quote yes/no/true/false, e.g. ['yes', 'no']")
            # 1.0 names the class '1', as the data's integer-valued floats do (finetune.ingest.label_text)
            return [str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) if isinstance(v, (int, float))
                    else v for v in value]
        return value

    @field_validator("label_separator")
    @classmethod
    def _separator_not_blank(cls, value):
        if value is not None and not value.strip():
            raise ValueError("a label separator must not be empty or whitespace (e.g. '|' or ';')")
        return value

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, value):
        if value is not None and len(set(value)) != len(value):
            repeated = sorted({v for v in value if value.count(v) > 1})
            raise ValueError(f"label names must be unique; repeated: {repeated}")
        return value
    max_length: int = Field(default=128, gt=0)
    """Truncate inputs to this many tokens (batches are padded per batch, never to this)."""
    max_train_samples: int | None = Field(default=None, gt=0)
    """Seeded random subsample of the training split, for quick runs."""
    max_eval_samples: int | None = Field(default=None, gt=0)
    """Seeded random subsample of the validation split (model selection during training)."""
    max_test_samples: int | None = Field(default=None, gt=0)
    """Seeded random subsample of the test split."""
    subsample_seed: int = 0
    """Seed for the subsamples."""
    on_empty_text: Literal["error", "drop"] = "error"
    """A row whose text (or text pair, or token list) is empty, whitespace-only or missing: stop with an
    error naming the file and line, or drop the row (drops are counted in the log, data_report.json and
    metrics.json)."""
    on_missing_label: Literal["error", "drop"] = "error"
    """A row without a label (empty field, null or absent key): stop with an error naming the file and
    line, or drop the row (counted like on_empty_text)."""
