"""Sequential transfer: a finished run as the starting point of the next recipe.

    backbone:
      name: runs/agnews        # a finished run folder: its fine-tuned encoder, tokenizer and pooling
      keep_head: true          # and its trained head (same task, head and labels in the same order)
      warm_optimizer: true     # and its AdamW moments (the run kept checkpoints/last)

or ``finetune train --recipe R --from runs/agnews [--warm-optimizer]`` (keep_head on, same labels required).

A run folder is recognised by its layout (recipe.yaml), not by its name. Its model is taken apart once
into an ordinary backbone folder (the encoder's config and weights, the run's tokenizer), its head
(``head.safetensors``) and what it was (``transfer.json``), under ``$FINETUNE_CACHE/backbones`` (default
``~/.cache/finetune/backbones``), keyed by the run's folder, lineage fingerprint and weight files. Everything
downstream (``backbone.num_layers``, the feature cache, a sweep's reuse) then sees a plain backbone folder.
Adapter runs (lora, dora, ia3) are merged: their ``merged/`` model when they wrote one, else the adapter
applied to ``base/``. Magnitude- and layer-pruned runs are plain models; head-pruned ones are refused (a
backbone config cannot say that its layers lost different heads).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune import runs
from finetune.config import BackboneConfig, RecipeConfig, RecipeError, run_lineage
from finetune.policies import POLICIES
from finetune.tasks import TASKS

log = logging.getLogger("finetune")

TRANSFER_FILE, HEAD_FILE = "transfer.json", "head.safetensors"
ENSEMBLE_FILE = "ensemble.json"  # finetune.ensemble.artefact.ARTEFACT (that package sits above the run)
SWEEP_FILE = "sweep.yaml"  # what finetune.sweep writes into a sweep folder
OPTIMIZER_FILE = "optimizer.bin"  # Accelerate's name for the optimizer state in a checkpoint
# position embeddings offset by the padding index: the tokenizer reads 2 fewer tokens than there are positions
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "mpnet", "data2vec-text"}


def cache_root() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune")) / "backbones"


def is_run_like(folder: Path) -> bool:
    """A run folder, an ensemble, or a model folder inside a run (merged/, base/): what ``backbone_from_run``
    takes or refuses with a reason, rather than a plain model folder."""
    if not folder.is_dir():
        return False
    if any((folder / name).is_file() for name in (runs.RECIPE, ENSEMBLE_FILE, SWEEP_FILE)):
        return True
    return _config(folder).get("model_type") == "finetune"


def _config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def check_source(folder: Path, name: str) -> None:
    """The folder holds one finished run's model that can become a backbone.

    Raises:
        RecipeError: an ensemble, a sweep, a model folder inside a run, a removed model, an unfinished run, no weights,
            an adapter without its base, or a head-pruned model (one line naming the folder and the way out).
    """
    key = f"backbone.name={name}"
    if (folder / ENSEMBLE_FILE).is_file():
        raise RecipeError(f"{key}: {folder} is an ensemble, not a single model; name one of its members' run "
                          f"folders (listed in {folder / ENSEMBLE_FILE})")
    if (folder / SWEEP_FILE).is_file() and not (folder / runs.RECIPE).is_file():
        raise RecipeError(f"{key}: {folder} is a sweep, not a run; name its best trial's run folder {folder / 'best'}")
    if not (folder / runs.RECIPE).is_file():
        raise RecipeError(f"{key}: {folder} is the model folder inside a run, not the run; name the run folder "
                          f"{folder.parent}")
    if (folder / runs.MODEL_REMOVED).exists():
        raise RecipeError(f"{key}: {folder} had its model removed by its sweep (see {runs.MODEL_REMOVED}); name a "
                          "run that kept its model (the sweep's best/ or a kept trial), or train it again")
    if not (folder / runs.METRICS).is_file():
        way = (f"finish it with {runs.train_command(folder, '--resume')}" if runs.checkpoint_step(folder) is not None
               else f"it stopped before its first checkpoint: train it with {runs.train_command(folder, '--overwrite')}")
        raise RecipeError(f"{key}: {folder} is an unfinished run (no {runs.METRICS}); {way}, then start from it")
    missing = [] if (folder / runs.LABEL_MAP).is_file() else [runs.LABEL_MAP]
    if not any((folder / weights).is_file() for weights in runs.WEIGHTS):
        missing.append(f"model weights ({' or '.join(runs.WEIGHTS)})")
    if missing:
        raise RecipeError(f"{key}: {folder} is a finished run without its {' and '.join(missing)}; restore the "
                          "run folder or train it again")
    adapter = (folder / "adapter_config.json").is_file()
    if adapter and not any((folder / sub / "config.json").is_file() for sub in ("merged", "base")):
        raise RecipeError(f"{key}: {folder} holds an adapter but neither base/ nor merged/ to apply it to; "
                          "restore the run folder or train it again")
    if _config(folder).get("removed_heads"):
        raise RecipeError(f"{key}: {folder} is a head-pruned run (prune.method=heads): its layers lost different "
                          "attention heads, which a backbone config cannot describe; start from the unpruned run "
                          f"({folder.parent} if this is its pruned/) or a magnitude- or layer-pruned one")


def backbone_from_run(name: str, resolve: Callable[[BackboneConfig], Path]) -> Path:
    """The run folder ``name`` as a plain backbone folder (built once, then read from the cache).
    ``resolve`` finds the backbone the run itself started from, for its tokenizer's length limit.

    Raises:
        RecipeError: the folder can't be a backbone (see ``check_source``), or is not a finished run.
    """
    folder = Path(name).expanduser()
    check_source(folder, name)
    lineage = run_lineage(name)
    files = [folder / w for w in runs.WEIGHTS] + [folder / sub / "model.safetensors" for sub in ("merged", "base")]
    weights = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file())
    payload = json.dumps([str(folder.resolve()), lineage.fingerprint if lineage else None, weights])
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", (lineage.recipe if lineage and lineage.recipe else folder.name))[:40]
    target = cache_root() / f"{label}-{hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()}"
    if not (target / TRANSFER_FILE).is_file():
        _take_apart(folder, name, target, resolve)
    return target


def _take_apart(folder: Path, name: str, target: Path, resolve: Callable[[BackboneConfig], Path]) -> None:
    """Write the run's encoder, tokenizer, head and description into ``target`` (aside, then moved into place:
    processes of one launch may do it at once; the first one's folder stays)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    recipe = RecipeConfig.from_yaml(folder / runs.RECIPE)
    model, loaded = _plain_model(folder, recipe)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.backbone.save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    # the run saved its tokenizer with the data.max_length it trained at; the encoder reads what it always could
    tokenizer.model_max_length = _length_limit(recipe, model.backbone.config, resolve)
    tokenizer.save_pretrained(tmp)
    save_file({k: v.detach().float().contiguous() for k, v in model.classifier.state_dict().items()}, str(tmp / HEAD_FILE))
    label_map = json.loads((folder / runs.LABEL_MAP).read_text())
    config = model.config
    source = {"run": name, "path": str(folder.resolve()), "policy": recipe.policy.kind, "loaded": loaded,
              "task": recipe.task, "labels": [label_map[str(i)] for i in range(len(label_map))] or None,
              "head": {"type": config.head_type, "hidden_size": config.head_hidden_size, "pooling": config.pooling},
              "layers": getattr(model.backbone.config, "num_hidden_layers", None)}
    (tmp / TRANSFER_FILE).write_text(json.dumps(source, indent=2) + "\n")
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / TRANSFER_FILE).is_file():
            raise


