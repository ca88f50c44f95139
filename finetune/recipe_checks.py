"""What makes a recipe trustworthy beyond its types: suggesting the key a user meant, and refusing
settings that would be ignored in silence.

- ``suggest``: "did you mean" by the key's last part and the names other tools use (``learning_rate``).
- ``UNUSED``: keys that have no effect under other settings (LoRA keys with ``policy.kind=full``).

Nothing here imports the recipe model: rules read a recipe by attribute, so ``finetune.config``
can use this module without a cycle.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune.recipe_file import Origins

# --- "did you mean" -------------------------------------------------------------------------

# names other tools (transformers, PEFT, scripts) use for a recipe key, by the key's last part
ALIASES = {
    **dict.fromkeys(["learning_rate", "learningrate", "lr_rate", "peak_lr"], "train.lr"),
    **dict.fromkeys(["num_epochs", "num_train_epochs", "n_epochs", "epoch", "max_epochs"], "train.epochs"),
    **dict.fromkeys(["num_steps", "steps", "train_steps", "total_steps"], "train.max_steps"),
    **dict.fromkeys(["batch", "bs", "per_device_train_batch_size", "train_batch_size"], "train.batch_size"),
    **dict.fromkeys(["per_device_eval_batch_size", "eval_batch"], "train.eval_batch_size"),
    **dict.fromkeys(["grad_accum", "gradient_accumulation", "accumulation_steps", "grad_accumulation_steps"],
                    "train.gradient_accumulation_steps"),
    **dict.fromkeys(["warmup", "warmup_steps", "warmup_fraction"], "train.warmup_ratio"),
    **dict.fromkeys(["lr_scheduler", "lr_scheduler_type", "schedule"], "train.scheduler"),
    **dict.fromkeys(["fp16", "bf16", "precision", "amp"], "train.mixed_precision"),
    **dict.fromkeys(["patience", "early_stopping"], "train.early_stopping_patience"),
    **dict.fromkeys(["grad_clip", "clip_grad_norm", "gradient_clipping"], "train.max_grad_norm"),
    **dict.fromkeys(["r", "lora_r", "lora_rank"], "policy.lora.rank"),
    "lora_alpha": "policy.lora.alpha",
    "lora_dropout": "policy.lora.dropout",
    **dict.fromkeys(["model", "model_name", "model_name_or_path", "model_id", "pretrained_model"], "backbone.name"),
    **dict.fromkeys(["max_seq_length", "max_seq_len", "max_len", "seq_len", "max_tokens", "sequence_length"],
                    "data.max_length"),
    **dict.fromkeys(["dataset", "dataset_name", "data_dir", "data_path"], "data.path"),
    **dict.fromkeys(["output_dir", "out_dir", "save_dir", "run_dir"], "output.dir"),
    **dict.fromkeys(["label_names", "classes", "class_names"], "data.labels"),
    **dict.fromkeys(["metric_for_best_model", "best_metric"], "eval.primary"),
}


def suggest(key: str, known: list[str]) -> str | None:
    """The known key a mistyped or foreign ``key`` most likely means: an alias of its last part, a key
    with the same last part (in the wrong section), a close spelling of the last part, then of the whole."""
    section, _, leaf = key.rpartition(".")
    leaf = leaf.lower().replace("-", "_")
    leaves: dict[str, list[str]] = {}
    for name in known:
        leaves.setdefault(name.rpartition(".")[2], []).append(name)

    def pick(name: str) -> str | None:
        if name in ALIASES and ALIASES[name] in known:
            return ALIASES[name]
        same_section = [k for k in leaves.get(name, []) if k.rpartition(".")[0] == section]
        return (same_section or leaves.get(name) or [None])[0]

    if leaf in leaves or leaf in ALIASES:
        return pick(leaf)
    close = difflib.get_close_matches(leaf, [*leaves, *ALIASES], n=1, cutoff=0.75)
    if close:
        return pick(close[0])
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return close[0] if close else None


# --- settings that would be ignored ------------------------------------------------------------


@dataclass(frozen=True)
class Unused:
    """``key`` has no effect when ``idle(recipe)`` gives a reason (the settings named in ``switches``
    decide it); ``flagged`` says which of its values matter (cache_features=false is what runs anyway)."""

    key: str
    switches: tuple[str, ...]
    idle: Callable[[Any], str | None]
    flagged: Callable[[Any], bool] = lambda value: True


# mirrors finetune.policies (which this layer must not import); tests/test_policies.py keeps them in step
ADAPTER_KINDS = ("lora", "ia3", "dora")
"""Kinds whose ``Policy.adapter`` is true: saved as adapter + base/, ``output.merge_lora`` writes merged/."""
LORA_KINDS = ("lora", "dora")
"""Kinds that read ``policy.lora``."""


def _lora_idle(r) -> str | None:
    kind = r.policy.kind
    return None if kind in LORA_KINDS else f"policy.kind={kind} (LoRA settings apply only with kind=lora or dora)"


def _ia3_idle(r) -> str | None:
    kind = r.policy.kind
    return None if kind == "ia3" else f"policy.kind={kind} ((IA)³ settings apply only with kind=ia3)"


def _merge_idle(r) -> str | None:
    kind = r.policy.kind
    return None if kind in ADAPTER_KINDS else \
        f"policy.kind={kind} (a merged model is written only for adapters: kind={'/'.join(ADAPTER_KINDS)})"


def _freeze_idle(r) -> str | None:
    kind = r.policy.kind
    return None if kind == "freeze" else f"policy.kind={kind} (freeze settings apply only with kind=freeze)"


def _cache_idle(r) -> str | None:
    # mirrors finetune.features.applies (which this layer must not import); a test keeps them in step
    kind = r.policy.kind
    if r.distill.teacher is not None:
        return "distill.teacher is set (a student reads its teacher's targets beside each batch of tokens)"
    if not r.backbone.pretrained:
        return "backbone.pretrained=false (a random backbone is redrawn per seed, so there is nothing to cache)"
    if kind == "head_only":
        return None if r.task != "token_classification" else \
            "task=token_classification with policy.kind=head_only (only pooled sequence features are cached)"
    if kind == "freeze" and r.policy.freeze_embeddings and r.policy.freeze_layers > 0:
        return None
    return (f"policy.kind={kind}" + (f", freeze_embeddings={str(r.policy.freeze_embeddings).lower()}, freeze_layers="
                                     f"{r.policy.freeze_layers}" if kind == "freeze" else "")
            + " (features are cached only for a frozen lower part: kind=head_only, or kind=freeze with "
              "freeze_embeddings=true and freeze_layers > 0)")


def _multi_label_idle(r) -> str | None:
    return None if r.task == "multi_label_classification" else \
        f"task={r.task} (label sets and per-label thresholds apply only with task=multi_label_classification)"


def _prune_idle(*methods: str) -> Callable[[Any], str | None]:
    def idle(r) -> str | None:
        if r.prune.method in methods:
            return None
        return f"prune.method={r.prune.method} (it applies with method={'/'.join(methods)})"

    return idle


def _recovery_lr_idle(r) -> str | None:
    if r.prune.method == "none":
        return "prune.method=none (nothing is pruned, so nothing recovers)"
    return None if r.prune.finetune_epochs > 0 else "prune.finetune_epochs=0 (no recovery fine-tune runs)"


def _distill_idle(r) -> str | None:
    return None if r.distill.teacher is not None else "distill.teacher=null (no teacher: nothing is distilled)"


def _transfer_idle(r) -> str | None:
    return None if r.backbone.pretrained else \
        "backbone.pretrained=false (a random backbone continues no run's head or optimizer state)"


def _objective_idle(r) -> str | None:
    # mirrors finetune.objective.SMOOTHED_TASKS (which this layer must not import)
    if r.task == "regression":
        return "task=regression (label smoothing and class weights apply to class targets)"
    return "distill.teacher is set (the student's loss mixes in its teacher's soft targets)" \
        if r.distill.teacher is not None else None


PRUNED = ("magnitude", "heads", "layers")
SWITCH_CACHE = ("policy.kind", "policy.freeze_embeddings", "policy.freeze_layers", "backbone.pretrained", "task",
                "distill.teacher")

UNUSED: list[Unused] = [
    *(Unused(f"policy.lora.{field}", ("policy.kind",), _lora_idle)
      for field in ("rank", "alpha", "dropout", "target_modules")),
    *(Unused(f"policy.ia3.{field}", ("policy.kind",), _ia3_idle)
      for field in ("target_modules", "feedforward_modules", "exclude_modules")),
    *(Unused(f"policy.{field}", ("policy.kind",), _freeze_idle) for field in ("freeze_embeddings", "freeze_layers")),
    Unused("train.cache_features", SWITCH_CACHE, _cache_idle, flagged=lambda value: value is True),
    Unused("output.merge_lora", ("policy.kind",), _merge_idle, flagged=lambda value: value is True),
    *(Unused(f"backbone.{field}", ("backbone.pretrained",), _transfer_idle, flagged=lambda value: value is True)
      for field in ("keep_head", "warm_optimizer")),
    Unused("train.layer_lr_decay", ("policy.kind",),
           lambda r: "policy.kind=head_only (only the head trains: there are no layers to give rates)"
           if r.policy.kind == "head_only" else None),
    Unused("train.soup_size", ("train.soup",),
           lambda r: "train.soup=none (no soup is made)" if r.train.soup == "none" else None),
    Unused("head.hidden_size", ("head.type",),
           lambda r: None if r.head.type == "mlp" else f"head.type={r.head.type} (the width of the MLP head)"),
    *(Unused(key, ("task",), _multi_label_idle)
      for key in ("data.label_separator", "eval.threshold", "eval.tune_thresholds")),
    Unused("data.max_test_samples", ("data.splits.test",),
           lambda r: None if r.data.splits.test is not None else "data.splits.test=null (no test split is read)"),
    Unused("prune.sparsity", ("prune.method",), _prune_idle("magnitude")),
    Unused("prune.heads_fraction", ("prune.method",), _prune_idle("heads")),
    Unused("prune.layers_kept", ("prune.method",), _prune_idle("layers")),
    Unused("prune.layer_selection", ("prune.method",), _prune_idle("layers")),
    Unused("prune.importance_samples", ("prune.method",), _prune_idle("heads", "layers")),
    Unused("prune.finetune_epochs", ("prune.method",), _prune_idle(*PRUNED)),
    Unused("prune.finetune_lr", ("prune.method", "prune.finetune_epochs"), _recovery_lr_idle),
    *(Unused(f"train.{field}", ("task", "distill.teacher"), _objective_idle, flagged=flagged)
      for field, flagged in (("label_smoothing", lambda value: value > 0),
                             ("class_weights", lambda value: value != "none"))),
    Unused("backbone.reinit_layers", ("backbone.pretrained",), flagged=lambda value: value > 0,
           idle=lambda r: None if r.backbone.pretrained else "backbone.pretrained=false (every layer starts random)"),
    *(Unused(f"distill.{field}", ("distill.teacher",), _distill_idle)
      for field in ("temperature", "alpha", "unlabeled", "max_unlabeled")),
]


@dataclass(frozen=True)
class Finding:
    """A setting the user gave that would be ignored."""

    rule: Unused
    value: Any
    default: Any
    reason: str

    def setting(self, where: str = "") -> str:
        shown = self.value if isinstance(self.value, str) else json.dumps(self.value)
        return f"{self.rule.key}={shown}" + (f" at {where}" if where else "")

    def lifted(self, overridden: set[str] | frozenset[str], origins: Origins) -> bool:
        """An override, or a file nearer than the one that set this key, changed a setting that decides it:
        the user chose that setting, and this key (a sweep's other parameter, a base's LoRA section) goes."""
        if overridden & set(self.rule.switches):
            return True
        depth = None if self.rule.key in overridden else origins.depth.get(self.rule.key)
        return depth is not None and any(origins.depth.get(s, depth) < depth for s in self.rule.switches)


def describe_unused(found: list[Finding], where: Callable[[str], str]) -> str:
    """One line; settings idle for the same reason are named together."""
    groups: dict[str, list[Finding]] = {}
    for finding in found:
        groups.setdefault(finding.reason, []).append(finding)
    # "KEY=VALUE has no effect", never "KEY: ...": a sweep judges a searched key's own errors (those
    # starting "KEY:") before any trial, and this one may be lifted by another searched key
    return "; ".join(", ".join(f.setting(where(f.rule.key)) for f in group)
                     + (" has" if len(group) == 1 else " have") + f" no effect with {reason}; remove "
                     + ("it" if len(group) == 1 else "them") + " or change that setting"
                     for reason, group in groups.items())


def _field(recipe: Any, key: str) -> tuple[Any, str, bool]:
    """(section object, field name, whether every part of the key was given rather than defaulted)."""
    node, given = recipe, True
    *parents, leaf = key.split(".")
    for part in parents:
        given = given and part in node.model_fields_set
        node = getattr(node, part)
    return node, leaf, given and leaf in node.model_fields_set


LATER_SECTIONS = ("distill",)
"""Sections newer than the first saved recipes: a run folder's recipe.yaml written before one existed lacks it
and is still a recipe written out whole (else every older run folder would fail to load)."""


def unused_settings(recipe: Any, overridden: set[str] | frozenset[str] = frozenset(),
                    rules: list[Unused] = UNUSED, written_whole: bool | None = None) -> list[Finding]:
    """Keys the user gave that have no effect under the recipe's other settings.

    A key counts as given when it is an override, or the recipe lists it. A recipe that lists every
    section was written out whole (a saved recipe.yaml, a with_overrides round trip): there a default
    value is listed because everything is, not chosen, so only values that differ from it count.
    """
    if written_whole is None:
        written_whole = set(type(recipe).model_fields) - set(LATER_SECTIONS) <= recipe.model_fields_set
    found = []
    for rule in rules:
        reason = rule.idle(recipe)
        if reason is None:
            continue
        section, name, listed = _field(recipe, rule.key)
        value = getattr(section, name)
        default = type(section).model_fields[name].get_default(call_default_factory=True)
        given = rule.key in overridden or (listed and (not written_whole or value != default))
        if given and rule.flagged(value):
            found.append(Finding(rule, value, default, reason))
    return found
