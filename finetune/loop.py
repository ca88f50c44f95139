"""The training loop: one readable loop on Accelerate.

``Loop`` trains with periodic evaluation, keeps the best evaluation and checkpoints what a resumed run
needs; ``finetune.run`` builds its parts, opens the run folder around it and publishes the result. The
same code runs on one CPU process, under ``accelerate launch --multi_gpu --num_processes N`` (DDP; gloo
on CPU) and on GPUs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from finetune import runs
from finetune.config import RecipeConfig, RecipeError
from finetune.errors import RunFolderError, TrainingDiverged
from finetune.metrics import MetricSuite, greater_is_better
from finetune.policies import policy_of
from finetune.processes import (
    write_to_log_file,
)
from finetune.progress import bar
from finetune.runs import (
    atomic_write_text,
    kept,
    replace_dir,
    train_command,
)
from finetune.tasks import TASKS
from finetune.weights import save_trainable

log = logging.getLogger("finetune")



@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs; saved next to the Accelerate state."""
    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_value: float | None = None
    best_step: int = 0
    evals_without_improvement: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    samples_seen: int = 0
    tokens_processed: int = 0
    """Token positions the model computed on, padding included."""
    tokens_real: int = 0
    """Of those, real (non-padding) tokens."""
    num_processes: int = 1


# --- building blocks ------------------------------------------------------------------


LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")  # encoder.layer.3. (BERT), h.3. (GPT-2)
EMBEDDINGS = ("embeddings.", "embed_tokens", ".wte.", ".wpe.")


def make_optimizer(model, recipe: RecipeConfig) -> torch.optim.Optimizer:
    cfg = recipe.train
    undecayed = policy_of(recipe).no_decay  # e.g. IA3's scales: they start at 1, decay would pull them to 0
    # [body, body without decay] (biases and norms take none), then the same two for the head with train.head_lr
    settings = [(cfg.lr, cfg.weight_decay), (cfg.lr, 0.0)]
    if cfg.head_lr is not None:
        settings += [(cfg.head_lr, cfg.weight_decay), (cfg.head_lr, 0.0)]
    groups: list[list[torch.nn.Parameter]] = [[] for _ in settings]
    if cfg.layer_lr_decay is not None:
        settings, groups = _groups_by_depth(model, cfg, undecayed)
    else:
        for name, param in model.named_parameters():
            if param.requires_grad:
                no_decay = param.ndim < 2 or any(part in name for part in undecayed)
                head = cfg.head_lr is not None and "classifier." in name  # our head module (peft's trained copy too)
                groups[2 * head + no_decay].append(param)
    # The fused kernel does the whole update in one pass (measured ~3.5x faster than the default on CPU);
    # it needs floating-point parameters on CPU or CUDA.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for ps in groups for p in ps)
    return torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for ps, (lr, wd) in zip(groups, settings)],
                             lr=cfg.lr, fused=fused or None)


def layer_depths_check(model, recipe: RecipeConfig) -> None:
    """Raises RecipeError when train.layer_lr_decay cannot tell the backbone's layers apart."""
    _groups_by_depth(model, recipe.train, ())


def _groups_by_depth(model, cfg, undecayed) -> tuple[list[tuple[float, float]], list[list[torch.nn.Parameter]]]:
    """train.layer_lr_decay: one (lr, weight decay) group per depth. Depth 0 is the embeddings, layer i is i + 1,
    the head and what sits above the layers (a pooler, a final norm) are layers + 1 and train at the full rate."""
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    found = [int(m.group(1)) for name, _ in named if (m := LAYER_INDEX.search(name))]
    if not found:
        raise RecipeError("train.layer_lr_decay: no numbered encoder layers (…layer.N. / layers.N. / h.N.) among "
                          "the trainable parameters' names; this backbone needs one learning rate (drop the key)")
    top = max(found) + 1  # depth of the highest layer; the head is top + 1

    def depth(name: str) -> int:
        if "classifier." in name:
            return top + 1
        if match := LAYER_INDEX.search(name):
            return int(match.group(1)) + 1
        return 0 if any(part in name for part in EMBEDDINGS) else top + 1

    keyed: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in named:
        no_decay = param.ndim < 2 or any(part in name for part in undecayed)
        head = "classifier." in name
        lr = cfg.head_lr if head and cfg.head_lr is not None else cfg.lr * cfg.layer_lr_decay ** (top + 1 - depth(name))
        keyed.setdefault((lr, 0.0 if no_decay else cfg.weight_decay), []).append(param)
    return list(keyed), list(keyed.values())


