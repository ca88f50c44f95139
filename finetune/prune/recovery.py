"""The recovery fine-tune after pruning: a short loop over the run's training data."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from finetune import data as data_lib
from finetune.config import PruneConfig
from finetune.prune.measure import Bench

log = logging.getLogger("finetune")


# --- recovery fine-tune -----------------------------------------------------------------------


def recover(model: nn.Module, bench: Bench, cfg: PruneConfig) -> dict[str, Any]:
    """Fine-tune every remaining weight for ``cfg.finetune_epochs`` with the run's training settings
    (batch size, schedule, warm-up, clipping; ``finetune_lr`` or train.lr). The final weights are kept."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from finetune.loop import make_optimizer

    recipe, accelerator = bench.recipe, bench.accelerator
    lr = cfg.finetune_lr or recipe.train.lr
    loader = data_lib.make_train_loader(recipe, bench.tokenised["train"], bench.collator)
    sampler = loader.sampler
    total = max(1, math.ceil(cfg.finetune_epochs * math.ceil(len(loader) / recipe.train.gradient_accumulation_steps)))
    for param in model.parameters():
        param.requires_grad_(True)
    set_seed(recipe.train.seed)
    optimizer = make_optimizer(model, recipe.with_overrides([f"train.lr={lr}"]))
    scheduler = get_scheduler({"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[
        recipe.train.scheduler], optimizer, num_warmup_steps=int(recipe.train.warmup_ratio * total),
        num_training_steps=total)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    progress = tqdm(total=total, desc="recovery fine-tune", leave=False)
    step, epoch, started = 0, 0, time.perf_counter()
    while step < total:
        loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and recipe.train.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), recipe.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                scheduler.step()
                step += 1
                progress.update(1)
                if step % recipe.train.log_every == 0:
                    progress.set_postfix(loss=f"{loss.item():.4f}")
                if step >= total:
                    break
        epoch += 1
    progress.close()
    seconds = time.perf_counter() - started
    log.info("recovery fine-tune: %d steps, lr %.2e, %.1f s, last loss %.4f", step, lr, seconds, loss.item())
    return {"epochs": cfg.finetune_epochs, "lr": lr, "steps": step, "seconds": round(seconds, 1)}


