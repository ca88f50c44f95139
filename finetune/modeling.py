"""Backbone + task head as a Hugging Face ``PreTrainedModel``.

This file is self-contained (torch + transformers only) because it is copied into
every run folder as ``modeling_finetune.py``: with it, plain transformers loads a run
with ``trust_remote_code=True``; after ``import finetune`` the classes are registered
with the Auto classes and no remote code is needed at all.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import (
    SequenceClassifierOutput,
    TokenClassifierOutput,
)


class FinetuneConfig(PretrainedConfig):
    model_type = "finetune"
    sub_configs: ClassVar[dict] = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config=None,
        task: str = "classification",
        pooling: str = "cls",
        head_type: str = "linear",
        head_hidden_size: int | None = None,
        head_dropout: float = 0.1,
        removed_heads: dict[str, list[int]] | None = None,
        thresholds: list[float] | None = None,
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
        # attention heads removed by structured pruning, per encoder layer (finetune.prune): the
        # layer's original head numbers, re-applied when the model is built so the saved weights fit
        self.removed_heads = {str(k): sorted(int(h) for h in v) for k, v in (removed_heads or {}).items()}
        # multi-label: a label applies when its sigmoid is above its threshold (tuned on validation or not)
        self.thresholds = thresholds
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


# --- structured pruning: where the encoder keeps its layers and heads -------------------------
# Lives here, not in finetune.prune, because a head-pruned model must be rebuilt smaller before
# its weights load, and this file has to stand alone in a run folder.


def encoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The encoder's list of layers: ``encoder.layer`` (BERT, RoBERTa, ELECTRA, ...),
    ``transformer.layer`` (DistilBERT), or else the module list with ``num_hidden_layers`` blocks.

    Raises:
        ValueError: the architecture keeps its layers elsewhere.
    """
    for owner in ("encoder", "transformer"):
        layers = getattr(getattr(backbone, owner, None), "layer", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    count = getattr(backbone.config, "num_hidden_layers", None)  # other layouts: the list of that many blocks
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"{type(backbone).__name__}: cannot find its {count} encoder layers (no encoder.layer or "
                     "transformer.layer list, as BERT-, RoBERTa- and DistilBERT-style encoders have)")


def attention_projections(layer: nn.Module) -> tuple[nn.Module, tuple[str, str, str], nn.Module, str]:
    """(self-attention module, names of its query/key/value linears, owner of the output
    projection, its name). The output projection reads the heads' outputs side by side.

    Raises:
        ValueError: an attention layout other than BERT's or DistilBERT's.
    """
    attention = getattr(layer, "attention", None)
    if hasattr(attention, "self") and hasattr(attention.self, "query"):  # BERT, RoBERTa, ELECTRA
        return attention.self, ("query", "key", "value"), attention.output, "dense"
    if hasattr(attention, "q_lin"):  # DistilBERT
        return attention, ("q_lin", "k_lin", "v_lin"), attention, "out_lin"
    raise ValueError(f"{type(layer).__name__}: unknown attention layout (expected BERT's attention.self.query "
                     "or DistilBERT's attention.q_lin)")


def head_count(layer: nn.Module) -> int:
    attention, (query, _, _), _, _ = attention_projections(layer)
    return getattr(attention, query).out_features // attention.attention_head_size