# --- evaluation --------------------------------------------------------------------


@torch.no_grad()
def gathered_outputs(model, loader, accelerator: Accelerator, recipe: RecipeConfig, desc: str) -> tuple[list, list]:
    """Logits and labels of every batch of a split, gathered across processes without duplicates (on CPU)."""
    task = TASKS[recipe.task]
    model.eval()
    all_logits, all_labels = [], []
    for batch in bar(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        logits, batch_labels = task.gather(accelerator, logits, batch["labels"])
        all_logits.append(logits.float().cpu())
        all_labels.append(batch_labels.cpu())
    train_mode(model, recipe)
    return all_logits, all_labels


def evaluate(model, loader, accelerator: Accelerator, recipe: RecipeConfig, metrics: MetricSuite, labels, desc: str) -> dict:
    """Loss and metrics over a whole split, gathered across processes without duplicates. Multi-label
    predictions use the model's ``config.thresholds`` (a model trained on cached features has none at
    hand: ``eval.threshold`` then, which is what a run's model holds until thresholds are tuned)."""
    task = TASKS[recipe.task]
    thresholds = task.thresholds(getattr(accelerator.unwrap_model(model), "config", None), recipe, labels)
    loss, predictions, references = task.evaluate(*gathered_outputs(model, loader, accelerator, recipe, desc), labels,
                                                  thresholds)
    return {"loss": loss, **metrics.compute(predictions=predictions, references=references)}


class Loop:
    """The loop over a run's prepared parts (``finetune.run.Run`` builds them): train, validate,
    checkpoint, resume."""

    distillation = None
    """``finetune.distill.student.Distillation`` when the recipe has a teacher: the loss mixes its targets in."""
    soup_pool = None
    """``finetune.soup.SoupPool`` with train.soup: the weights of the best evaluations so far."""
    objective = None
    """``finetune.objective.Objective`` when the recipe smooths labels or weighs classes."""
    deadline: float | None = None
    """A ``time.monotonic()`` moment at which training stops (a budgeted sweep); see ``_out_of_time``."""
    stopped_at: int | None = None
    """The optimizer step at which the deadline stopped training (None: it ran its schedule)."""

    def _restore(self) -> None:
        try:
            self.accelerator.load_state(str(self.last_dir))
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:  # torch.load on a damaged file
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            raise RunFolderError(f"--resume: the checkpoint in {self.last_dir} can't be read ({reason}); start "
                                 f"again with {train_command(self.run_dir, '--overwrite')}") from None
        self.state = TrainState(**json.loads((self.last_dir / "train_state.json").read_text()))
        if self.state.num_processes != self.accelerator.num_processes:
            raise RecipeError(f"--resume: the run was trained on {self.state.num_processes} process(es), not "
                              f"{self.accelerator.num_processes}; resume it with the same number")
        records = self.run_dir / runs.HISTORY
        lines = records.read_text().splitlines() if records.exists() else []
        # evaluations written after the checkpoint will be run again
        self.history = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= self.state.global_step]
        if self.accelerator.is_main_process:
            atomic_write_text(records, "".join(json.dumps(r) + "\n" for r in self.history))
        if self.soup_pool is not None:
            self.soup_pool.restore(self.history, self.recipe.eval.primary, self.accelerator.is_main_process)
        log.info("resumed at step %d (epoch %d)", self.state.global_step, self.state.epoch)

    # --- the loop -------------------------------------------------------------------------

    def train(self) -> None:
        accelerator, cfg, state, model = self.accelerator, self.recipe.train, self.state, self.model
        train_mode(model, self.recipe)
        progress = bar(total=self.total_steps, initial=state.global_step, desc="training", leave=not self.quiet,
                        disable=not accelerator.is_local_main_process)
        started = time.perf_counter() - state.train_seconds - self._seconds_not_training()
        running_loss, losses_in_window, stop = torch.zeros((), device=accelerator.device), 0, False
        evaluated_at = self.history[-1]["step"] if self.history else -1
        while state.global_step < self.total_steps and not stop:
            loader = self.train_loader
            if state.batches_in_epoch:  # resuming mid-epoch
                loader = accelerator.skip_first_batches(loader, state.batches_in_epoch)
            loader.set_epoch(state.epoch)  # Accelerate's own epoch counter ...
            self.sampler.set_epoch(state.epoch)  # ... which a skipping DDP loader doesn't pass on to our sampler
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = self.training_loss(model, batch)
                    self._stop_if_diverged(loss)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                state.batches_in_epoch += 1
                state.samples_seen += batch["labels"].shape[0] * accelerator.num_processes
                if "input_ids" in batch:  # cached features have no tokens
                    state.tokens_processed += batch["input_ids"].numel() * accelerator.num_processes
                    self.real_tokens += batch["attention_mask"].sum()  # a tensor: no host sync per step
                running_loss += loss.detach()
                losses_in_window += 1
                if not accelerator.sync_gradients:
                    continue
                self.scheduler.step()
                state.global_step += 1
                progress.update(1)
                if state.global_step % cfg.log_every == 0:
                    mean_loss = (running_loss / losses_in_window).item()  # host sync only when logging
                    running_loss.zero_()
                    losses_in_window = 0
                    lr = self.scheduler.get_last_lr()[0]
                    progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                    accelerator.log({"train/loss": mean_loss, "train/lr": lr}, step=state.global_step)
                state.train_seconds = time.perf_counter() - started - self._seconds_not_training()
                if isinstance(cfg.eval_every, int) and state.global_step % cfg.eval_every == 0:
                    evaluated_at, stop = state.global_step, self.validate()
                elif cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if not stop and self.deadline is not None and self._out_of_time():
                    stop, self.stopped_at = True, state.global_step
                    log.info("the deadline is near: training stops at step %d of %d (the best evaluation so far, "
                             "or the final weights' validation, is the model)", state.global_step, self.total_steps)
                if stop or state.global_step >= self.total_steps:
                    break
            else:  # the epoch ran to its end
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                if cfg.eval_every == "epoch" and evaluated_at != state.global_step:
                    evaluated_at, stop = state.global_step, self.validate()
        progress.close()
        state.train_seconds = time.perf_counter() - started - self._seconds_not_training()
        if evaluated_at != state.global_step:  # the final weights always get a say in model selection
            self.validate()

    def training_loss(self, model, batch: dict) -> torch.Tensor:
        if self.distillation is not None:
            return self.distillation.loss(model, batch)
        return model(**batch).loss if self.objective is None else self.objective.loss(model, batch)

    def _out_of_time(self) -> bool:
        """Whether the deadline is near: a validation of the final weights (timed by the earlier ones) would
        end past it. All processes stop at the same step."""
        evaluations = len(self.history)
        reserve = 1.2 * self.state.eval_seconds / evaluations if evaluations else 0.0
        late = torch.tensor(float(time.monotonic() + reserve >= self.deadline), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            late = self.accelerator.reduce(late, reduction="sum")
        return bool(late.item() > 0)

    def _seconds_not_training(self) -> float:
        return self.state.eval_seconds + self.state.checkpoint_seconds

    def _stop_if_diverged(self, loss: torch.Tensor) -> None:
        # One host sync per step (cheap on CPU) buys a stop at the exact step that diverged.
        finite = torch.isfinite(loss.detach()).float()
        if self.accelerator.num_processes > 1:  # all processes must stop together
            finite = self.accelerator.reduce(finite, reduction="mean")
        if finite.item() < 1:
            lower = f"train.lr={self.recipe.train.lr / 10:g}"
            retry = train_command(self.run_dir, *(["--overwrite"] if self.last_dir.is_dir() else []), lower)
            targets = "" if TASKS[self.recipe.task].classes else " (or look for NaN/inf targets in the data)"
            message = (f"loss is {loss.item()} at step {self.state.global_step + 1}: training stopped; kept: "
                       f"{kept(self.run_dir)}; retry with a lower learning rate{targets}"
                       f"{' (this replaces the run and its checkpoint)' if self.last_dir.is_dir() else ''}: {retry}")
            if self.accelerator.is_main_process:
                write_to_log_file(message)
            raise TrainingDiverged(message)

    def validate(self) -> bool:
        """Evaluate on validation, keep the best, checkpoint; True when early stopping says stop."""
        accelerator, state, recipe = self.accelerator, self.state, self.recipe
        started = time.perf_counter()
        result = evaluate(self.model, self.eval_loaders["validation"], accelerator, recipe, self.metrics, self.labels,
                          "evaluating")
        record = {"step": state.global_step, "epoch": round(state.global_step / self.steps_per_epoch, 3),
                  "train_seconds": round(state.train_seconds, 2), **result}  # for learning curves over time
        self.history.append(record)
        greater = greater_is_better(recipe.eval.primary)
        value = result[recipe.eval.primary]
        better = state.best_value is None or math.isnan(state.best_value) or (
            value > state.best_value if greater else value < state.best_value)
        # NaN (e.g. a correlation of constant predictions) only counts until a real number comes along
        if better and (not math.isnan(value) or state.best_value is None):
            state.best_value, state.best_step, state.evals_without_improvement = value, state.global_step, 0
            self.best_changed = True
        else:
            state.evals_without_improvement += 1
        if self.soup_pool is not None:  # before the checkpoint that records this evaluation
            self.soup_pool.offer(state.global_step, value, accelerator.unwrap_model(self.model),
                                 accelerator.is_main_process)
        if accelerator.is_main_process:
            with open(self.run_dir / runs.HISTORY, "a") as f:
                f.write(json.dumps(record) + "\n")
        accelerator.log({f"validation/{k}": v for k, v in result.items()}, step=state.global_step)
        log.info("step %d validation: %s", state.global_step, "  ".join(f"{k} {v:.4f}" for k, v in result.items()))
        state.eval_seconds += time.perf_counter() - started
        self.save_checkpoint()
        if self.on_validation is not None:  # a sweep's pruner may compare trials at equal shares of their budgets
            self.on_validation({**record, "budget_fraction": state.global_step / self.total_steps})
        patience = recipe.train.early_stopping_patience
        return patience is not None and state.evals_without_improvement >= patience

    def _count_real_tokens(self) -> None:
        self.state.tokens_real += int(self.real_tokens.item()) * self.accelerator.num_processes
        self.real_tokens.zero_()

    def save_checkpoint(self) -> None:
        """Resumable state (model, optimizer, scheduler, RNG, step) and the best weights so far,
        written aside and moved into place together."""
        started = time.perf_counter()
        self._count_real_tokens()
        accelerator, tmp = self.accelerator, self.last_dir.with_name(".last.tmp")
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)  # left by a crash
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every rank has written its RNG state before the move
        if accelerator.is_main_process:
            if self.best_changed:
                save_trainable(accelerator.unwrap_model(self.model), tmp / runs.BEST_WEIGHTS)
            elif self.best_path.exists():  # unchanged: share the file rather than copy it
                try:
                    os.link(self.best_path, tmp / runs.BEST_WEIGHTS)
                except OSError:
                    shutil.copyfile(self.best_path, tmp / runs.BEST_WEIGHTS)
            self.best_changed = False
        self.state.checkpoint_seconds += time.perf_counter() - started  # before it is saved with the state
        if accelerator.is_main_process:
            (tmp / "train_state.json").write_text(json.dumps(self.state.__dict__))
            replace_dir(tmp, self.last_dir)
        accelerator.wait_for_everyone()

    def end_trackers(self) -> None:
        """Close the trackers. Unlike ``Accelerator.end_training`` this keeps the process group, which
        later runs in the same processes (a sweep's trials) still need; see ``end_processes``."""
        for tracker in self.accelerator.trackers:
            tracker.finish()


def train_mode(model: torch.nn.Module, recipe: RecipeConfig) -> None:
    """Training mode. Under policies with ``frozen_eval`` (head_only, freeze), frozen parts (parameters,
    none trainable) run in eval mode: a frozen backbone or frozen lower layers are fixed feature extractors
    (no dropout), as the feature cache assumes. Adapters and BitFit keep the usual dropout everywhere."""
    model.train()
    if not policy_of(recipe).frozen_eval:
        return
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