def _plain_model(folder: Path, recipe: RecipeConfig) -> tuple[nn.Module, str]:
    """The run's best model as one plain model, and how it was read, e.g. "lora, merged 4 adapter modules".
    (As finetune.predict.load_run reads it; that module sits above this one: data -> sources -> backbones.)"""
    import transformers

    from finetune.modeling import register_auto_classes

    register_auto_classes()  # the Auto class below loads our architecture
    auto_class = getattr(transformers, TASKS[recipe.task].auto_class_name)
    kind = recipe.policy.kind
    if not (folder / "adapter_config.json").is_file():
        pruned = f", pruned by {recipe.prune.method}" if (folder / "prune_report.json").is_file() else ""
        return auto_class.from_pretrained(str(folder)), kind + pruned
    if (folder / "merged" / "config.json").is_file():
        return auto_class.from_pretrained(str(folder / "merged")), f"{kind}, its merged/ model"
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from finetune.policies import plain

    # the base beside the adapter (adapter_config.json names an absolute path, wrong once a run folder moved)
    model = PeftModel.from_pretrained(auto_class.from_pretrained(str(folder / "base")), str(folder))
    adapted = sum(isinstance(module, BaseTunerLayer) for module in model.modules())
    return plain(model)[0], f"{kind}, merged {adapted} adapter modules into base/"


