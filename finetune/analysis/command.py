"""``finetune analyze MODEL``: what a run or an ensemble gets right and wrong on one split.

    finetune analyze RUN_DIR                       # test split -> RUN_DIR/analysis/report.md, analysis.json, PNGs
    finetune analyze ENSEMBLE_DIR --split validation --output reports/ens
    finetune analyze RUN_DIR --slice source --slice domain --top-k 20
    finetune analyze RUN_A --compare RUN_B         # per-class differences, McNemar's exact test, disagreements
    finetune analyze RUN_DIR --fit-temperature     # fit on validation, store RUN_DIR/calibration.json
    finetune analyze RUN_DIR data.max_test_samples=500

Prints a one-screen summary; the report says the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from finetune import runs
from finetune.analysis import calibration
from finetune.analysis.collect import SPLITS, check_split, collect, model_recipe
from finetune.analysis.outputs import Analysis, SplitOutputs
from finetune.analysis.report import analyze_outputs, check_output
from finetune.config import RecipeError
from finetune.processes import command_logging

log = logging.getLogger("finetune.analysis")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a finished run folder or an ensemble folder")
    parser.add_argument("--split", default="test", choices=SPLITS, help="the split to analyse (default test)")
    parser.add_argument("--output",
                        help="report folder (default MODEL/analysis; an earlier analysis there is replaced)")
    parser.add_argument("--top-k", type=int, default=10,
                        help="how many examples and confused pairs to list (default 10)")
    parser.add_argument("--slice", action="append", default=[], dest="slices", metavar="COLUMN",
                        help="also give the metric per value of this column of the split (repeatable)")
    parser.add_argument("--compare", metavar="RUN_B", help="another run or ensemble to compare on the same rows "
                        "(single-label classification): per-class F1, McNemar's exact test, disagreements")
    parser.add_argument("--fit-temperature", action="store_true",
                        help="single-label classification runs: fit a temperature on the validation split, store "
                             "it in MODEL/calibration.json; finetune predict then divides the logits by it")
    parser.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass (default 64)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="data.* overrides of the model's recipe, e.g. data.max_test_samples=500")


def command(args: argparse.Namespace) -> int:
    """``finetune analyze``: check everything cheap first, then run the model(s) and write the report."""
    command_logging("analyze", logger=log)
    model = Path(args.model)
    if args.top_k < 1:
        raise RecipeError(f"--top-k {args.top_k}: give 1 or more")
    if args.batch_size < 1:
        raise RecipeError(f"--batch-size {args.batch_size}: give 1 or more")
    recipe = model_recipe(model)
    check_split(recipe.with_overrides(list(args.overrides)), args.split)
    from finetune.ensemble import is_ensemble

    if args.fit_temperature and is_ensemble(model):
        raise RecipeError(f"--fit-temperature: {model} is an ensemble; it averages its members' uncalibrated "
                          "probabilities, so fit the temperature of a run instead")
    if args.fit_temperature and recipe.task != "classification":
        raise RecipeError(f"--fit-temperature: {model} is a {recipe.task} run; temperature scaling applies to "
                          "single-label classification (multi-label runs tune thresholds: eval.tune_thresholds)")
    if args.compare:
        other = model_recipe(args.compare, "--compare")
        if recipe.task != "classification" or other.task != "classification":
            raise RecipeError(f"--compare: compares single-label classification models; {model} is {recipe.task}, "
                              f"{args.compare} is {other.task}")
    output = Path(args.output) if args.output else model / runs.ANALYSIS
    runs.check_output_folder(output, "--output")
    check_output(output)

    outputs = collect(model, args.split, args.overrides, columns=args.slices,
                      apply_temperature=not args.fit_temperature, batch_size=args.batch_size)
    extra = {}
    if args.fit_temperature:
        validation = outputs if args.split == "validation" else collect(
            model, "validation", args.overrides, apply_temperature=False, batch_size=args.batch_size)
        outputs, record = fit_and_store(model, outputs, validation)
        extra["temperature_scaling"] = lambda folder: temperature_section(record, model)
    if args.compare:
        section = _compare(outputs, args)
        extra["compare"] = lambda folder: section
    analysis = analyze_outputs(outputs, output, args.top_k, args.slices, extra)
    print("\n".join(analysis.console), flush=True)
    return 0


def _compare(outputs: SplitOutputs, args: argparse.Namespace) -> Analysis:
    from finetune.analysis.compare import compare

    other = collect(args.compare, args.split, args.overrides, same_rows_as=outputs, batch_size=args.batch_size)
    return compare(outputs, other, args.top_k)


def fit_and_store(run_dir: Path, outputs: SplitOutputs, validation: SplitOutputs) -> tuple[SplitOutputs, dict]:
    """Fit the temperature on ``validation`` (uncalibrated outputs), store it in the run folder, and return
    ``outputs`` with it applied and the record written (ECE and NLL before/after on the analysed split)."""
    temperature = calibration.fit_temperature(validation.probabilities, validation.gold)
    scaled = calibration.scale(outputs.probabilities, temperature)
    before = calibration.summary(outputs.probabilities, outputs.gold)
    after = calibration.summary(scaled, outputs.gold)
    low, high = calibration.TEMPERATURE_RANGE
    record = {
        "temperature": temperature, "fitted_on": validation.split, "fitted_rows": len(validation),
        "method": "temperature scaling: minimise the validation NLL of softmax(logits / T) (bounded search on log T)",
        "at_search_bound": bool(min(abs(temperature - low), abs(temperature - high)) < 1e-3 * temperature),
        "validation_nll_before": calibration.negative_log_likelihood(validation.probabilities, validation.gold),
        "validation_nll_after": calibration.negative_log_likelihood(
            calibration.scale(validation.probabilities, temperature), validation.gold),
        "evaluated_on": outputs.split, "evaluated_rows": len(outputs),
        "ece_before": before["ece"], "ece_after": after["ece"], "nll_before": before["nll"], "nll_after": after["nll"],
        "ece_bins": calibration.BINS,
    }
    path = calibration.save_temperature(run_dir, record)
    log.info("temperature %.4g fitted on %s (%d rows); stored in %s", temperature, validation.split,
             len(validation), path)
    return dataclasses.replace(outputs, probabilities=scaled, temperature=temperature), record


def temperature_section(record: dict, run_dir: Path) -> Analysis:
    where = run_dir / runs.CALIBRATION
    bound = (" It reached the end of the search range, so the model is far from calibrated or the validation "
             "split is too easy to fit it." if record["at_search_bound"] else "")
    markdown = "\n\n".join([
        "## Temperature scaling",
        (f"Temperature **{record['temperature']:.4g}** fitted on the {record['fitted_on']} split "
         f"({record['fitted_rows']} rows) by minimising the negative log-likelihood (validation NLL "
         f"{record['validation_nll_before']:.4f} → {record['validation_nll_after']:.4f}), stored in `{where}`: "
         "`finetune predict` now divides this run's logits by it (the predicted classes do not change)." + bound),
        (f"On the {record['evaluated_on']} split: ECE {record['ece_before']:.4f} → **{record['ece_after']:.4f}**, "
         f"NLL {record['nll_before']:.4f} → {record['nll_after']:.4f}. The sections above use the new temperature."),
    ])
    console = [(f"temperature {record['temperature']:.4g} fitted on {record['fitted_on']} "
                f"({record['fitted_rows']} rows): {record['evaluated_on']} ECE {record['ece_before']:.4f} → "
                f"{record['ece_after']:.4f}, NLL {record['nll_before']:.4f} → {record['nll_after']:.4f}; "
                f"stored in {where}")]
    return Analysis(record, markdown, console)
