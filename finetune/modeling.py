"""Backbone + task head as a Hugging Face ``PreTrainedModel``.

This file is self-contained (torch + transformers only) because it is copied into
every run folder as ``modeling_finetune.py``: with it, plain transformers loads a run
with ``trust_remote_code=True``; after ``import finetune`` the classes are registered
with the Auto classes and no remote code is needed at all.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput, TokenClassifierOutput


class FinetuneConfig(PretrainedConfig):
    model_type = "finetune"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config=None,
        task: str = "classification",
        pooling: str = "cls",
        head_type: str = "linear",
        head_hidden_size: int | None = None,
        head_dropout: float = 0.1,
        **kwargs,
    ):
        if isinstance(backbone_config, dict):
            backbone_config = AutoConfig.for_model(**backbone_config)
        self.backbone_config = backbone_config
        self.task = task
        self.pooling = pooling
        self.head_type = head_type
        self.head_hidden_size = head_hidden_size
        self.head_dropout = head_dropout
        super().__init__(**kwargs)


class Head(nn.Module):
    """Dropout + linear, or dropout + linear + GELU + dropout + linear."""

    def __init__(self, in_features: int, out_features: int, kind: str, hidden: int | None, dropout: float):
        super().__init__()
        if kind == "linear":
            self.layers = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, out_features))
        else:
            hidden = hidden or in_features
            self.layers = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.GELU(),
                nn.Dropout(dropout), nn.Linear(hidden, out_features),
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def build_backbone(config: PretrainedConfig) -> nn.Module:
    try:  # BERT-like models: the pooler is unused by our heads, so don't build it
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(config)


class FinetunePreTrainedModel(PreTrainedModel):
    """Backbone (without its pooler) + ``classifier`` head; subclasses differ only in what the head reads."""

    config_class = FinetuneConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _no_split_modules = []

    def __init__(self, config: FinetuneConfig):
        super().__init__(config)
        self.backbone = build_backbone(config.backbone_config)
        self.classifier = Head(config.backbone_config.hidden_size, config.num_labels, config.head_type,
                               config.head_hidden_size, config.head_dropout)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and module in set(self.classifier.modules()):
            module.weight.data.normal_(0.0, 0.02)
            module.bias.data.zero_()

    def encode(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**inputs).last_hidden_state  # (B, T, H)
        return hidden.to(self.classifier.layers[-1].weight.dtype)  # a bf16/fp16 backbone feeds a float32 head


class FinetuneForSequenceClassification(FinetunePreTrainedModel):
    """Pooled backbone output -> head. Regression when ``num_labels == 1``."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        return self.classify(self.pooled(input_ids, attention_mask, token_type_ids), labels)

    def pooled(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """The sequence vector the head reads, (B, H): what a frozen backbone's feature cache stores."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        if self.config.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return hidden[:, 0]

    def classify(self, pooled: torch.Tensor, labels=None) -> SequenceClassifierOutput:
        logits = self.classifier(pooled)  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class FinetuneForTokenClassification(FinetunePreTrainedModel):
    """Per-token head; labels of -100 (special tokens, non-first sub-words) are ignored."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        logits = self.classifier(self.encode(input_ids, attention_mask, token_type_ids))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            # mean over labelled tokens; a batch without any (empty sentences) gives 0, not NaN
            total = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                reduction="sum")
            loss = total / (labels != -100).sum().clamp(min=1)
        return TokenClassifierOutput(loss=loss, logits=logits)


AUTO_MAP = {
    "AutoConfig": "modeling_finetune.FinetuneConfig",
    "AutoModelForSequenceClassification": "modeling_finetune.FinetuneForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_finetune.FinetuneForTokenClassification",
}
