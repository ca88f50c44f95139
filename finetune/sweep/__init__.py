"""Sweeps: grid, random and Bayesian search over any recipe field, on an Optuna study.

    config  -- the sweep section (space, method, objective, budget, pruner, storage)
    space   -- sampling, grid enumeration, settings -> dotted overrides
    study   -- storage, samplers, pruners, trial slots, heartbeats; creating, joining or widening a study
    trials  -- which study is the sweep's, and which of its trials are its own
    warm    -- warm start: the earlier best tried first, earlier trials lent to the sampler
    widen   -- widening a sweep's space without losing its trials
    runner  -- the sweep loop: one fresh recipe run per trial
    report  -- trials table and plots
"""

from finetune.sweep.config import SweepConfig, load_sweep_file, parse_sweep
from finetune.sweep.runner import SweepResult, run_sweep

__all__ = ["SweepConfig", "SweepResult", "load_sweep_file", "parse_sweep", "run_sweep"]
