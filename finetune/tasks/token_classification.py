"""Token classification: a list of words in, one tag per word out (e.g. NER). Only each word's first
sub-word is labelled; the others and special tokens carry -100 and are ignored by loss and metrics."""

from __future__ import annotations

import datasets
import torch
from torch.nn import functional as F
from transformers import DataCollatorForTokenClassification

from finetune import ingest
from finetune.config import RecipeError
from finetune.ingest import label_text
from finetune.modeling import FinetuneForTokenClassification
from finetune.tasks.base import Task, class_label_names, require_columns


class TokenClassification(Task):
    name = "token_classification"
    words = True
    model_class = FinetuneForTokenClassification
    auto_class_name = "AutoModelForTokenClassification"
    pipeline_task = "token-classification"
    peft_task_type = "TOKEN_CLS"
    ensembles = False

    def input_columns(self, cols) -> list[str]:
        return [cols.tokens]

    def label_column(self, cols) -> str:
        return cols.tags

    def label_names(self, recipe, raw: datasets.DatasetDict) -> list[str]:
        """Tokens must be lists of words with one tag per word; the tags are then checked as classes."""
        cols = recipe.data.columns
        require_columns(raw, [cols.tags, cols.tokens])
        for split, ds in raw.items():
            ingest.require_lists(ds, split, cols.tokens, "a list of words")
            ingest.check_tags(ds, split, cols.tokens, cols.tags)
        return class_label_names(recipe, raw, cols.tags, per_word=True)

    def encode(self, batch: dict, tokenizer, cfg, label_id: dict[str, int] | None) -> dict:
        if not tokenizer.is_fast:
            raise RecipeError("token_classification needs a fast tokenizer (word_ids) for label alignment")
        cols = cfg.columns
        enc = tokenizer(batch[cols.tokens], is_split_into_words=True, truncation=True, max_length=cfg.max_length)
        enc["labels"] = []
        for i, tags in enumerate(batch[cols.tags]):
            previous, aligned = None, []
            for word in enc.word_ids(i):  # label the first sub-word of each word only
                aligned.append(-100 if word is None or word == previous else label_id[label_text(tags[word])])
                previous = word
            enc["labels"].append(aligned)
        return enc

    def collator(self, tokenizer, multiple_of: int | None):
        return DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=multiple_of)

    def label_summary(self, values: list, cfg) -> dict:
        return {"tags": super().label_summary([t for seq in values for t in seq], cfg)["labels"]}

    def gather(self, accelerator, logits, labels):
        # sequence lengths differ between processes: pad to the longest before gathering
        logits = accelerator.pad_across_processes(logits, dim=1, pad_index=0)
        labels = accelerator.pad_across_processes(labels, dim=1, pad_index=-100)
        return accelerator.gather_for_metrics((logits, labels))

    def evaluate(self, logits, gold, labels, thresholds=None) -> tuple[float, list, list]:
        width = max(t.shape[1] for t in logits)
        logits = torch.cat([F.pad(t, (0, 0, 0, width - t.shape[1])) for t in logits])
        gold = torch.cat([F.pad(t, (0, width - t.shape[1]), value=-100) for t in gold])
        # as the model does: mean over labelled tokens, 0 (not NaN) when there are none
        loss = F.cross_entropy(logits.flatten(0, 1), gold.flatten(), ignore_index=-100, reduction="sum")
        loss = loss / (gold != -100).sum().clamp(min=1)
        predicted, keep = logits.argmax(-1), gold != -100
        predictions = [[labels[i] for i in row[mask].tolist()] for row, mask in zip(predicted, keep)]
        references = [[labels[i] for i in row[mask].tolist()] for row, mask in zip(gold, keep)]
        return loss.item(), predictions, references

    def predict(self, logits, enc, inputs, labels, thresholds=None) -> list[dict]:
        """One tag per word (read at its first sub-word); words cut off by max_length get none."""
        results = []
        for i, words in enumerate(inputs):
            tags, previous = [], None
            for position, word in enumerate(enc.word_ids(i)):
                if word is not None and word != previous:
                    tags.append(labels[int(logits[i, position].argmax())])
                previous = word
            results.append({"tokens": words[:len(tags)], "tags": tags})
        return results


TASK = TokenClassification()
