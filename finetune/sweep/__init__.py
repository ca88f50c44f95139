"""Sweeps: grid, random and Bayesian search over any recipe field, on an Optuna study.

    config  -- the sweep section (space, method, objective, budget, pruner, storage)
    space   -- sampling, grid enumeration, settings -> dotted overrides
    study   -- storage, samplers, pruners, trial slots, heartbeats
    runner  -- the sweep loop: one fresh recipe run per trial
    report  -- trials table and plots
"""

from finetune.sweep.config import SweepConfig, load_sweep_file, parse_sweep
from finetune.sweep.runner import SweepResult, run_sweep

__all__ = ["SweepConfig", "SweepResult", "load_sweep_file", "parse_sweep", "run_sweep"]
