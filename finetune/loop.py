"""The training loop: one readable loop on Accelerate.

``run_recipe`` reads as the story of a run: build everything (and fail on bad input
before anything is written), train with periodic evaluation, restore the best
evaluation, test it, export. The same code runs on one CPU process, under
``accelerate launch --multi_gpu --num_processes N`` (DDP; gloo on CPU) and on GPUs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import filter_trackers
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, get_scheduler
from transformers.utils import logging as transformers_logging

from finetune import data as data_lib
from finetune.backbones import default_pooling, resolve_backbone
from finetune.config import Recipe, RecipeError
from finetune.metrics import MetricSuite, greater_is_better
from finetune.modeling import FinetuneConfig, FinetuneForSequenceClassification, FinetuneForTokenClassification
from finetune.policies import apply_policy, count_parameters
from finetune.runs import (RunResult, atomic_write_text, export_model, load_trainable, prepare_run_dir, replace_dir,
                           save_base, save_trainable, write_model_card)

log = logging.getLogger("finetune")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


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
    samples_seen: int = 0


# --- building ----------------------------------------------------------------------


def build_model(recipe: Recipe, backbone_path: Path, labels: list[str] | None):
    """Backbone (pretrained or random) + head, as one ``PreTrainedModel``."""
    cfg = recipe.backbone
    backbone_config = AutoConfig.from_pretrained(backbone_path, trust_remote_code=cfg.trust_remote_code)
    num_labels = len(labels) if labels else 1
    config = FinetuneConfig(
        backbone_config=backbone_config, task=recipe.task, pooling=recipe.head.pooling,
        head_type=recipe.head.type, head_hidden_size=recipe.head.hidden_size, head_dropout=recipe.head.dropout,
        num_labels=num_labels,
        id2label={i: name for i, name in enumerate(labels)} if labels else {0: "score"},
        label2id={name: i for i, name in enumerate(labels)} if labels else {"score": 0},
        problem_type="regression" if recipe.task == "regression" else None,
    )
    model_class = FinetuneForTokenClassification if recipe.task == "token_classification" else FinetuneForSequenceClassification
    set_seed(recipe.train.seed)  # the head's initialisation depends only on the seed
    model = model_class(config)
    if cfg.pretrained:
        kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # the skipped pooler is expected; its load report is noise
        try:
            model.backbone = AutoModel.from_pretrained(backbone_path, add_pooling_layer=False, **kwargs)
        except TypeError:
            model.backbone = AutoModel.from_pretrained(backbone_path, **kwargs)
        finally:
            transformers_logging.set_verbosity(verbosity)
    dtype = getattr(torch, cfg.dtype)
    return model.to(dtype) if dtype != torch.float32 else model


def make_loaders(recipe: Recipe, tokenised, collator):
    train = tokenised["train"]
    sampler = data_lib.LengthGroupedSampler(
        [len(ids) for ids in train["input_ids"]], recipe.train.batch_size, recipe.train.seed, recipe.train.group_by_length
    )
    # A private generator: creating a loader iterator must not draw from the global RNG, or a resumed
    # run (which creates its iterator at another time) would get different dropout masks.
    train_loader = DataLoader(train, batch_size=recipe.train.batch_size, sampler=sampler, collate_fn=collator,
                              generator=torch.Generator().manual_seed(recipe.train.seed))
    eval_batch = recipe.train.eval_batch_size or 2 * recipe.train.batch_size
    eval_loaders = {}
    for split in ("validation", "test"):
        if split in tokenised:  # sorted by length: evaluation order doesn't matter, padding does
            ds = tokenised[split]
            lengths = [len(ids) for ids in ds["input_ids"]]
            by_length = sorted(range(len(ds)), key=lengths.__getitem__)
            eval_loaders[split] = DataLoader(ds.select(by_length), batch_size=eval_batch, collate_fn=collator)
    return sampler, train_loader, eval_loaders


def make_optimizer(model, recipe: Recipe) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)  # biases and norms take no decay
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.train.lr)


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
    model.train()
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


# --- the run ---------------------------------------------------------------------------


LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")


def _setup_logging(accelerator: Accelerator) -> None:
    """Readable INFO lines from the main process; the other processes only warn."""
    log.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    log.handlers.clear()
    log.propagate = False
    handler = logging.StreamHandler()
    handler.setFormatter(LOG_FORMAT)
    log.addHandler(handler)


def _log_to_file(accelerator: Accelerator, run_dir: Path) -> None:
    if accelerator.is_main_process:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(LOG_FORMAT)
        log.addHandler(handler)


def _default_run_dir(recipe: Recipe, accelerator: Accelerator) -> Path:
    if recipe.output.dir:
        return Path(recipe.output.dir)
    stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
    broadcast_object_list(stamp)  # every process must write to the same folder
    return Path("runs") / f"{recipe.name}-{stamp[0]}"


def _multi_process_without_accelerator() -> bool:
    """`accelerate launch --multi_gpu --num_processes N` on a machine without GPUs: DDP on CPU (gloo).

    Accelerate only picks its multi-CPU backend when told the run is on CPU; otherwise each
    process would silently train alone and all of them would write the same run folder.
    """
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return several and not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available())


def _on_main_process(accelerator: Accelerator, action) -> None:
    """Run a file-system action on the main process; if it fails, every process raises the same error."""
    error = [None]
    if accelerator.is_main_process:
        try:
            action()
        except RecipeError as err:
            error[0] = str(err)
    broadcast_object_list(error)  # without this, the other processes would wait forever
    if error[0]:
        raise RecipeError(error[0])


def _check_same_recipe(run_dir: Path, recipe: Recipe) -> None:
    """A resumed run must continue the same recipe, or its checkpoints would mean something else."""
    saved = Recipe.from_yaml(run_dir / "recipe.yaml").to_dict()
    current = recipe.to_dict()
    saved["output"]["overwrite"] = current["output"]["overwrite"]
    changed = [f"{section}.{key}" for section in current if isinstance(current[section], dict)
               for key in current[section] if current[section][key] != saved.get(section, {}).get(key)]
    changed += [key for key in current if not isinstance(current[key], dict) and current[key] != saved.get(key)]
    if changed:
        raise RecipeError(f"--resume: the recipe differs from the one this run started with ({', '.join(changed)}); "
                          "resume with the same settings, or start a new run")


def _improved(value: float, best: float | None, greater_is_better: bool) -> bool:
    return best is None or (value > best if greater_is_better else value < best)


def run_recipe(recipe: Recipe, resume: bool = False, overwrite: bool | None = None) -> RunResult:
    """Train a recipe end to end; see ``Recipe.run``.

    Raises:
        RecipeError: invalid data, labels, backbone or policy (before the run folder is touched).
        TrainingDiverged: the loss became NaN/inf (the last good checkpoint is kept).
    """
    # Validate again as a whole: attribute assignment checks one field, not how sections fit together.
    recipe = Recipe.from_dict(recipe.to_dict())
    accelerator = Accelerator(
        cpu=_multi_process_without_accelerator(),
        gradient_accumulation_steps=recipe.train.gradient_accumulation_steps,
        mixed_precision=recipe.train.mixed_precision,
    )
    set_seed(recipe.train.seed)
    _setup_logging(accelerator)
    if accelerator.device.type == "cpu":
        # `accelerate launch` sets OMP_NUM_THREADS=1 even for one process, which halves CPU speed
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(recipe.train.cpu_threads or max(1, cores // accelerator.num_processes))

    # Build everything first: bad input fails here, before anything is written.
    backbone_path = resolve_backbone(recipe.backbone)
    if recipe.head.pooling == "auto":
        recipe.head.pooling = default_pooling(backbone_path)
    tokenizer = AutoTokenizer.from_pretrained(backbone_path, revision=recipe.backbone.revision,
                                              trust_remote_code=recipe.backbone.trust_remote_code)
    metrics = MetricSuite(recipe.eval.metrics)
    metrics.load()  # an unknown metric fails now, not at the first evaluation
    with accelerator.main_process_first():  # main process tokenises, the others read its cache
        raw = data_lib.load_splits(recipe.data)
        labels = data_lib.label_names(recipe, raw)
        tokenised = data_lib.tokenize(recipe, raw, tokenizer, labels)
    model = build_model(recipe, backbone_path, labels)
    # peft injects adapters in place: keep the untouched model to save as the adapter's base
    base_model = copy.deepcopy(model) if recipe.policy.kind == "lora" else None
    model = apply_policy(model, recipe)
    trainable, total = count_parameters(model)

    run_dir = _default_run_dir(recipe, accelerator)
    if recipe.output.report_to:  # trackers write under the run folder, known only now
        accelerator.project_configuration.set_directories(str(run_dir))
        try:
            accelerator.log_with = filter_trackers(recipe.output.report_to, accelerator.logging_dir)
        except (ValueError, ImportError) as err:
            raise RecipeError(f"output.report_to: {err}") from None
        missing = sorted(set(recipe.output.report_to) - {str(t) for t in accelerator.log_with})
        if missing:  # Accelerate skips trackers whose package is missing; a user asking for one wants to know
            raise RecipeError(f"output.report_to: {missing} requested but not installed (pip install {' '.join(missing)})")
    overwrite = recipe.output.overwrite if overwrite is None else overwrite

    def create_run_folder() -> None:
        prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
        if resume:
            _check_same_recipe(run_dir, recipe)
        atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())
        if base_model is not None and not (run_dir / "base").is_dir():
            save_base(base_model, run_dir)

    _on_main_process(accelerator, create_run_folder)
    del base_model
    _log_to_file(accelerator, run_dir)
    log.info("run folder %s (%d process%s, device %s, %d threads)", run_dir, accelerator.num_processes,
             "es" if accelerator.num_processes > 1 else "", accelerator.device, torch.get_num_threads())
    log.info("backbone %s from %s (%s, pooling %s)", recipe.backbone.name, backbone_path,
             "pretrained" if recipe.backbone.pretrained else "random init", recipe.head.pooling)
    log.info("data: %s", ", ".join(f"{split} {len(ds):,} rows" for split, ds in tokenised.items()))
    log.info("policy %s: %s trainable of %s parameters (%.2f%%)", recipe.policy.kind, f"{trainable:,}",
             f"{total:,}", 100 * trainable / total)

    collator = data_lib.make_collator(recipe, tokenizer)
    _, train_loader, eval_loaders = make_loaders(recipe, tokenised, collator)
    optimizer = make_optimizer(model, recipe)
    model, optimizer, train_loader, *prepared_eval = accelerator.prepare(model, optimizer, train_loader, *eval_loaders.values())
    eval_loaders = dict(zip(eval_loaders, prepared_eval))

    cfg = recipe.train
    per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    # The scheduler is stepped by hand once per optimizer step (not prepared: Accelerate would
    # step it once per process), so its step counts are the loop's step counts.
    scheduler = get_scheduler(
        {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.scheduler],
        optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps), num_training_steps=total_steps,
    )
    accelerator.register_for_checkpointing(scheduler)
    greater = recipe.eval.primary != "loss" and greater_is_better(recipe.eval.primary)
    state = TrainState()
    last_dir, best_path = run_dir / "checkpoints" / "last", run_dir / "checkpoints" / "best.safetensors"
    history: list[dict] = []
    if resume:
        accelerator.load_state(str(last_dir))
        state = TrainState(**json.loads((last_dir / "train_state.json").read_text()))
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        history = [r for r in history if r["step"] <= state.global_step]  # drop evaluations after the checkpoint
        if accelerator.is_main_process:
            atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        log.info("resumed at step %d (epoch %d)", state.global_step, state.epoch)

    def save_checkpoint() -> None:
        tmp = last_dir.with_name(".last.tmp")
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / "train_state.json").write_text(json.dumps(state.__dict__))
            replace_dir(tmp, last_dir)
        accelerator.wait_for_everyone()

    def run_evaluation() -> bool:
        """Evaluate on validation, keep the best, log; True when early stopping says stop."""
        eval_started = time.perf_counter()
        result = evaluate(model, eval_loaders["validation"], accelerator, recipe, metrics, labels, "evaluating")
        value = result[recipe.eval.primary]
        record = {"step": state.global_step, "epoch": round(state.global_step / per_epoch, 3), **result}
        history.append(record)
        if _improved(value, state.best_value, greater):
            state.best_value, state.best_step, state.evals_without_improvement = value, state.global_step, 0
            if accelerator.is_main_process:
                save_trainable(accelerator.unwrap_model(model), best_path)
        else:
            state.evals_without_improvement += 1
        if accelerator.is_main_process:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        accelerator.log({f"validation/{k}": v for k, v in result.items()}, step=state.global_step)
        log.info("step %d validation: %s", state.global_step, "  ".join(f"{k} {v:.4f}" for k, v in result.items()))
        state.eval_seconds += time.perf_counter() - eval_started
        save_checkpoint()
        return cfg.early_stopping_patience is not None and state.evals_without_improvement >= cfg.early_stopping_patience

    if accelerator.is_main_process:
        (run_dir / "checkpoints").mkdir(exist_ok=True)
    accelerator.init_trackers(recipe.name, config={k: str(v) for k, v in recipe.to_dict()["train"].items()})
    model.train()
    progress = tqdm(total=total_steps, initial=state.global_step, desc="training",
                    disable=not accelerator.is_local_main_process)
    started, stop = time.perf_counter() - state.train_seconds - state.eval_seconds, False
    running_loss, losses_in_window = torch.zeros((), device=accelerator.device), 0
    evaluated_at = history[-1]["step"] if history else -1
    while state.global_step < total_steps and not stop:
        loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch) if state.batches_in_epoch else train_loader
        loader.set_epoch(state.epoch)  # Accelerate's loader passes the epoch on to our sampler when iterated
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                # One host sync per step (cheap on CPU) buys a stop at the exact step that diverged.
                finite = torch.isfinite(loss.detach()).float()
                if accelerator.num_processes > 1:  # all processes must stop together
                    finite = accelerator.reduce(finite, reduction="mean")
                if finite.item() < 1:
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at step {state.global_step + 1}; training stopped. "
                        f"The last good checkpoint is kept in {last_dir} and the best weights in {best_path}."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            state.samples_seen += batch["input_ids"].shape[0] * accelerator.num_processes
            running_loss += loss.detach()
            losses_in_window += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.global_step += 1
            progress.update(1)
            if state.global_step % cfg.log_every == 0:
                mean_loss = (running_loss / losses_in_window).item()
                running_loss.zero_()
                losses_in_window = 0
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                accelerator.log({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0]}, step=state.global_step)
                log.debug("step %d loss %.4f", state.global_step, mean_loss)
            state.train_seconds = time.perf_counter() - started - state.eval_seconds
            if isinstance(cfg.eval_every, int) and state.global_step % cfg.eval_every == 0:
                evaluated_at = state.global_step
                stop = run_evaluation()
            elif cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                save_checkpoint()
            if stop or state.global_step >= total_steps:
                break
        else:  # the epoch ran to its end
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            if cfg.eval_every == "epoch" and evaluated_at != state.global_step:
                evaluated_at = state.global_step
                stop = run_evaluation()
    progress.close()
    state.train_seconds = time.perf_counter() - started - state.eval_seconds
    if evaluated_at != state.global_step:  # the final weights always get a say in model selection
        run_evaluation()

    # The model kept is the best evaluation, not the last.
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    load_trainable(unwrapped, best_path)
    best = next(r for r in history if r["step"] == state.best_step)
    final = {"best_step": state.best_step, "validation": {k: v for k, v in best.items() if k not in ("step", "epoch")}}
    if "test" in eval_loaders:
        final["test"] = evaluate(model, eval_loaders["test"], accelerator, recipe, metrics, labels, "testing")
    final.update(train_seconds=round(state.train_seconds, 2), optimizer_steps=state.global_step,
                 samples_per_second=round(state.samples_seen / max(state.train_seconds, 1e-9), 2),
                 trainable_parameters=trainable, total_parameters=total)
    if accelerator.is_main_process:
        export_model(unwrapped, tokenizer, labels, run_dir, recipe.output.merge_lora)
        atomic_write_text(run_dir / "metrics.json", json.dumps(final, indent=2))
        write_model_card(recipe, run_dir, final, trainable, total)
    log.info("best step %d | validation %s%s", state.best_step,
             "  ".join(f"{k} {v:.4f}" for k, v in final["validation"].items()),
             (" | test " + "  ".join(f"{k} {v:.4f}" for k, v in final["test"].items())) if "test" in final else "")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(run_dir=run_dir, metrics=final, best_step=state.best_step, best_checkpoint=best_path, history=history)
