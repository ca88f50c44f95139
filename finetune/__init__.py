"""finetune: fine-tune pretrained Hugging Face backbones from typed recipes, on Accelerate.

    from finetune import Recipe
    result = Recipe.from_yaml("recipes/sst2_minilm_lora.yaml", overrides=["train.lr=3e-4"]).run()
"""

from finetune.config import RecipeError
from finetune.errors import hide_unactionable_warnings
from finetune.modeling import register_auto_classes
from finetune.recipe import Recipe
from finetune.runs import RunResult

# Registering the architecture lets plain transformers/peft load run folders after `import finetune`.
register_auto_classes()
hide_unactionable_warnings()  # for Python users as for the commands

__all__ = ["Recipe", "RecipeError", "RunResult"]
