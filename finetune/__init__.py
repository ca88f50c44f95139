"""finetune: fine-tune pretrained Hugging Face backbones from typed recipes, on Accelerate.

    from finetune import Recipe
    result = Recipe.from_yaml("recipes/sst2_minilm_lora.yaml", overrides=["train.lr=3e-4"]).run()
"""

from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from finetune.config import Recipe, RecipeError
from finetune.modeling import (
    FinetuneConfig,
    FinetuneForSequenceClassification,
    FinetuneForTokenClassification,
)

# Registering the architecture lets plain transformers/peft load run folders after `import finetune`.
AutoConfig.register(FinetuneConfig.model_type, FinetuneConfig, exist_ok=True)
AutoModelForSequenceClassification.register(FinetuneConfig, FinetuneForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(FinetuneConfig, FinetuneForTokenClassification, exist_ok=True)

__all__ = ["Recipe", "RecipeError", "RunResult"]


def __getattr__(name):
    if name == "RunResult":
        from finetune.runs import RunResult

        return RunResult
    raise AttributeError(name)
