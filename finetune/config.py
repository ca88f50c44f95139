"""The Recipe: one typed, validated description of a fine-tuning run.

A recipe is plain data (YAML <-> Python). Every field has a type and a one-line
docstring; unknown keys are errors, and errors name the dotted key the user wrote
(``train.lr``), so the same messages serve YAML files, ``key=value`` overrides and
Python attribute assignment. Each error is one line; from a file it also names the file and line.
A key that would be ignored under the other settings (LoRA keys with kind=full) is refused too.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from finetune import schema
from finetune.data_config import ColumnsConfig, DataConfig, SplitsConfig  # noqa: F401  (re-exported)
from finetune.distill_config import DistillConfig
from finetune.errors import RecipeError  # noqa: F401  (re-exported: the name users catch)
from finetune.recipe_checks import UNUSED, describe_unused, unused_settings
from finetune.recipe_file import Origins, read_recipe_file  # noqa: F401  (read_recipe_file: re-exported)
from finetune.schema import Strict, parse_value  # noqa: F401  (parse_value: re-exported)

log = logging.getLogger("finetune")

# validation context of Recipe.from_dict, which checks unused settings itself (it knows the overrides)
UNUSED_CHECKED_BY_CALLER = {"unused_settings": "checked by the caller"}


def _caller_checks_unused(info: ValidationInfo) -> bool:
    return isinstance(info.context, dict) and info.context.get("unused_settings") is not None


# the run-folder files lineage reads (finetune.runs.RECIPE and METRICS; finetune.runs sits above the schema)
RUN_RECIPE, RUN_METRICS = "recipe.yaml", "metrics.json"


class BackboneSource(Strict):
    """Where a backbone taken from a finished run came from: the recipe records it as the run's lineage."""

    run: str
    """backbone.name as given (the source run folder)."""
    recipe: str | None = None
    """The source run's recipe name."""
    policy: str | None = None
    """The source run's policy.kind."""
    backbone: str | None = None
    """The source run's own backbone.name (one step further back)."""
    fingerprint: str | None = None
    """Hash of the source run's recipe.yaml and metrics.json: training that folder again gives another."""


def run_lineage(name: str) -> BackboneSource | None:
    """The lineage of ``name`` when it is a run folder (it holds recipe.yaml), else None. Reads two small files."""
    folder = Path(name).expanduser()
    try:
        text = (folder / RUN_RECIPE).read_bytes()
        metrics = (folder / RUN_METRICS).read_bytes() if (folder / RUN_METRICS).is_file() else b""
        saved = yaml.safe_load(text)
    except (OSError, yaml.YAMLError):  # not a run folder, or a damaged one: resolving the backbone says why
        return None
    saved = saved if isinstance(saved, dict) else {}

    def text_at(*keys: str) -> str | None:
        node: Any = saved
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, str) else None

    return BackboneSource(run=name, recipe=text_at("name"), policy=text_at("policy", "kind"),
                          backbone=text_at("backbone", "name"),
                          fingerprint=hashlib.blake2b(text + b"\0" + metrics, digest_size=8).hexdigest())


class BackboneConfig(Strict):
    name: str
    """Hugging Face hub id (resolved through local mirrors when offline), a local model folder, or a finished
    run folder (runs/X): its fine-tuned encoder (a LoRA/DoRA/IA3 adapter merged in), tokenizer and pooling."""
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
    reinit_layers: int = Field(default=0, ge=0)
    """Re-initialise the top N encoder layers before fine-tuning, as in Zhang et al. 2021,
    "Revisiting Few-sample BERT Fine-tuning": the top layers are the most specific to the pre-training task."""
    keep_head: bool = False
    """With backbone.name a run folder: continue with that run's trained head (same task, head type and size,
    and the same labels in the same order); false: a new head seeded by train.seed."""
    warm_optimizer: bool = False
    """With keep_head: start from the run's AdamW moments (it must have kept checkpoints/last: output.keep=
    model+checkpoint or all); the learning-rate schedule starts fresh."""
    source: BackboneSource | None = None
    """Filled in, not set: the lineage of the run backbone.name names (None for other backbones); a value whose
    run differs from backbone.name is replaced."""

    @model_validator(mode="before")
    @classmethod
    def _record_source(cls, raw: Any) -> Any:
        # a saved recipe keeps the lineage it ran with, even once its source folder is gone or trained again
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            return raw
        given = raw.get("source")
        given_run = given.get("run") if isinstance(given, dict) else getattr(given, "run", None)
        if given is not None and given_run == raw["name"]:
            return raw
        return {**raw, "source": run_lineage(raw["name"])}

    @model_validator(mode="after")
    def _warm_start_keeps_the_head(self) -> BackboneConfig:
        if self.warm_optimizer and not self.keep_head:
            raise ValueError("warm_optimizer=true needs keep_head=true: the run's optimizer moments belong to its "
                             "trained head too")
        return self


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


