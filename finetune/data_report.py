"""What a run was trained and scored on: the per-split summary saved as ``data_report.json``
(rows read, dropped and used, labels, duplicates, token lengths and the share truncated), its log
lines and what ``metrics.json`` repeats of it."""

from __future__ import annotations

import logging

import datasets
import numpy as np
import pyarrow.compute as pc

from finetune.ingest import arrow_column, origin_of
from finetune.tasks import TASKS

log = logging.getLogger("finetune")


def data_report(recipe, raw: datasets.DatasetDict, tokenised: datasets.DatasetDict, tokenizer) -> dict:
    """Per split: source file, rows (read, dropped by policy, subsampled, used), label counts (or the
    target's range for regression), duplicate texts, texts also in the training split, token lengths
    (p50/p90/p99/max, before truncation) and the share of rows truncated at data.max_length."""
    cols, limit, task = recipe.data.columns, recipe.data.max_length, TASKS[recipe.task]
    texts, label = task.input_columns(cols), task.label_column(cols)
    report: dict = {"task": recipe.task, "max_length": limit, "splits": {}, "dropped": {}}
    train_keys: set = set()
    for split, ds in raw.items():
        origin = origin_of(ds)
        keys = list(zip(*[[tuple(v) if isinstance(v, list) else v for v in ds[c][:]] for c in texts]))
        entry = {"source": origin.source if origin and origin.is_file else None,
                 "rows_in_file": origin.rows_read if origin else len(ds),
                 "dropped": dict(origin.dropped) if origin else {},
                 "subsampled_from": origin.subsampled_from if origin else None,
                 "rows": len(ds), "duplicate_texts": len(keys) - len(set(keys))}
        if split == "train":
            train_keys = set(keys)
        else:
            entry["texts_also_in_train"] = sum(key in train_keys for key in keys)
        entry.update(task.label_summary(ds[label][:] if label in ds.column_names else [], recipe.data))
        if split in tokenised:
            entry["tokens"] = _lengths(ds, tokenised[split], tokenizer, texts, limit, task.words)
        for reason, count in entry["dropped"].items():
            report["dropped"][reason] = report["dropped"].get(reason, 0) + count
        report["splits"][split] = entry
    return report


SAMPLE = 5000  # at most this many rows at the limit are tokenised again to learn their true length


def _lengths(ds: datasets.Dataset, tokenised: datasets.Dataset, tokenizer, texts: list[str], limit: int,
             words: bool) -> dict:
    """Token lengths before truncation. Truncated rows have exactly ``limit`` tokens after it, so only rows
    at the limit are tokenised again, untruncated (a seeded sample of SAMPLE when there are more: then
    the truncated share is an estimate and the high percentiles a lower bound, ``exact: false``)."""
    lengths = pc.list_value_length(arrow_column(tokenised, "input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    at_limit = np.flatnonzero(lengths >= limit)
    exact = len(at_limit) <= SAMPLE
    sample = at_limit if exact else np.sort(np.random.default_rng(0).choice(at_limit, SAMPLE, replace=False))
    truncated = 0
    if len(sample):
        rows = ds.select(sample.tolist())
        inputs = [rows[c][:] for c in texts]
        encoded = tokenizer(*inputs[:2], is_split_into_words=words, truncation=False, verbose=False)
        true = np.array([len(ids) for ids in encoded["input_ids"]], dtype=np.int64)
        lengths[sample] = np.maximum(true, limit)
        truncated = int((true > limit).sum())
    share = truncated / max(len(sample), 1) * len(at_limit) / max(len(lengths), 1)
    p50, p90, p99 = (int(np.percentile(lengths, q, method="higher")) for q in (50, 90, 99))
    return {"p50": p50, "p90": p90, "p99": p99, "max": int(lengths.max(initial=0)),
            "truncated_rows": round(share * len(lengths)) if not exact else truncated,
            "truncated_share": round(share, 4), "exact": exact}


def log_report(report: dict) -> None:
    """A few log lines: one per split."""
    for split, entry in report["splits"].items():
        classes = entry.get("labels") or entry.get("tags")
        spread = (", ".join(f"{k} {v}" for k, v in list(classes.items())[:6]) + (" ..." if len(classes) > 6 else "")
                  if classes else "target {min:g}..{max:g}".format(**entry["target"]) if "target" in entry else "")
        tokens = entry.get("tokens")
        log.info("data %s: %d rows%s | %s | %d duplicate texts%s%s", split, entry["rows"],
                 f" ({sum(entry['dropped'].values())} dropped: {entry['dropped']})" if entry["dropped"] else "",
                 spread, entry["duplicate_texts"],
                 f", {entry['texts_also_in_train']} also in train" if entry.get("texts_also_in_train") else "",
                 f" | tokens p50 {tokens['p50']} p90 {tokens['p90']} p99 {tokens['p99']} max {tokens['max']}, "
                 f"{tokens['truncated_rows']} rows ({tokens['truncated_share']:.2%}) truncated at "
                 f"{report['max_length']}"
                 if tokens else "")


def metrics_summary(report: dict) -> dict:
    """What metrics.json records of the data: rows used and rows dropped, per split."""
    return {"rows": {split: entry["rows"] for split, entry in report["splits"].items()},
            "dropped": {split: entry["dropped"] for split, entry in report["splits"].items() if entry["dropped"]}}