def _keep_features(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A smaller copy of ``linear`` keeping output rows (dim 0) or input columns (dim 1) ``index``."""
    weight = linear.weight.index_select(dim, index.to(linear.weight.device))
    smaller = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                        device=weight.device, dtype=weight.dtype)
    smaller.weight = nn.Parameter(weight.detach().clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias if dim == 1 else linear.bias.index_select(0, index.to(linear.bias.device))
        smaller.bias = nn.Parameter(bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return smaller


def remove_heads(backbone: nn.Module, heads_by_layer: dict[int, list[int]]) -> None:
    """Remove attention heads for real: slice query/key/value output rows and the output
    projection's input columns. Heads are numbered as the layer has them now. The attention
    forward infers the head count from the tensor shapes; the counts on the module are updated
    too, for readers.

    Raises:
        ValueError: a head that doesn't exist, or every head of a layer (a layer keeps at least one).
    """
    if not heads_by_layer:
        return
    layers = encoder_layers(backbone)
    for index, heads in heads_by_layer.items():
        attention, projections, owner, output = attention_projections(layers[index])
        size, count = attention.attention_head_size, head_count(layers[index])
        if any(h < 0 or h >= count for h in heads):
            raise ValueError(f"layer {index} has heads 0..{count - 1}, cannot remove {sorted(heads)}")
        kept = [h for h in range(count) if h not in set(heads)]
        if not kept:
            raise ValueError(f"layer {index}: removing all {count} heads would leave no attention; keep at least one")
        index_ = torch.cat([torch.arange(h * size, (h + 1) * size) for h in kept])
        for name in projections:
            setattr(attention, name, _keep_features(getattr(attention, name), index_, dim=0))
        setattr(owner, output, _keep_features(getattr(owner, output), index_, dim=1))
        for attr in ("num_attention_heads", "n_heads"):
            if hasattr(attention, attr):
                setattr(attention, attr, len(kept))
        if hasattr(attention, "all_head_size"):
            attention.all_head_size = len(kept) * size


class FinetunePreTrainedModel(PreTrainedModel):
    """Backbone (without its pooler) + ``classifier`` head; subclasses differ only in what the head reads."""

    config_class = FinetuneConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = []

    def __init__(self, config: FinetuneConfig):
        super().__init__(config)
        self.backbone = build_backbone(config.backbone_config)
        remove_heads(self.backbone, {int(layer): heads for layer, heads in config.removed_heads.items()})
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
    """Pooled backbone output -> head. The loss follows ``config.problem_type``, as transformers' own
    classifiers do: mean squared error (regression), binary cross-entropy per label
    (multi_label_classification, float multi-hot labels) or cross-entropy; unset, regression when
    ``num_labels == 1``."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        return self.classify(self.pooled(input_ids, attention_mask, token_type_ids), labels)

    def pooled(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """The sequence vector the head reads, (B, H): what a frozen backbone's feature cache stores."""
        return self.pool(self.encode(input_ids, attention_mask, token_type_ids), attention_mask)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.config.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return hidden[:, 0]

    def from_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels=None) -> SequenceClassifierOutput:
        """The head on the backbone's last hidden states (B, T, H) (the feature cache's upper-layers path)."""
        return self.classify(self.pool(hidden, attention_mask), labels)

    def classify(self, pooled: torch.Tensor, labels=None) -> SequenceClassifierOutput:
        logits = self.classifier(pooled)  # (B, num_labels)
        loss = None
        if labels is not None:
            kind = self.config.problem_type or ("regression" if self.config.num_labels == 1 else "single_label")
            if kind == "regression":
                loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
            elif kind == "multi_label_classification":  # mean over rows and labels
                loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())
            else:
                loss = nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class FinetuneForTokenClassification(FinetunePreTrainedModel):
    """Per-token head; labels of -100 (special tokens, non-first sub-words) are ignored."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        return self.from_hidden(self.encode(input_ids, attention_mask, token_type_ids), attention_mask, labels)

    def from_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels=None) -> TokenClassifierOutput:
        logits = self.classifier(hidden)  # (B, T, num_labels)
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


def register_auto_classes() -> None:
    """Let plain transformers/peft Auto classes load run folders without remote code (``import finetune``
    calls this; it is not run on import, since this file is also a run folder's remote code)."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    AutoConfig.register(FinetuneConfig.model_type, FinetuneConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(FinetuneConfig, FinetuneForSequenceClassification, exist_ok=True)
    AutoModelForTokenClassification.register(FinetuneConfig, FinetuneForTokenClassification, exist_ok=True)