def _length_limit(recipe: RecipeConfig, config, resolve: Callable[[BackboneConfig], Path]) -> int:
    """The token limit of the tokenizer the run started from, else what the encoder's positions allow."""
    try:
        settings = json.loads((resolve(recipe.backbone) / "tokenizer_config.json").read_text())
        limit = settings.get("model_max_length")
        if isinstance(limit, (int, float)):
            return int(min(limit, 1e30))
    except (RecipeError, OSError, ValueError):
        pass  # not reachable now: the encoder's own limit
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return int(1e30)  # transformers' "no limit"
    return positions - 2 if config.model_type in OFFSET_POSITIONS else positions


def read_source(backbone_path: Path) -> dict[str, Any] | None:
    """What a backbone folder built by ``backbone_from_run`` came from; None for any other backbone."""
    file = Path(backbone_path) / TRANSFER_FILE
    return json.loads(file.read_text()) if file.is_file() else None


# --- the head ----------------------------------------------------------------------------------


def head_differences(source: dict[str, Any], recipe: RecipeConfig, labels: list[str] | None) -> list[str]:
    """What keeps the run's head from serving this recipe (empty when it fits)."""
    def names(values: list[str] | None) -> str:
        return "none" if values is None else "[" + ", ".join(values) + "]"

    found, head = [], source["head"]
    if recipe.task != source["task"]:
        found.append(f"task differs: run has {source['task']}, recipe has {recipe.task}")
    if recipe.head.type != head["type"]:
        found.append(f"head.type differs: run has {head['type']}, recipe has {recipe.head.type}")
    elif recipe.head.type == "mlp" and recipe.head.hidden_size != head["hidden_size"]:
        found.append(f"head.hidden_size differs: run has {head['hidden_size']}, recipe has {recipe.head.hidden_size}")
    pooling = head["pooling"] if recipe.head.pooling == "auto" else recipe.head.pooling
    if not TASKS[recipe.task].words and pooling != head["pooling"]:
        found.append(f"head.pooling differs: run has {head['pooling']}, recipe has {pooling}")
    if labels != source["labels"]:
        found.append(f"labels differ: run has {names(source['labels'])}, recipe has {names(labels)}")
        if labels and source["labels"] and set(labels) <= set(source["labels"]):
            found[-1] += f" (data.labels={names(source['labels'])} keeps the run's)"
    return found


def load_head(model: nn.Module, backbone_path: Path, recipe: RecipeConfig, labels: list[str] | None) -> None:
    """backbone.keep_head: the run's trained head weights into ``model.classifier``.

    Raises:
        RecipeError: backbone.name is not a run folder, or the head does not fit (what differs, named).
    """
    from safetensors.torch import load_file

    source = read_source(backbone_path)
    if source is None:
        raise RecipeError(f"backbone.keep_head=true: backbone.name={recipe.backbone.name} is not a run folder, so "
                          "there is no trained head to keep; name a finished run folder, or drop keep_head")
    found = head_differences(source, recipe, labels)
    if found:
        raise RecipeError(f"backbone.keep_head=true: the head of run {recipe.backbone.name} does not fit this recipe: "
                          f"{'; '.join(found)}; make them match, or set backbone.keep_head=false for a new head")
    model.classifier.load_state_dict(load_file(str(Path(backbone_path) / HEAD_FILE)))


def describe(source: dict[str, Any], recipe: RecipeConfig, labels: list[str] | None) -> list[str]:
    """Log lines: which run the backbone comes from and what was done, and what became of the head."""
    run = recipe.backbone.name
    lines = [f"backbone from run {run} ({source['loaded']})"]
    if recipe.backbone.keep_head:
        lines.append(f"head: the trained head of run {run}" + (f" (labels {', '.join(labels)})" if labels else ""))
    elif not head_differences(source, recipe, labels):
        lines.append(f"head: new, seeded by train.seed={recipe.train.seed}; backbone.keep_head=true would continue "
                     f"with the trained head of run {run} (same labels)")
    else:
        lines.append(f"head: new, seeded by train.seed={recipe.train.seed} (the run's head is for another task or "
                     "label set)")
    if (Path(source["path"]) / "pruned" / runs.RECIPE).is_file():
        lines.append(f"run {run} also holds a pruned model: name {Path(run) / 'pruned'} to start from that one")
    return lines


# --- the optimizer -----------------------------------------------------------------------------


