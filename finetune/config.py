"""The Recipe: one typed, validated description of a fine-tuning run.

A recipe is plain data (YAML <-> Python). Every field has a type and a one-line
docstring; unknown keys are errors, and errors name the dotted key the user wrote
(``train.lr``), so the same messages serve YAML files, ``key=value`` overrides and
Python attribute assignment.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from finetune.errors import RecipeError  # noqa: F401  (re-exported: the name users catch)


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
        freezes = self.freeze_embeddings or self.freeze_layers > 0
        if self.kind == "freeze" and not freezes:
            raise ValueError("kind=freeze needs freeze_embeddings=true and/or freeze_layers > 0")
        if self.kind != "freeze" and freezes:
            raise ValueError(f"freeze_embeddings/freeze_layers only apply with kind=freeze, not kind={self.kind}")
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
    validation: str = "validation"
    """Split used for evaluation during training and model selection."""
    test: str | None = "test"
    """Held-out split evaluated once with the best model (null to skip)."""


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
            return [str(v) if isinstance(v, (int, float)) else v for v in value]
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

    # --- construction ---------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
        """Validate a plain dict, after applying dotted ``key=value`` overrides.

        Raises:
            RecipeError: unknown key (with the closest known key), wrong type, or inconsistent settings.
        """
        raw = apply_overrides(raw, overrides)
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            raise RecipeError(_describe(err)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
        """Load a recipe file (safe YAML; ``base:`` names a recipe it extends), then apply overrides.

        Raises:
            RecipeError: the file (or its base) is missing, not a YAML mapping, or invalid.
        """
        raw = read_recipe_file(path)
        raw.pop("sweep", None)  # a recipe file may carry a sweep section (see finetune.sweep)
        return cls.from_dict(raw, overrides)

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


def read_recipe_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a recipe file. ``base: NAME_OR_PATH`` (a file next to this one, or a
    shipped recipe) is read first and this file's sections are merged over it, key by key.

    Raises:
        RecipeError: a file is missing or not a mapping, or bases form a cycle.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    if path.resolve() in _seen:
        raise RecipeError(f"{path}: base recipes form a cycle ({' -> '.join(p.name for p in _seen)})")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a YAML mapping of recipe sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    local = path.parent / str(base)
    if not local.is_file():
        import recipes

        local = recipes.recipe_path(str(base))
    parent = read_recipe_file(local, (*_seen, path.resolve()))
    parent.pop("sweep", None)  # a base's own sweep doesn't carry over
    return _merge(parent, raw)


def _merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_sections else value
    return merged


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
    close = difflib.get_close_matches(key, known_keys(), n=1, cutoff=0.5)
    if not close:  # match on the last part, for typos in the section name
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in known_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


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


def _describe(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        # drop pydantic's union-member and validator tags from the location, keep field names
        key = ".".join(str(p) for p in item["loc"]
                       if str(p) not in ("int", "str", "float") and not str(p).startswith(("function-", "literal[")))
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown recipe key '{key}'{_suggest(key)}")
        elif item["type"] == "missing":
            lines.append(f"{key}: required but missing")
        else:
            got = item.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{key or 'recipe'}: {item['msg']}{shown}")
    return "invalid recipe:\n  " + "\n  ".join(dict.fromkeys(lines))
