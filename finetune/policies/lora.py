"""LoRA via peft: low-rank adapters on chosen backbone modules; the task head trains in full.

The head (``classifier``) is listed in ``modules_to_save`` explicitly, so it is trainable
and saved with the adapter. Our heads read the encoder output directly (no pooler), so
there is no pooler to unfreeze.
"""

from peft import LoraConfig, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from finetune.config import RecipeError


def target_modules(model: nn.Module, recipe) -> list[str]:
    wanted = recipe.policy.lora.target_modules
    model_type = model.backbone.config.model_type
    if wanted is None:
        wanted = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if wanted is None:
            raise RecipeError(f"policy.lora.target_modules: no default for model type '{model_type}'; list the modules to adapt")
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.backbone.named_modules() if isinstance(module, nn.Linear)}
    missing = [m for m in wanted if m not in leaves]
    if missing:
        raise RecipeError(
            f"policy.lora.target_modules: the backbone has no linear module named {missing[0]!r}; "
            f"its linear modules are {sorted(leaves)}"
        )
    return list(wanted)


def apply(model: nn.Module, recipe):
    cfg = recipe.policy.lora
    peft_config = LoraConfig(
        task_type="TOKEN_CLS" if recipe.task == "token_classification" else "SEQ_CLS",
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=target_modules(model, recipe), modules_to_save=["classifier"],
    )
    return get_peft_model(model, peft_config)
