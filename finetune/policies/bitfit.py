"""BitFit (Ben Zaken et al. 2022): only the bias terms train, every one of them (attention, feed-forward
and LayerNorm biases; LayerNorm gains stay frozen), and the task head in full. No peft: the run is saved
as a whole model, like kind=full. Biases are 1-D, so they train without weight decay.

The embeddings' LayerNorm bias trains, so no frozen part's output is fixed: no feature cache, and
dropout stays on everywhere.
"""

from torch import nn

from finetune.policies.policy import Policy


def apply(model: nn.Module, recipe) -> nn.Module:
    model.requires_grad_(False)
    for name, param in model.backbone.named_parameters():
        if name.endswith(".bias") or name == "bias":
            param.requires_grad_(True)
    model.classifier.requires_grad_(True)
    return model


POLICY = Policy("bitfit", apply, lr=1e-3, describe=lambda recipe: "biases + head")
