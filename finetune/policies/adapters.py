"""What the peft policies (LoRA, DoRA, IA3) share: module names to adapt, the peft task type, and the
way back to one plain model.

peft is imported inside the functions: the registry is read by modules (features, publish, compare)
that should not pay for importing peft until an adapter is really built or merged.
"""

from __future__ import annotations

from torch import nn

from finetune.config import RecipeConfig, RecipeError

# the head trains in full and is saved with the adapter (peft keeps the original and trains a copy);
# a tuple, handed to peft as a new list each time: peft appends its own head names to the list it is given
HEAD = ("classifier",)


def linear_names(model: nn.Module) -> list[str]:
    """The dotted names of the backbone's linear modules."""
    return [name for name, module in model.backbone.named_modules() if isinstance(module, nn.Linear)]


def matches(name: str, wanted: str) -> bool:
    """peft's rule for a list entry: the module's whole name, or a dotted suffix of it."""
    return name == wanted or name.endswith(f".{wanted}")


def target_modules(model: nn.Module, wanted: list[str] | None, defaults: dict[str, list[str]], key: str) -> list[str]:
    """``wanted``, or the default for the backbone's architecture; each must name a linear module.

    Our model's own ``model_type`` is ``finetune``, which peft knows nothing of: the defaults are looked
    up by the backbone's.

    Raises:
        RecipeError: no default for the architecture, or a name matching no linear module (named by ``key``).
    """
    model_type = model.backbone.config.model_type
    if wanted is None:
        wanted = defaults.get(model_type)
        if wanted is None:
            raise RecipeError(f"{key}: no default for model type '{model_type}'; list the modules to adapt")
    names = linear_names(model)
    missing = [m for m in wanted if not any(matches(name, m) for name in names)]
    if missing:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise RecipeError(f"{key}: the backbone has no linear module named {missing[0]!r}; "
                          f"its linear modules are {leaves}")
    return list(wanted)


def peft_task_type(recipe: RecipeConfig) -> str:
    from finetune.tasks import TASKS  # the task owns it (SEQ_CLS, TOKEN_CLS)

    return TASKS[recipe.task].peft_task_type


def plain(model: nn.Module) -> tuple[nn.Module, bool]:
    """(model, merged): an adapter model merged into its base, in place like peft's ``merge_and_unload``
    (deep-copy first to keep the adapter); any other model as it is, with merged False.

    Each ``ModulesToSaveWrapper`` is first replaced by its trained copy: peft's generic unload (IA3's)
    copies ``child.weight`` onto the wrapper's stand-in, and our ``Head`` (a ``Sequential``) has none.
    LoRA and DoRA do the same swap themselves, so for them this changes nothing.
    """
    from peft import PeftModel
    from peft.utils import ModulesToSaveWrapper

    if not isinstance(model, PeftModel):
        return model, False
    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    for name, wrapper in wrapped:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrapper.modules_to_save[wrapper.active_adapters[0]])
    return model.merge_and_unload(), True