def warm_start_file(recipe: RecipeConfig, source: dict[str, Any] | None, model: nn.Module) -> Path:
    """backbone.warm_optimizer, checked before anything is written: the run's optimizer state file.

    Raises:
        RecipeError: no run backbone, no checkpoint kept (names output.keep), adapters on either side, or
            trainable parameters other than the run's.
    """
    flag = "backbone.warm_optimizer=true (--warm-optimizer)"
    if source is None:
        raise RecipeError(f"{flag}: backbone.name={recipe.backbone.name} is not a run folder; name a finished run")
    folder = Path(source["path"])
    state = folder / runs.CHECKPOINT / OPTIMIZER_FILE
    if not state.is_file():
        keep = RecipeConfig.from_yaml(folder / runs.RECIPE).output.keep
        raise RecipeError(f"{flag}: run {recipe.backbone.name} kept no optimizer state: it ran with output.keep={keep}, which "
                          "removes checkpoints/ once a run finishes; train it again with output.keep=model+checkpoint "
                          "(or all), or drop the warm start")
    adapters = [kind for kind in (source["policy"], recipe.policy.kind) if POLICIES[kind].adapter]
    if adapters:
        raise RecipeError(f"{flag}: adapter policies ({', '.join(dict.fromkeys(adapters))}) start fresh adapters on "
                          f"the merged backbone, so the run's moments belong to none of them; drop the warm start")
    ours = {name for name, p in model.named_parameters() if p.requires_grad}
    theirs = _trained_names(folder)
    if theirs is not None and theirs != ours:
        raise RecipeError(f"{flag}: run {recipe.backbone.name} trained other parameters (policy {source['policy']}: "
                          f"{len(theirs)} tensors) than this recipe trains (policy {recipe.policy.kind}: {len(ours)}, "
                          f"{len(ours - theirs)} not in the run's); use the run's policy, or drop the warm start")
    return state


def _trained_names(folder: Path) -> set[str] | None:
    """The names of the parameters the run trained (its checkpoint's best weights), if it has them."""
    from safetensors import safe_open

    best = folder / runs.CHECKPOINT / runs.BEST_WEIGHTS
    if not best.is_file():
        return None
    with safe_open(str(best), "pt") as f:
        return set(f.keys())


def restore_optimizer(optimizer: torch.optim.Optimizer, trained: nn.Module, run_dir: Path) -> int:
    """Load the per-parameter AdamW state of the run in ``run_dir`` (step, exp_avg, exp_avg_sq) into ``optimizer``, matched by
    parameter name; its param groups (learning rates, weight decay) stay this recipe's. Returns the number
    of tensors restored.

    The run's optimizer grouped its parameters by its own recipe (head_lr, no-decay rules): replaying that
    grouping over the same parameters gives each saved index its name.

    Raises:
        RecipeError: the saved state does not fit the parameters (count or shape).
    """
    from finetune.loop import make_optimizer

    state_file = run_dir / runs.CHECKPOINT / OPTIMIZER_FILE
    saved = torch.load(state_file, map_location="cpu", weights_only=True)
    names = {id(p): name for name, p in trained.named_parameters()}
    reference = make_optimizer(trained, RecipeConfig.from_yaml(run_dir / runs.RECIPE))
    sizes = [len(group["params"]) for group in reference.param_groups]
    if sizes != [len(group["params"]) for group in saved["param_groups"]]:
        raise RecipeError(f"backbone.warm_optimizer: the optimizer state in {state_file} groups "
                          f"{[len(g['params']) for g in saved['param_groups']]} parameters, this recipe's trainable "
                          f"ones group as {sizes}; drop the warm start")
    order = [names[id(p)] for group in reference.param_groups for p in group["params"]]
    indices = [index for group in saved["param_groups"] for index in group["params"]]
    by_name = {name: saved["state"][i] for name, i in zip(order, indices) if i in saved["state"]}
    del reference
    current = optimizer.state_dict()
    restored = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in zip((i for group in current["param_groups"] for i in group["params"]), params):
        entry = by_name.get(names[id(param)])
        if entry is None:  # never stepped in the run (no gradient reached it)
            continue
        if entry["exp_avg"].shape != param.shape:
            raise RecipeError(f"backbone.warm_optimizer: {names[id(param)]} has shape {tuple(param.shape)}, its "
                              f"state in {state_file} {tuple(entry['exp_avg'].shape)}; drop the warm start")
        restored[index] = entry
    current["state"] = restored
    optimizer.load_state_dict(current)
    return len(restored)
