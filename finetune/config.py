"""The Recipe: one typed, validated description of a fine-tuning run.

A recipe is plain data (YAML <-> Python). Every field has a type and a one-line
docstring; unknown keys are errors, and errors name the dotted key the user wrote
(``train.lr``), so the same messages serve YAML files, ``key=value`` overrides and
Python attribute assignment. Each error is one line; from a file it also names the file and line.
A key that would be ignored under the other settings (LoRA keys with kind=full) is refused too.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from finetune.errors import RecipeError  # noqa: F401  (re-exported: the name users catch)
from finetune.recipe_checks import UNUSED, describe_unused, suggest, unused_settings
from finetune.recipe_file import Origins, read_recipe_file  # noqa: F401  (read_recipe_file: re-exported)

log = logging.getLogger("finetune")

# validation context of Recipe.from_dict, which checks unused settings itself (it knows the overrides)
UNUSED_CHECKED_BY_CALLER = {"unused_settings": "checked by the caller"}


def _caller_checks_unused(info: ValidationInfo) -> bool:
    return isinstance(info.context, dict) and info.context.get("unused_settings") is not None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class BackboneConfig(Strict):
    name: str
    """Hugging Face hub id (resolved through local mirrors when offline) or a local folder."""
    pretrained: bool = True
    """False builds the same architecture with random weights (transfer-vs-scratch baselines)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the backbone weights are loaded in."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Off unless you trust its source."""
    num_layers: int | None = Field(default=None, gt=0)
    """Keep only the first N encoder layers (a truncated, cheaper backbone; default: all)."""


class HeadConfig(Strict):
    type: Literal["linear", "mlp"] = "linear"
    """Task head: one linear layer, or a one-hidden-layer MLP."""
    hidden_size: int | None = Field(default=None, gt=0)
    """MLP hidden width (default: the backbone's hidden size)."""
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Dropout applied before the head's linear layers."""
    pooling: Literal["auto", "cls", "mean"] = "auto"
    """Sequence pooling: first token, masked mean, or the backbone's known default."""


class LoraConfig(Strict):
    rank: int = Field(default=8, gt=0)
    """LoRA rank r."""
    alpha: float = Field(default=16.0, gt=0)
    """LoRA scaling alpha (the update is scaled by alpha / rank)."""
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: list[str] | None = None
    """Module names to adapt (default per architecture, e.g. query and value for BERT)."""


class PolicyConfig(Strict):
    kind: Literal["full", "head_only", "freeze", "lora"] = "full"
    """What trains: everything, only the head, all but frozen lower parts, or LoRA adapters + head."""
    freeze_embeddings: bool = False
    """With kind=freeze: freeze the embedding layer."""
    freeze_layers: int = Field(default=0, ge=0)
    """With kind=freeze: freeze the first N encoder layers."""
    lora: LoraConfig = LoraConfig()
    """LoRA settings, used when kind=lora."""

    @model_validator(mode="after")
    def _freeze_settings_match_kind(self) -> PolicyConfig:
        # freeze settings under another kind are unused settings (finetune.recipe_checks.UNUSED), which an
        # override of policy.kind (a sweep, a compare variant) may clear instead of failing
        if self.kind == "freeze" and not (self.freeze_embeddings or self.freeze_layers > 0):
            raise ValueError("kind=freeze needs freeze_embeddings=true and/or freeze_layers > 0")
        return self


class ColumnsConfig(Strict):
    text: str = "text"
    """Column with the (first) text, for classification and regression."""
    text_pair: str | None = None
    """Column with the second text of a pair (e.g. MRPC's sentence2)."""
    label: str = "label"
    """Column with the label (class name or number; a float for regression)."""
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


