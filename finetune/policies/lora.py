"""LoRA via peft: low-rank adapters on chosen backbone modules; the task head trains in full.

The head (``classifier``) is listed in ``modules_to_save`` explicitly, so it is trainable
and saved with the adapter. Our heads read the encoder output directly (no pooler), so
there is no pooler to unfreeze.
"""

from torch import nn

from finetune.policies.adapters import HEAD, peft_task_type, target_modules
from finetune.policies.policy import Policy


def build(model: nn.Module, recipe, use_dora: bool = False) -> nn.Module:
    """The peft model with LoRA (or, with ``use_dora``, DoRA) adapters; both read ``policy.lora``."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    cfg = recipe.policy.lora
    targets = target_modules(model, cfg.target_modules, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
                             "policy.lora.target_modules")
    peft_config = LoraConfig(task_type=peft_task_type(recipe), r=cfg.rank, lora_alpha=cfg.alpha,
                             lora_dropout=cfg.dropout, target_modules=targets, modules_to_save=list(HEAD),
                             use_dora=use_dora)
    return get_peft_model(model, peft_config)


def apply(model: nn.Module, recipe) -> nn.Module:
    return build(model, recipe)


def describe(recipe) -> str:
    return f"rank {recipe.policy.lora.rank}, alpha {recipe.policy.lora.alpha}"


POLICY = Policy("lora", apply, adapter=True, lr=1e-3, describe=describe)
