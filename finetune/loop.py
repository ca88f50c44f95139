"""The training loop: one readable loop on Accelerate.

``run_recipe`` reads as the story of a run: build everything (bad input fails before anything
is written), open the run folder, train with periodic evaluation, then restore the best
evaluation, test it and export it. The same code runs on one CPU process, under
``accelerate launch --multi_gpu --num_processes N`` (DDP; gloo on CPU) and on GPUs.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import pickle
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_scheduler

from finetune import data as data_lib
from finetune import data_report as data_report_lib
from finetune import features as features_lib
from finetune.backbones import build_model, default_pooling, resolve_backbone
from finetune.config import Recipe, RecipeError
from finetune.errors import Interrupted, RunFolderError, TrainingDiverged
from finetune.metrics import BINARY_ONLY, MetricSuite, greater_is_better
from finetune.policies import apply_policy, count_parameters
from finetune.processes import (
    default_run_dir,
    log_to_file,
    multi_process_without_accelerator,
    on_main_process,
    set_trackers,
    setup_logging,
    write_to_log_file,
)
from finetune.publish import export_model, save_base, split_rows, write_model_card
from finetune.reuse import reuse
from finetune.runs import (
    DATA_FINGERPRINT,
    RunResult,
    atomic_write_text,
    check_checkpoint_files,
    check_same_data,
    check_same_recipe,
    checkpoint_step,
    data_fingerprint,
    folder_errors,
    kept,
    load_trainable,
    open_run_dir,
    replace_dir,
    save_trainable,
    train_command,
)

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


def run_recipe(recipe: Recipe, resume: bool = False, overwrite: bool | None = None) -> RunResult:
    """Train a recipe end to end; see ``Recipe.run``.

    ``overwrite=None`` takes ``output.overwrite`` from the recipe, except when resuming.

    Raises:
        RecipeError: invalid data, labels, backbone, policy or run folder (before anything is written).
        RunFolderError: the run folder is locked, holds files finetune did not write, can't be written or
            resumed (changed data, damaged checkpoint).
        TrainingDiverged: the loss became NaN/inf (the last good checkpoint is kept).
        Interrupted: Ctrl-C (what was kept and the command to go on are in the message).
    """
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: --resume continues the run in "
                             "output.dir, --overwrite replaces it; pass one of them")
    run = Run(recipe)
    try:
        with folder_errors(run.run_dir):
            run.open_folder(resume=resume, overwrite=bool(not resume and recipe.output.overwrite
                                                          if overwrite is None else overwrite))
            run.train()
            result = run.finish()
            return after_training(result, recipe)
    except KeyboardInterrupt:
        raise run.interrupted() from None
    finally:
        run.close()


def after_training(result: RunResult, recipe: Recipe) -> RunResult:
    """What a recipe asks for once its best model is saved: pruning (the pruned model's run folder
    and metrics become the result; see finetune.prune)."""
    if recipe.prune.method == "none":
        return result
    from finetune.prune import prune_after_training

    return prune_after_training(result, recipe)


# --- building blocks ------------------------------------------------------------------


def make_optimizer(model, recipe: Recipe) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)  # biases and norms take no decay
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel does the whole update in one pass (measured ~3.5x faster than the default on CPU);
    # it needs floating-point parameters on CPU or CUDA.
    params = decay + no_decay
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=recipe.train.lr, fused=fused or None)


# --- evaluation --------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, recipe: Recipe, metrics: MetricSuite, labels, desc: str) -> dict:
    """Loss and metrics over a whole split, gathered across processes without duplicates."""
    model.eval()
    all_logits, all_labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        batch_labels = batch["labels"]
        if recipe.task == "token_classification":  # sequence lengths differ between processes
            logits = accelerator.pad_across_processes(logits, dim=1, pad_index=0)
            batch_labels = accelerator.pad_across_processes(batch_labels, dim=1, pad_index=-100)
        logits, batch_labels = accelerator.gather_for_metrics((logits, batch_labels))
        all_logits.append(logits.float().cpu())
        all_labels.append(batch_labels.cpu())
    train_mode(model, recipe)
    if recipe.task == "token_classification":
        width = max(t.shape[1] for t in all_logits)
        logits = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1])) for t in all_logits])
        gold = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-100) for t in all_labels])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), gold.flatten(), ignore_index=-100)
        predicted = logits.argmax(-1)
        keep = gold != -100
        predictions = [[labels[i] for i in row[mask].tolist()] for row, mask in zip(predicted, keep)]
        references = [[labels[i] for i in row[mask].tolist()] for row, mask in zip(gold, keep)]
    else:
        logits, gold = torch.cat(all_logits), torch.cat(all_labels)
        if recipe.task == "regression":
            predictions = logits.squeeze(-1)
            loss = torch.nn.functional.mse_loss(predictions, gold.float())
        else:
            predictions = logits.argmax(-1)
            loss = torch.nn.functional.cross_entropy(logits, gold)
        predictions, references = predictions.tolist(), gold.tolist()
    return {"loss": loss.item(), **metrics.compute(predictions=predictions, references=references)}


class Run:
    """One training run: its parts, its folder, its state."""

    def __init__(self, recipe: Recipe, on_validation: Callable[[dict], None] | None = None, quiet: bool = False):
        """``on_validation(record)`` runs after each validation is checkpointed; a sweep uses it to
        report to its study and may raise to stop the run (pruning). ``quiet`` keeps the console
        to warnings and a transient progress bar (train.log still gets everything)."""
        self.on_validation, self.quiet = on_validation, quiet
        self.started = time.perf_counter()  # setup time (data, model, folder) is reported, see finish()
        # Validate again as a whole: attribute assignment checks one field, not how sections fit together.
        self.recipe = recipe = Recipe.from_dict(recipe.to_dict())
        # Accelerate keeps one global state per process; several runs in one Python process (a
        # notebook, a sweep) may differ in mixed precision, so start each run from a fresh one.
        # The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        self.accelerator = accelerator = Accelerator(
            cpu=multi_process_without_accelerator(),
            # with pinned loader memory (CUDA), batches are copied to the GPU while it computes
            dataloader_config=DataLoaderConfiguration(non_blocking=True),
            gradient_accumulation_steps=recipe.train.gradient_accumulation_steps,
            mixed_precision=recipe.train.mixed_precision,
        )
        set_seed(recipe.train.seed)
        setup_logging(accelerator, quiet)
        self.notes: list[str] = []  # fallbacks, logged once the run folder's log is open
        if recipe.train.mixed_precision == "fp16" and accelerator.device.type == "cpu":
            # Accelerate turns fp16 autocast off on CPU and trains in fp32: record what actually runs
            recipe.train.mixed_precision = "no"
            self.notes.append("train.mixed_precision=fp16 has no effect on CPU (Accelerate trains in fp32 there): "
                              "training in fp32, saved as mixed_precision: no in recipe.yaml; bf16 works on CPU")
        if accelerator.device.type == "cpu":
            # `accelerate launch` sets OMP_NUM_THREADS=1 even for one process, which halves CPU speed
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(recipe.train.cpu_threads or max(1, cores // accelerator.num_processes))

        self.backbone_path = resolve_backbone(recipe.backbone)
        if recipe.head.pooling == "auto":
            recipe.head.pooling = default_pooling(self.backbone_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.backbone_path, revision=recipe.backbone.revision,
                                                       trust_remote_code=recipe.backbone.trust_remote_code)
        self.collator = data_lib.make_collator(recipe, self.tokenizer, data_lib.pad_multiple(accelerator.device))
        self.metrics = MetricSuite(recipe.eval.metrics)
        try:
            self.metrics.load()  # an unknown metric fails now, not at the first evaluation
        except ValueError as err:
            raise RecipeError(f"eval.metrics: {err}") from None
        data_key = json.dumps(recipe.data.model_dump(mode="json"))
        # the data files as they are read now, recorded in the run folder and checked by --resume
        self.data_fingerprint = (reuse(("data-fingerprint", data_key), lambda: data_fingerprint(recipe.data))
                                 if accelerator.is_main_process else None)
        with accelerator.main_process_first():  # the main process tokenises, the others read its cache
            raw = reuse(("data", data_key), lambda: data_lib.load_splits(recipe.data))
            self.labels = data_lib.label_names(recipe, raw)
            # the same data, tokeniser and max_length give the same tokens: a sweep tokenises once
            key = ("tokens", id(raw), str(self.backbone_path), recipe.backbone.revision, recipe.task,
                   tuple(self.labels or ()))
            self.tokenised = reuse(key, lambda: data_lib.tokenize(recipe, raw, self.tokenizer, self.labels))
            self.data_report = reuse(("data-report",) + key,
                                     lambda: data_report_lib.data_report(recipe, raw, self.tokenised, self.tokenizer))
        self.split_rows = split_rows(raw)  # what the model card says each score was computed on
        binary = sorted(BINARY_ONLY & set(recipe.eval.metrics))
        if binary and len(self.labels or []) != 2:
            raise RecipeError(f"eval.metrics: {binary} score the positive class of a binary task, but there are "
                              f"{len(self.labels or [])} labels; use the _macro/_micro/_weighted variants")
        model = build_model(recipe, self.backbone_path, self.labels)
        # peft injects adapters in place: keep the untouched model to save as the adapter's base
        # (new module objects around the same tensors: LoRA never writes to the base weights, and the head
        # it trains is peft's copy, so sharing them costs no memory where a deep copy cost the whole model)
        keep_base = recipe.policy.kind == "lora" and accelerator.is_main_process
        shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        self.base_model = copy.deepcopy(model, memo=shared) if keep_base else None
        self.model = apply_policy(model, recipe)
        self.trainable, self.total = count_parameters(self.model)
        self.full_model, self.features = self.model, None  # features: the frozen part's cached outputs per split
        started, self.feature_seconds = time.perf_counter(), 0.0
        if features_lib.applies(recipe) and features_lib.supports(self.model, recipe):
            with accelerator.main_process_first():
                self.features = features_lib.load_or_compute(recipe, self.model, self.tokenised, self.backbone_path,
                                                             self.collator, accelerator,
                                                             data_lib.pad_multiple(accelerator.device))
            self.feature_seconds = time.perf_counter() - started  # near 0 when read from the cache

        self.run_dir = default_run_dir(recipe, accelerator)
        recipe.output.dir = str(self.run_dir)  # the saved recipe names its folder, so --resume can find it
        self.last_dir = self.run_dir / "checkpoints" / "last"
        self.best_path = self.last_dir / "best.safetensors"  # committed together with the state it belongs to
        self.best_changed = False
        self.lock, self.finished = None, False  # the run folder's lock (main process), held from open_folder to close
        set_trackers(accelerator, recipe, self.run_dir)
        self.state, self.history = TrainState(num_processes=accelerator.num_processes), []
        self.real_tokens = torch.zeros((), dtype=torch.long, device=accelerator.device)  # added to state at checkpoints

    # --- setting up ---------------------------------------------------------------------

    def open_folder(self, resume: bool, overwrite: bool) -> None:
        """Create (or reopen, or replace) the run folder and lock it, then prepare model, data and optimizer."""
        recipe, accelerator, run_dir = self.recipe, self.accelerator, self.run_dir

        def create() -> tuple[str, bool]:
            with folder_errors(run_dir):  # one line naming the path, on every process
                self.lock, found = open_run_dir(run_dir, resume=resume, overwrite=overwrite)
                data_checked = found == "resume" and check_same_data(run_dir, self.data_fingerprint)
                if found == "resume":  # every check before the first write: a refused resume changes nothing
                    check_same_recipe(run_dir, recipe)
                    check_checkpoint_files(self.last_dir)
                # recipe.yaml first: a folder that has it is a started run, which the same command restarts
                if not (run_dir / "recipe.yaml").is_file() or (run_dir / "recipe.yaml").read_text() != recipe.to_yaml():
                    atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())
                if found != "resume":
                    atomic_write_text(run_dir / DATA_FINGERPRINT, json.dumps(self.data_fingerprint, indent=2))
                atomic_write_text(run_dir / "data_report.json", json.dumps(self.data_report, indent=2))
                (run_dir / "checkpoints").mkdir(exist_ok=True)
                if self.base_model is not None and not (run_dir / "base").is_dir():
                    save_base(self.base_model, run_dir)
            return found, data_checked

        found, data_checked = on_main_process(accelerator, create)
        resuming = found == "resume"
        self.base_model = None
        log_to_file(accelerator, run_dir)
        if found == "restart":
            log.info("%s held a run that stopped before its first checkpoint: starting it afresh%s", run_dir,
                     " (--resume: nothing to resume)" if resume else "")
        elif resuming and not data_checked:
            log.warning("%s has no %s (an older run): the data files could not be checked against the ones it "
                        "started with", run_dir, DATA_FINGERPRINT)
        for note in self.notes:
            log.warning(note)
        log.info("run folder %s (%d process%s, device %s, %d threads)", run_dir, accelerator.num_processes,
                 "es" if accelerator.num_processes > 1 else "", accelerator.device, torch.get_num_threads())
        log.info("backbone %s from %s (%s, pooling %s)", recipe.backbone.name, self.backbone_path,
                 "pretrained" if recipe.backbone.pretrained else "random init", recipe.head.pooling)
        data_report_lib.log_report(self.data_report)  # per split: rows, drops, labels, lengths, truncated share
        log.info("policy %s: %s trainable of %s parameters (%.2f%%)", recipe.policy.kind, f"{self.trainable:,}",
                 f"{self.total:,}", 100 * self.trainable / self.total)

        splits = [split for split in ("validation", "test") if split in self.tokenised]
        if self.features is None:
            collator, pin = self.collator, accelerator.device.type == "cuda"
            train_loader = data_lib.make_train_loader(recipe, self.tokenised["train"], collator, pin_memory=pin)
            eval_loaders = {split: data_lib.make_eval_loader(recipe, self.tokenised[split], collator, pin_memory=pin)
                            for split in splits}
            trained = self.model
        else:  # the same batches as without the cache (same lengths, same sampler), of stored features
            lengths = [len(ids) for ids in self.tokenised["train"]["input_ids"]]
            train_loader = data_lib.make_train_loader(recipe, self.features["train"], self.features["train"].collate,
                                                      lengths)
            eval_size = recipe.train.eval_batch_size or 2 * recipe.train.batch_size
            eval_loaders = {split: DataLoader(self.features[split], batch_size=eval_size,
                                              collate_fn=self.features[split].collate) for split in splits}
            trained = features_lib.trainable_on_features(self.model, recipe)
            log.info("training the %s on cached backbone features (train.cache_features)",
                     "head" if recipe.policy.kind == "head_only" else
                     f"layers above the {recipe.policy.freeze_layers} frozen ones")
        self.sampler = train_loader.sampler
        if recipe.train.compile:  # in place, so parameter names (checkpoints, exported files) don't change
            trained.compile(dynamic=True)
        optimizer = make_optimizer(trained, recipe)
        self.model, self.optimizer, self.train_loader, *prepared = accelerator.prepare(
            trained, optimizer, train_loader, *eval_loaders.values())
        self.eval_loaders = dict(zip(eval_loaders, prepared))

        cfg = recipe.train
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.gradient_accumulation_steps)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        # Stepped by hand once per optimizer step (a prepared scheduler steps once per process),
        # so its step counts are the loop's.
        self.scheduler = get_scheduler(
            {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.scheduler],
            self.optimizer, num_warmup_steps=int(cfg.warmup_ratio * self.total_steps), num_training_steps=self.total_steps,
        )
        accelerator.register_for_checkpointing(self.scheduler)
        if resuming:
            self._restore()
        accelerator.init_trackers(recipe.name, config={k: str(v) for k, v in recipe.to_dict()["train"].items()})
        self.setup_seconds = time.perf_counter() - self.started

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
        records = self.run_dir / "metrics.jsonl"
        lines = records.read_text().splitlines() if records.exists() else []
        # evaluations written after the checkpoint will be run again
        self.history = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= self.state.global_step]
        if self.accelerator.is_main_process:
            atomic_write_text(records, "".join(json.dumps(r) + "\n" for r in self.history))
        log.info("resumed at step %d (epoch %d)", self.state.global_step, self.state.epoch)

    # --- the loop -------------------------------------------------------------------------

    def train(self) -> None:
        accelerator, cfg, state, model = self.accelerator, self.recipe.train, self.state, self.model
        train_mode(model, self.recipe)
        progress = tqdm(total=self.total_steps, initial=state.global_step, desc="training", leave=not self.quiet,
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
                    loss = model(**batch).loss
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
            targets = " (or look for NaN/inf targets in the data)" if self.recipe.task == "regression" else ""
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
        greater = recipe.eval.primary != "loss" and greater_is_better(recipe.eval.primary)
        value = result[recipe.eval.primary]
        better = state.best_value is None or math.isnan(state.best_value) or (
            value > state.best_value if greater else value < state.best_value)
        # NaN (e.g. a correlation of constant predictions) only counts until a real number comes along
        if better and (not math.isnan(value) or state.best_value is None):
            state.best_value, state.best_step, state.evals_without_improvement = value, state.global_step, 0
            self.best_changed = True
        else:
            state.evals_without_improvement += 1
        if accelerator.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        accelerator.log({f"validation/{k}": v for k, v in result.items()}, step=state.global_step)
        log.info("step %d validation: %s", state.global_step, "  ".join(f"{k} {v:.4f}" for k, v in result.items()))
        state.eval_seconds += time.perf_counter() - started
        self.save_checkpoint()
        if self.on_validation is not None:
            self.on_validation(record)
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
                save_trainable(accelerator.unwrap_model(self.model), tmp / "best.safetensors")
            elif self.best_path.exists():  # unchanged: share the file rather than copy it
                try:
                    os.link(self.best_path, tmp / "best.safetensors")
                except OSError:
                    shutil.copyfile(self.best_path, tmp / "best.safetensors")
            self.best_changed = False
        self.state.checkpoint_seconds += time.perf_counter() - started  # before it is saved with the state
        if accelerator.is_main_process:
            (tmp / "train_state.json").write_text(json.dumps(self.state.__dict__))
            replace_dir(tmp, self.last_dir)
        accelerator.wait_for_everyone()

    # --- the end ------------------------------------------------------------------------

    def finish(self) -> RunResult:
        """Restore the best evaluation (not the last), test it, export it with its model card."""
        accelerator, state, recipe = self.accelerator, self.state, self.recipe
        accelerator.wait_for_everyone()
        load_trainable(accelerator.unwrap_model(self.model), self.best_path)
        # with cached features the trained module is the head alone; the full model shares it
        model = accelerator.unwrap_model(self.model) if self.features is None else self.full_model
        best = next(r for r in self.history if r["step"] == state.best_step)
        final = {"best_step": state.best_step,
                 "validation": {k: v for k, v in best.items() if k not in ("step", "epoch", "train_seconds")}}
        test_started = time.perf_counter()
        if "test" in self.eval_loaders:
            final["test"] = evaluate(self.model, self.eval_loaders["test"], accelerator, recipe, self.metrics,
                                     self.labels, "testing")
        self._count_real_tokens()
        final.update(train_seconds=round(state.train_seconds, 2), optimizer_steps=state.global_step,
                     samples_per_second=round(state.samples_seen / max(state.train_seconds, 1e-9), 2),
                     tokens_processed=state.tokens_processed, tokens_real=state.tokens_real,
                     feature_cache_seconds=round(self.feature_seconds, 2),
                     padding_fraction=round(1 - state.tokens_real / max(state.tokens_processed, 1), 4),
                     trainable_parameters=self.trainable, total_parameters=self.total,
                     # where the wall time went; a sweep reports the part outside training steps per trial
                     seconds={"setup": round(self.setup_seconds, 2), "train": round(state.train_seconds, 2),
                              "evaluate": round(state.eval_seconds, 2),
                              "checkpoint": round(state.checkpoint_seconds, 2),
                              "test": round(time.perf_counter() - test_started, 2)},
                     data=data_report_lib.metrics_summary(self.data_report))
        if accelerator.is_main_process:
            export_model(model, self.tokenizer, self.labels, self.run_dir, recipe.output.merge_lora,
                         max_length=recipe.data.max_length)
            atomic_write_text(self.run_dir / "metrics.json", json.dumps(final, indent=2))
            write_model_card(recipe, self.run_dir, final, self.trainable, self.total, rows=self.split_rows)
        log.info("best step %d | validation %s%s", state.best_step,
                 "  ".join(f"{k} {v:.4f}" for k, v in final["validation"].items()),
                 (" | test " + "  ".join(f"{k} {v:.4f}" for k, v in final["test"].items())) if "test" in final else "")
        accelerator.wait_for_everyone()
        self.end_trackers()
        self.finished = True
        return RunResult(run_dir=self.run_dir, metrics=final, best_step=state.best_step,
                         best_checkpoint=self.best_path, history=self.history)

    def end_trackers(self) -> None:
        """Close the trackers. Unlike ``Accelerator.end_training`` this keeps the process group, which
        later runs in the same processes (a sweep's trials) still need; see ``end_processes``."""
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def close(self) -> None:
        """Release the run folder's lock (the folder stays as it is)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def interrupted(self) -> Interrupted:
        """Ctrl-C in one line (also in train.log): where it stopped, what was kept, the command to go on."""
        run_dir, where = self.run_dir, f"at step {self.state.global_step}"
        if self.finished:  # training and export were done, pruning (after_training) was not
            message = f"interrupted (Ctrl-C) after training; kept: the trained model in {run_dir}"
        elif checkpoint_step(run_dir) is not None:
            message = (f"interrupted (Ctrl-C) {where}; kept: {kept(run_dir)}; resume with: "
                       f"{train_command(run_dir, '--resume')}")
        else:
            message = (f"interrupted (Ctrl-C) {where}, before the first checkpoint: nothing to resume; the same "
                       f"command starts again, e.g. {train_command(run_dir)}")
        if self.accelerator.is_main_process:
            write_to_log_file(message)
        return Interrupted(message)


def train_mode(model: torch.nn.Module, recipe: Recipe) -> None:
    """Training mode. Under head_only and freeze, frozen parts (parameters, none trainable) run in eval
    mode: a frozen backbone or frozen lower layers are fixed feature extractors (no dropout), as the
    feature cache assumes. LoRA keeps the usual dropout everywhere, around its adapters."""
    model.train()
    if recipe.policy.kind not in ("head_only", "freeze"):
        return
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