class TrainConfig(Strict):
    epochs: float = Field(default=3.0, gt=0)
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = Field(default=None, gt=0)
    """Total optimizer steps; overrides epochs."""
    batch_size: int = Field(default=32, gt=0)
    """Examples per process per forward pass."""
    eval_batch_size: int | None = Field(default=None, gt=0)
    """Evaluation batch size (default: 2 x batch_size)."""
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    """Forward passes per optimizer step."""
    lr: float = Field(default=5e-5, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    """Fraction of steps with linear warm-up."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Gradient clipping norm (null disables)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision, passed to Accelerate."""
    seed: int = 42
    """Seed for initialisation, dropout and data order."""
    compile: bool = False
    """torch.compile the model (inductor, dynamic shapes). Fuses element-wise work; compiling costs about a
    minute on a small CPU, so it pays off only on long runs. Same parameters and saved files as without."""
    cache_features: bool = True
    """Compute what the frozen part outputs once (cached on disk, see finetune.features) and train the rest
    on it: head_only's pooled vectors, or with kind=freeze, freeze_embeddings and freeze_layers=N (BERT-style
    encoders) the hidden states after layer N."""
    group_by_length: bool = True
    """Batch examples of similar length (shuffled buckets) so less compute is spent on padding."""
    eval_every: Literal["epoch"] | int = "epoch"
    """Evaluate every N optimizer steps, or at the end of each epoch."""
    early_stopping_patience: int | None = Field(default=None, gt=0)
    """Stop after this many evaluations without improvement of the primary metric."""
    checkpoint_every: int | None = Field(default=None, gt=0)
    """Save a resumable training state every N optimizer steps (always saved at each evaluation)."""
    log_every: int = Field(default=10, gt=0)
    """Log loss and learning rate every N optimizer steps."""
    cpu_threads: int | None = Field(default=None, gt=0)
    """Torch threads per process when training on CPU (default: available cores / processes)."""

    @model_validator(mode="after")
    def _positive_eval_interval(self) -> TrainConfig:
        if isinstance(self.eval_every, int) and self.eval_every <= 0:
            raise ValueError("eval_every must be 'epoch' or a positive number of steps")
        return self


class EvalConfig(Strict):
    metrics: list[str] = Field(default=["accuracy", "f1_macro"], min_length=1)
    """Metric names (see finetune.metrics.available_metrics()); default depends on the task."""
    primary: str = "accuracy"
    """Metric that selects the best checkpoint and drives early stopping ('loss' is allowed);
    default: the first metric."""

    @field_validator("metrics")
    @classmethod
    def _metrics_unique(cls, value):
        if len(set(value)) != len(value):
            raise ValueError(f"metric names must be unique; got {value}")
        return value


class OutputConfig(Strict):
    dir: str | None = None
    """Run folder (default: runs/<recipe name>-<timestamp>)."""
    overwrite: bool = False
    """Replace a folder that already holds a run."""
    merge_lora: bool = False
    """LoRA runs: also save a merged full model under merged/."""
    report_to: list[str] = []
    """Accelerate trackers, e.g. [tensorboard]."""


class PruneConfig(Strict):
    """Pruning applied to the best model after training (see finetune.prune); the pruned model is
    saved as its own run folder in RUN_DIR/pruned and its metrics become the run's metrics."""

    method: Literal["none", "magnitude", "heads", "layers"] = "none"
    """magnitude: global L1 unstructured over the linear layers; heads: remove the least important
    attention heads; layers: keep the most important encoder layers."""
    sparsity: float = Field(default=0.5, ge=0.0, lt=1.0)
    """magnitude: fraction of the linear layers' weights set to zero."""
    heads_fraction: float = Field(default=0.25, ge=0.0, lt=1.0)
    """heads: fraction of all attention heads removed (ranked globally by importance)."""
    layers_kept: int | None = Field(default=None, gt=0)
    """layers: encoder layers kept."""
    layer_selection: Literal["importance", "first"] = "importance"
    """layers: keep the layers whose removal hurts validation loss most, or simply the first ones."""
    importance_samples: int = Field(default=512, gt=0)
    """Validation examples used to score heads and layers."""
    finetune_epochs: float = Field(default=0.0, ge=0.0)
    """Recovery fine-tune after pruning (0: none); magnitude masks stay fixed, so sparsity holds."""
    finetune_lr: float | None = Field(default=None, gt=0)
    """Recovery learning rate (default: train.lr)."""

    @model_validator(mode="after")
    def _layers_named(self) -> PruneConfig:
        if self.method == "layers" and self.layers_kept is None:
            raise ValueError("method=layers needs layers_kept (the number of encoder layers to keep)")
        return self

    @model_validator(mode="after")
    def _settings_used(self, info: ValidationInfo) -> PruneConfig:
        """Built on its own (``finetune prune`` flags): a setting the method ignores is refused here."""
        if _caller_checks_unused(info):
            return self
        rules = [rule for rule in UNUSED if rule.key.startswith("prune.")]
        found = unused_settings(SimpleNamespace(prune=self, model_fields_set={"prune"}), rules=rules,
                                written_whole=set(PruneConfig.model_fields) <= self.model_fields_set)
        if found:
            raise ValueError(describe_unused(found, lambda key: ""))
        return self


Task = Literal["classification", "regression", "token_classification"]


class Recipe(Strict):
    """Backbone + head + policy + data + training loop: everything a run needs."""

    name: str = "recipe"
    """Short name, used for the default run folder."""
    task: Task = "classification"
    """classification (binary, multi-class, single text or pairs), regression, or token_classification."""
    backbone: BackboneConfig
    head: HeadConfig = HeadConfig()
    policy: PolicyConfig = PolicyConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    prune: PruneConfig = PruneConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, raw: Any) -> Any:
        """Metrics suited to the task when none are named; the primary defaults to the first one."""
        if not isinstance(raw, dict) or not isinstance(raw.get("eval", {}), dict):
            return raw
        from finetune.metrics import DEFAULTS

        evaluation = dict(raw.get("eval") or {})
        if "metrics" not in evaluation:
            evaluation["metrics"] = DEFAULTS.get(raw.get("task", "classification"), DEFAULTS["classification"])
        if "primary" not in evaluation and isinstance(evaluation["metrics"], list) and evaluation["metrics"]:
            evaluation["primary"] = evaluation["metrics"][0]
        return {**raw, "eval": evaluation}

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        from finetune.metrics import REGISTRY

        if self.eval.primary != "loss" and self.eval.primary not in self.eval.metrics:
            raise ValueError(f"eval.primary={self.eval.primary!r} must be 'loss' or one of eval.metrics {self.eval.metrics}")
        for name in self.eval.metrics:
            if name in REGISTRY and self.task not in REGISTRY[name].tasks:
                suited = [n for n, spec in REGISTRY.items() if self.task in spec.tasks]
                raise ValueError(f"eval.metrics: {name!r} cannot score task={self.task}; use one of {suited}")
        if self.task == "regression" and self.data.labels is not None:
            raise ValueError("data.labels does not apply to task=regression")
        if self.backbone.dtype == "float16" and self.train.mixed_precision == "fp16":
            raise ValueError("backbone.dtype=float16 with train.mixed_precision=fp16 cannot train (fp16 gradients "
                             "cannot be unscaled); keep float32 weights with fp16 autocast, or use bfloat16")
        return self

    @model_validator(mode="after")
    def _settings_have_effect(self, info: ValidationInfo) -> Recipe:
        """Built directly (``Recipe(...)``, section assignment): a given setting that would be ignored is refused."""
        if not _caller_checks_unused(info):
            found = unused_settings(self)
            if found:
                raise ValueError(describe_unused(found, lambda key: ""))
        return self

    # --- construction ---------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                  origins: Origins | None = None) -> Recipe:
        """Validate a plain dict, after applying dotted ``key=value`` overrides. ``origins`` (filled by
        ``read_recipe_file``) lets errors name the file and line, and lets a recipe switch off its base's keys.

        A given setting that would have no effect is refused, unless an override changed a setting that
        decides it (``policy.kind=full`` over a LoRA recipe, a sweep's trial): then it falls back to its
        default, with a logged warning when that changes its value, and the saved recipe shows what ran.

        Raises:
            RecipeError: unknown key (with the closest known key), wrong type, inconsistent settings, or a
                setting without effect.
        """
        return cls._validated(raw, overrides, origins or Origins())

    @classmethod
    def _validated(cls, raw: dict[str, Any], overrides: list[str] | tuple[str, ...], origins: Origins) -> Recipe:
        raw = apply_overrides(raw, overrides)
        overridden = {parse_override(text)[0] for text in overrides}
        recipe = cls._validate_raw(raw, origins, overridden)
        found = unused_settings(recipe, overridden)
        lifted = [f for f in found if f.lifted(overridden, origins)]
        if lifted:
            for finding in lifted:
                _remove_key(raw, finding.rule.key)
                if finding.value != finding.default:
                    setting = finding.setting(origins.at(finding.rule.key, overridden))
                    log.warning("%s has no effect with %s: it falls back to its default %s, since an override or a "
                                "nearer recipe file chose that", setting, finding.reason, finding.default)
            recipe = cls._validate_raw(raw, origins, overridden - {f.rule.key for f in lifted})
        refused = [f for f in found if f not in lifted]
        if refused:
            raise RecipeError(describe_unused(refused, lambda key: origins.at(key, overridden)))
        return recipe

    @classmethod
    def _validate_raw(cls, raw: dict[str, Any], origins: Origins, overridden: set[str]) -> Recipe:
        try:
            return cls.model_validate(raw, context=UNUSED_CHECKED_BY_CALLER)
        except ValidationError as err:
            raise RecipeError(_describe(err, origins, overridden)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
        """Load a recipe file (safe YAML; ``base:`` names a recipe it extends), then apply overrides.

        Raises:
            RecipeError: the file (or its base) is missing, not a YAML mapping, or invalid; the
                message names the file and line of the key at fault.
        """
        origins = Origins()
        raw = read_recipe_file(path, origins=origins)
        raw.pop("sweep", None)  # a recipe file may carry a sweep section (see finetune.sweep)
        return cls.from_dict(raw, overrides, origins)

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> Recipe:
        """A new recipe with dotted overrides applied (the same code path as command-line overrides)."""
        return Recipe.from_dict(self.to_dict(), overrides)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def run(self, resume: bool = False, overwrite: bool | None = None):
        """Train, select the best evaluation, evaluate on test and save the run folder.

        Returns a ``RunResult`` (metrics, run folder, best checkpoint).
        """
        from finetune.loop import run_recipe

        return run_recipe(self, resume=resume, overwrite=overwrite)

    def sweep(self, parameters: dict[str, Any], method: str = "bayes", n_trials: int | None = None, **settings):
        """Search over dotted recipe keys, e.g.
        ``recipe.sweep({"train.lr": {"loguniform": [1e-5, 1e-3]}, "policy.lora.rank": [4, 8, 16]}, n_trials=12)``.

        ``settings`` are any other sweep fields (objective, pruner, repeats, dir, storage, ...).
        Returns a ``SweepResult`` (trials, best params, best run folder); re-running resumes.
        """
        from finetune.sweep import parse_sweep, run_sweep

        raw = {"parameters": parameters, "method": method, **settings}
        if n_trials is not None:
            raw["n_trials"] = n_trials
        return run_sweep(self, parse_sweep(raw))


# --- files -------------------------------------------------------------------------


def _remove_key(raw: dict[str, Any], key: str) -> None:
    """Delete a dotted key from a raw recipe, so its default applies."""
    *parents, leaf = key.split(".")
    node: Any = raw
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


# --- dotted overrides -------------------------------------------------------------


def known_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key a recipe accepts, e.g. ``train.lr`` and ``policy.lora.rank``."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(known_keys(annotation, key + "."))
    return keys


def _suggest(key: str) -> str:
    hint = suggest(key, known_keys())  # by the last part and common aliases (see finetune.recipe_checks)
    return f" (did you mean '{hint}'?)" if hint else ""


FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is parsed as a YAML scalar or list (never evaluated)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} must look like key=value, e.g. train.lr=3e-4")
    key, _, value = text.partition("=")
    key = key.strip()
    if key not in known_keys():
        raise RecipeError(f"unknown recipe key '{key}'{_suggest(key)}")
    return key, parse_value(key, value)