class Ia3Config(Strict):
    target_modules: list[str] | None = None
    """Modules whose outputs (or, for feed-forward ones, inputs) are scaled; a name matches any dotted suffix
    (default per architecture, for BERT: key, value, output.dense)."""
    feedforward_modules: list[str] | None = None
    """Of target_modules, those scaled at their input (default per architecture, for BERT: output.dense)."""
    exclude_modules: list[str] | None = None
    """Modules never scaled (default for BERT-style encoders: attention.output.dense, which output.dense
    matches too; the paper scales only the feed-forward one)."""


class PolicyConfig(Strict):
    kind: Literal["full", "head_only", "freeze", "lora", "bitfit", "ia3", "dora"] = "full"
    """What trains: everything, only the head, all but frozen lower parts, LoRA adapters + head, biases + head
    (BitFit), (IA)³ scaling vectors + head, or DoRA adapters + head."""
    freeze_embeddings: bool = False
    """With kind=freeze: freeze the embedding layer."""
    freeze_layers: int = Field(default=0, ge=0)
    """With kind=freeze: freeze the first N encoder layers."""
    lora: LoraConfig = LoraConfig()
    """LoRA settings, used when kind=lora or kind=dora."""
    ia3: Ia3Config = Ia3Config()
    """(IA)³ settings, used when kind=ia3."""

    @model_validator(mode="after")
    def _freeze_settings_match_kind(self) -> PolicyConfig:
        # freeze settings under another kind are unused settings (finetune.recipe_checks.UNUSED), which an
        # override of policy.kind (a sweep, a compare variant) may clear instead of failing
        if self.kind == "freeze" and not (self.freeze_embeddings or self.freeze_layers > 0):
            raise ValueError("kind=freeze needs freeze_embeddings=true and/or freeze_layers > 0")
        return self


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
    head_lr: float | None = Field(default=None, gt=0)
    """Peak learning rate of the task head (default: lr). A fresh head on many classes often learns best
    faster than the pretrained backbone, e.g. 10x lr."""
    layer_lr_decay: float | None = Field(default=None, gt=0, le=1)
    """Layer-wise learning-rate decay: the head trains at lr (or head_lr), the top encoder layer at lr x d, each
    layer below at one more factor d, the embeddings at lr x d^(layers + 1) (ELECTRA's convention). Lower layers
    hold more general features; a smaller step keeps more of them. Default: one lr for the whole backbone."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    """Fraction of steps with linear warm-up."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Gradient clipping norm (null disables)."""
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Training targets mix this share of a uniform distribution into the gold label (classification, token
    classification; per label toward 0.5 for multi-label). Validation and test losses stay unsmoothed."""
    class_weights: Literal["none", "balanced"] = "none"
    """balanced: each class's training loss is weighted by rows / (classes x its rows), so rare classes count as
    much as common ones (multi-label: each label's positives by its negatives / positives). For imbalanced
    tasks; validation and test losses stay unweighted."""
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
    soup: Literal["none", "uniform", "greedy"] = "none"
    """Average the weights of the run's best soup_size evaluations ("model soups", see finetune.soup): uniform
    takes them all, greedy adds them best first while validation does not drop. The soup replaces the best
    evaluation only if it scores at least as well on validation. Needs several evaluations (train.eval_every)."""
    soup_size: int = Field(default=4, ge=2)
    """How many of the best evaluations train.soup keeps as candidates."""
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
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    """task=multi_label_classification: a label applies when its probability is above this (every label)."""
    tune_thresholds: bool = False
    """task=multi_label_classification: after training, tune one threshold per label on validation (the one
    maximising that label's F1, see finetune.thresholds); saved in the model's config.json, used by predict and eval."""
    analyze: bool = True
    """After ``finetune train`` / ``Recipe.run()``: write RUN/analysis/ (``finetune analyze`` on the test split: per-class
    scores, confusions, worst errors, calibration) at the cost of one more pass over test. Sweep trials and compare's
    variants skip it; ``finetune analyze RUN`` writes it on demand."""

    @field_validator("metrics")
    @classmethod
    def _metrics_unique(cls, value):
        if len(set(value)) != len(value):
            raise ValueError(f"metric names must be unique; got {value}")
        return value


class OutputConfig(Strict):
    dir: str | None = None
    """Run folder (default: runs/<recipe name>-<timestamp> under $FINETUNE_HOME, else under the current folder)."""
    overwrite: bool = False
    """Replace a folder that already holds a run."""
    merge_lora: bool = False
    """Adapter runs (lora, dora, ia3): also save a merged full model under merged/."""
    report_to: list[str] = []
    """Accelerate trackers, e.g. [tensorboard]."""
    keep: Literal["model", "model+checkpoint", "all"] = "model"
    """What stays once the run has finished (until then its checkpoint always stays, for --resume): model: the
    exported model with its recipe, log, metrics and card (checkpoints/ goes: the best checkpoint is the
    exported model); model+checkpoint: also checkpoints/last, to train further; all: that, and a sweep keeps
    its trials' checkpoints too."""


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


Task = Literal["classification", "regression", "token_classification", "multi_label_classification"]


class RecipeConfig(Strict):
    """Backbone + head + policy + data + training loop: everything a run needs, as plain validated data.

    The schema alone: ``finetune.Recipe`` (finetune.recipe) extends it with ``run()`` and ``sweep()``."""

    name: str = "recipe"
    """Short name, used for the default run folder."""
    task: Task = "classification"
    """classification (binary, multi-class, single text or pairs), regression, token_classification, or
    multi_label_classification (each row has a set of labels, possibly empty)."""
    backbone: BackboneConfig
    head: HeadConfig = HeadConfig()
    policy: PolicyConfig = PolicyConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    prune: PruneConfig = PruneConfig()
    distill: DistillConfig = DistillConfig()
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
        data = raw.get("data")
        if raw.get("task") == "multi_label_classification" and isinstance(data, dict) \
                and data.get("label_separator") is None:  # label sets: an empty label cell is valid (ingest)
            raw = {**raw, "data": {**data, "label_separator": "|"}}
        return {**raw, "eval": evaluation}

    @model_validator(mode="after")
    def _consistent(self) -> RecipeConfig:
        from finetune.metrics import REGISTRY

        if self.eval.primary != "loss" and self.eval.primary not in self.eval.metrics:
            raise ValueError(f"eval.primary={self.eval.primary!r} must be 'loss' or one of eval.metrics {self.eval.metrics}")
        for name in self.eval.metrics:
            if name in REGISTRY and self.task not in REGISTRY[name].tasks:
                suited = [n for n, spec in REGISTRY.items() if self.task in spec.tasks]
                raise ValueError(f"eval.metrics: {name!r} cannot score task={self.task}; use one of {suited}")
        if self.task == "regression" and self.data.labels is not None:
            raise ValueError("data.labels does not apply to task=regression")
        if self.train.soup != "none" and self.policy.kind in ("lora", "dora"):
            raise ValueError(f"train.soup={self.train.soup} with policy.kind={self.policy.kind}: averaging LoRA's A and "
                             "B factors does not average the updates B·A; soups need kind=full, freeze, bitfit, "
                             "head_only or ia3")
        if self.backbone.dtype == "float16" and self.train.mixed_precision == "fp16":
            raise ValueError("backbone.dtype=float16 with train.mixed_precision=fp16 cannot train (fp16 gradients "
                             "cannot be unscaled); keep float32 weights with fp16 autocast, or use bfloat16")
        return self

    @model_validator(mode="after")
    def _settings_have_effect(self, info: ValidationInfo) -> RecipeConfig:
        """Built directly (``Recipe(...)``, section assignment): a given setting that would be ignored is refused."""
        if not _caller_checks_unused(info):
            found = unused_settings(self)
            if found:
                raise ValueError(describe_unused(found, lambda key: ""))
        return self

    # --- construction ---------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                  origins: Origins | None = None) -> RecipeConfig:
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
    def _validated(cls, raw: dict[str, Any], overrides: list[str] | tuple[str, ...], origins: Origins) -> RecipeConfig:
        raw = schema.apply_overrides(raw, overrides, known_keys())
        overridden = {parse_override(text)[0] for text in overrides}
        recipe = cls._validate_raw(raw, origins, overridden)
        found = unused_settings(recipe, overridden)
        lifted = [f for f in found if f.lifted(overridden, origins)]
        if lifted:
            for finding in lifted:
                schema.remove_key(raw, finding.rule.key)
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
    def _validate_raw(cls, raw: dict[str, Any], origins: Origins, overridden: set[str]) -> RecipeConfig:
        try:
            return cls.model_validate(raw, context=UNUSED_CHECKED_BY_CALLER)
        except ValidationError as err:
            raise RecipeError(schema.describe(err, known_keys(), origins, overridden)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
        """Load a recipe file (safe YAML; ``base:`` names a recipe it extends), then apply overrides.

        Raises:
            RecipeError: the file (or its base) is missing, not a YAML mapping, or invalid; the
                message names the file and line of the key at fault.
        """
        origins = Origins()
        raw = read_recipe_file(path, origins=origins)
        raw.pop("sweep", None)  # a recipe file may carry a sweep section (see finetune.sweep)
        return cls.from_dict(raw, overrides, origins)

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> RecipeConfig:
        """A new recipe of the same class with dotted overrides applied (the same code path as
        command-line overrides)."""
        return type(self).from_dict(self.to_dict(), overrides)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def known_keys(model: type[BaseModel] = RecipeConfig, prefix: str = "") -> list[str]:
    """Every dotted key a recipe accepts, e.g. ``train.lr`` and ``policy.lora.rank``."""
    return schema.known_keys(model, prefix)


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is parsed as a YAML scalar or list (never evaluated)."""
    return schema.parse_override(text, known_keys())
