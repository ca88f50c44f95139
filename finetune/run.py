"""The lifecycle of a run, told once: build the parts, open the run folder, train, restore the best
evaluation, test it, export it, keep what ``output.keep`` says.

``train_run`` is the one way into training, with hooks as arguments (``on_validation``, ``quiet``, a
starting ``model``): ``finetune.techniques.run_recipe`` (``Recipe.run``, sweep trials, ``compare``) adds
what the recipe asks for after training, and pruning's recovery fine-tune trains the pruned model with it.
Bad input fails before anything is written.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, get_scheduler

from finetune import data as data_lib
from finetune import data_report as data_report_lib
from finetune import features as features_lib
from finetune import objective as objective_lib
from finetune import runs, transfer
from finetune import soup as soup_lib
from finetune.backbones import build_model, default_pooling, resolve_backbone
from finetune.config import RecipeConfig, RecipeError, run_lineage
from finetune.distill.student import Distillation
from finetune.errors import Interrupted, RunFolderError
from finetune.fingerprint import check_same_data, data_fingerprint
from finetune.loop import Loop, TrainState, evaluate, layer_depths_check, make_optimizer
from finetune.metrics import BINARY_ONLY, MetricSuite, greater_is_better
from finetune.policies import apply_policy, count_parameters, policy_of
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
    check_same_recipe,
    checkpoint_step,
    folder_errors,
    kept,
    open_run_dir,
    remove_checkpoints,
    train_command,
)
from finetune.weights import check_checkpoint_files, load_trainable

log = logging.getLogger("finetune")


def train_run(recipe: RecipeConfig, resume: bool = False, overwrite: bool | None = None, *,
              on_validation: Callable[[dict], None] | None = None, quiet: bool = False,
              model: nn.Module | None = None, test: bool | Callable[[dict], bool] = True,
              deadline: float | None = None) -> RunResult:
    """The lifecycle of one run: build, open the folder, train, restore the best evaluation, test, export,
    keep what ``output.keep`` says. ``finetune.techniques.run_recipe`` adds what the recipe asks for after
    training; pruning's recovery fine-tune calls this directly, on the pruned model.

    ``overwrite=None`` takes ``output.overwrite`` from the recipe, except when resuming.
    ``on_validation(record)`` runs after each validation is checkpointed (a sweep reports to its study
    there and may raise to stop the run); ``quiet`` keeps the console to warnings (train.log gets all).
    ``model``: train this model (its weights restored to the best evaluation in place) instead of building
    one from the recipe's backbone and head. ``test=False`` leaves the test split unscored; a function of the
    best validation scores decides (a sweep scores only the trials it will keep). ``deadline``: a
    ``time.monotonic()`` moment (a budgeted sweep's end) at which training stops early, leaving time for one
    last validation; the best evaluation so far is the run's model and metrics.json says where it stopped.

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
    run = Run(recipe, on_validation=on_validation, quiet=quiet, model=model, test=test, deadline=deadline)
    try:
        with folder_errors(run.run_dir):
            run.open_folder(resume=resume, overwrite=bool(not resume and recipe.output.overwrite
                                                          if overwrite is None else overwrite))
            run.train()
            result = run.finish()
            if run.accelerator.is_main_process:
                keep_only(result, run.recipe.output.keep)
            return result
    except KeyboardInterrupt:
        run.end_trackers()
        raise run.interrupted() from None
    except BaseException:
        run.end_trackers()  # an open tracker keeps its files (a sweep's next trial writes beside them)
        raise
    finally:
        run.close()
        run.accelerator.free_memory()  # Accelerate keeps references to the prepared model and optimizer


def keep_only(result: RunResult, keep: str) -> None:
    """output.keep: a finished run's checkpoint goes unless asked for; the log says how much disk that saved."""
    checkpoints = result.run_dir / runs.CHECKPOINTS
    if keep != "model" or not checkpoints.is_dir():
        return
    size = sum(f.stat().st_size for f in checkpoints.rglob("*") if f.is_file() and not f.is_symlink())
    remove_checkpoints(result.run_dir)
    result.best_checkpoint = None
    log.info("output.keep=model: removed %s (%.0f MB; the model in %s is the best checkpoint); "
             "output.keep=model+checkpoint keeps it to train further", checkpoints, size / 2**20, result.run_dir)


class Run(Loop):
    """One training run: its parts, its folder, its state."""

    def __init__(self, recipe: RecipeConfig, on_validation: Callable[[dict], None] | None = None, quiet: bool = False,
                 model: nn.Module | None = None, test: bool | Callable[[dict], bool] = True,
                 deadline: float | None = None):
        """``on_validation(record)`` runs after each validation is checkpointed; a sweep uses it to
        report to its study and may raise to stop the run (pruning). ``quiet`` keeps the console
        to warnings and a transient progress bar (train.log still gets everything)."""
        self.on_validation, self.quiet, self.test, self.deadline = on_validation, quiet, test, deadline
        self.started = time.perf_counter()  # setup time (data, model, folder) is reported, see finish()
        # Validate again as a whole: attribute assignment checks one field, not how sections fit together.
        self.recipe = recipe = RecipeConfig.from_dict(recipe.to_dict())
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
        self.source = transfer.read_source(self.backbone_path)  # backbone.name a finished run (finetune.transfer)
        # the lineage of the weights actually read (a saved recipe may carry an older one)
        recipe.backbone.source = run_lineage(recipe.backbone.name) if self.source else None
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
        self.distillation = None  # distill.teacher: the teacher's targets beside the training rows
        if recipe.distill.teacher is not None:
            with accelerator.main_process_first():  # the main process runs the teacher, the others read its cache
                self.distillation = Distillation(recipe, raw["train"], self.tokenised["train"], self.tokenizer,
                                                 self.labels)
        if objective_lib.wanted(recipe):
            self.objective = objective_lib.Objective(recipe, self.tokenised["train"]["labels"], len(self.labels or []))
        binary = sorted(BINARY_ONLY & set(recipe.eval.metrics))
        if binary and len(self.labels or []) != 2:
            raise RecipeError(f"eval.metrics: {binary} score the positive class of a binary task, but there are "
                              f"{len(self.labels or [])} labels; use the _macro/_micro/_weighted variants")
        built = model is None  # a given model (pruning's recovery) starts from no run's head or optimizer
        model = build_model(recipe, self.backbone_path, self.labels) if built else model
        # peft injects adapters in place: keep the untouched model to save as the adapter's base
        # (new module objects around the same tensors: adapters never write to the base weights, and the head
        # they train is peft's copy, so sharing them costs no memory where a deep copy cost the whole model)
        keep_base = policy_of(recipe).adapter and accelerator.is_main_process
        shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        self.base_model = copy.deepcopy(model, memo=shared) if keep_base else None
        self.model = apply_policy(model, recipe)
        self.trainable, self.total = count_parameters(self.model)
        if recipe.train.layer_lr_decay is not None:  # a backbone without numbered layers is refused before the folder
            layer_depths_check(self.model, recipe)
        self.warm_start = (transfer.warm_start_file(recipe, self.source, self.model)
                           if built and recipe.backbone.warm_optimizer else None)
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
        self.last_dir = self.run_dir / runs.CHECKPOINT
        self.best_path = self.last_dir / runs.BEST_WEIGHTS  # committed together with the state it belongs to
        self.best_changed = False
        if recipe.train.soup != "none":
            self.soup_pool = soup_lib.SoupPool(self.run_dir, recipe.train.soup_size,
                                               greater_is_better(recipe.eval.primary))
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
                if not (run_dir / runs.RECIPE).is_file() or (run_dir / runs.RECIPE).read_text() != recipe.to_yaml():
                    atomic_write_text(run_dir / runs.RECIPE, recipe.to_yaml())
                if found != "resume":
                    atomic_write_text(run_dir / DATA_FINGERPRINT, json.dumps(self.data_fingerprint, indent=2))
                atomic_write_text(run_dir / runs.DATA_REPORT, json.dumps(self.data_report, indent=2))
                (run_dir / runs.CHECKPOINTS).mkdir(exist_ok=True)
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
        for line in transfer.describe(self.source, recipe, self.labels) if self.source else ():
            log.info(line)
        data_report_lib.log_report(self.data_report)  # per split: rows, drops, labels, lengths, truncated share
        log.info("policy %s: %s trainable of %s parameters (%.2f%%)", recipe.policy.kind, f"{self.trainable:,}",
                 f"{self.total:,}", 100 * self.trainable / self.total)
        if self.distillation is not None:
            log.info(self.distillation.describe())
        if self.objective is not None:
            log.info(self.objective.describe())

        splits = [split for split in ("validation", "test") if split in self.tokenised]
        if self.features is None:
            collator, pin = self.collator, accelerator.device.type == "cuda"
            if self.distillation is None:
                train_loader = data_lib.make_train_loader(recipe, self.tokenised["train"], collator, pin_memory=pin)
            else:
                train_loader = data_lib.make_train_loader(recipe, self.distillation.train_set,
                                                          self.distillation.collator(collator),
                                                          self.distillation.lengths, pin_memory=pin)
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
                     "head" if policy_of(recipe).cache(recipe) == "pooled" else
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
        elif self.warm_start is not None:  # the moments only: this recipe's learning rates and a fresh schedule
            restored = transfer.restore_optimizer(self.optimizer, accelerator.unwrap_model(self.model),
                                                  Path(self.source["path"]))
            log.info("optimizer: AdamW moments of %d parameter tensors from %s (backbone.warm_optimizer); the "
                     "learning-rate schedule starts fresh", restored, self.warm_start)
        accelerator.init_trackers(recipe.name, config={k: str(v) for k, v in recipe.to_dict()["train"].items()})
        self.setup_seconds = time.perf_counter() - self.started

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
        if self.soup_pool is not None:
            validation = self.eval_loaders["validation"]
            final["soup"] = soup_lib.cook(self.soup_pool, recipe.train.soup, accelerator.unwrap_model(self.model),
                                          final["validation"], recipe.eval.primary,
                                          lambda: evaluate(self.model, validation, accelerator, recipe, self.metrics,
                                                           self.labels, "soup"))
            final["validation"] = final["soup"].pop("metrics")
        test_started = time.perf_counter()
        wanted = self.test(final["validation"]) if callable(self.test) else self.test
        if "test" in self.eval_loaders and wanted:
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
        if self.stopped_at is not None:
            final["stopped_at_deadline"] = {"step": self.stopped_at, "of": self.total_steps}
        if self.distillation is not None:
            final["distill"] = self.distillation.summary
        if accelerator.is_main_process:
            export_model(model, self.tokenizer, self.labels, self.run_dir, recipe.output.merge_lora,
                         max_length=recipe.data.max_length)
            atomic_write_text(self.run_dir / runs.METRICS, json.dumps(final, indent=2))
            write_model_card(recipe, self.run_dir, final, self.trainable, self.total, rows=self.split_rows)
        log.info("best step %d | validation %s%s", state.best_step,
                 "  ".join(f"{k} {v:.4f}" for k, v in final["validation"].items()),
                 (" | test " + "  ".join(f"{k} {v:.4f}" for k, v in final["test"].items())) if "test" in final else "")
        accelerator.wait_for_everyone()
        self.end_trackers()
        self.finished = True
        return RunResult(run_dir=self.run_dir, metrics=final, best_step=state.best_step,
                         best_checkpoint=self.best_path, history=self.history)

    def close(self) -> None:
        """Release the run folder's lock (the folder stays as it is)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def interrupted(self) -> Interrupted:
        """Ctrl-C in one line (also in train.log): where it stopped, what was kept, the command to go on."""
        run_dir, where = self.run_dir, f"at step {self.state.global_step}"
        if self.finished:  # training and export were done, keeping what output.keep says was not
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