def parse_value(key: str, value: str) -> Any:
    """An override's value as a YAML scalar or list (never evaluated); empty means null."""
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise RecipeError(f"override {key}: cannot parse value {value!r}: {err}") from None
    if isinstance(parsed, str) and FLOAT.fullmatch(parsed.strip()):
        parsed = float(parsed)  # YAML 1.1 reads 3e-4 (no dot) as text; users mean a number
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key=value`` set at its dotted path."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {key}: '{part}' is not a section")
            node = child
        node[leaf] = value
    return raw


def _describe(err: ValidationError, origins: Origins | None = None,
              overridden: set[str] | frozenset[str] = frozenset()) -> str:
    """One line: each problem with the dotted key (and, from a file, its file and line), joined by '; '."""
    parts = []
    for item in err.errors():
        # drop pydantic's union-member and validator tags from the location, keep field names
        key = ".".join(str(p) for p in item["loc"]
                       if str(p) not in ("int", "str", "float") and not str(p).startswith(("function-", "literal[")))
        at = (origins or Origins()).at(key, overridden)
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown recipe key '{key}'" + (f" at {at}" if at else "") + _suggest(key))
            continue
        if item["type"] == "missing":
            problem = "required but missing"
        else:
            got = item.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            problem = " ".join(item["msg"].removeprefix("Value error, ").split()) + shown
        # "KEY: problem" first: a sweep recognises a searched key's own errors by that start
        parts.append(f"{key or 'recipe'}: {problem}" + (f", at {at}" if at else ""))
    return "; ".join(dict.fromkeys(parts))