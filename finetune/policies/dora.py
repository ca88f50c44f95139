"""DoRA via peft (``LoraConfig(use_dora=True)``): LoRA's low-rank update to each adapted weight's
direction, plus a trained magnitude per output (``lora_magnitude_vector``, initialised from the
pretrained weight's norms when the policy is applied). Reads the ``policy.lora`` settings.

Each forward pass recomputes the adapted weights' norms, and with ``lora_dropout > 0`` one more base
matrix product per adapted layer: slower to train than LoRA. ``output.merge_lora`` (``--merge``)
writes the merged plain model, which costs nothing extra at inference.
"""

from torch import nn

from finetune.policies import lora
from finetune.policies.policy import Policy


def apply(model: nn.Module, recipe) -> nn.Module:
    return lora.build(model, recipe, use_dora=True)


# The magnitude vectors are 1-D, so they already train without weight decay. transformers' adapter loader
# (pipeline(model=RUN), AutoModel...from_pretrained(RUN); transformers 5.24, peft 0.21) renames the saved
# `lora_magnitude_vector` key without peft's `.weight` suffix and leaves the magnitudes at their initial
# values; peft's PeftModel.from_pretrained (finetune predict, load_run) restores them exactly.
POLICY = Policy("dora", apply, adapter=True, lr=1e-3, describe=lora.describe, transformers_loads=False)
