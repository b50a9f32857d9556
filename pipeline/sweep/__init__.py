"""`distill sweep`: train a set of recipes on one teacher generation, put them on the Pareto front of accuracy,
cost and forgetting, and pick the student that clears the verdict's bars.

    distill sweep --config configs/smollm2_support.yaml                      # a worker; run more to share the work
    distill sweep --config configs/smollm2_support.yaml sweep.search=halving
    distill sweep --config configs/smollm2_support.yaml --report             # the report from what has finished

plan.py says what runs, trial.py runs one trial, study.py is the Optuna study the workers share, results.py judges
and picks, report.py writes it up.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.console import log
from pipeline.sweep.plan import SweepPlan, Trial
from pipeline.sweep.report import SweepReport, write_sweep_report
from pipeline.sweep.results import TrialResult, pick, run_and_score, trial_result
from pipeline.sweep.study import failed, finished, open_study, pareto_keys, wait_until_settled, work

__all__ = ["SweepPlan", "run_sweep", "sweep_report"]


def run_sweep(plan: SweepPlan) -> Path:
    """Work as one of the sweep's workers until every trial has finished, then write the report."""
    log(
        f"sweep: {plan.name}: {len(plan.points)} recipes, search {plan.sweep.search}, trials in {plan.trials_dir}, "
        f"study {plan.storage_url}"
    )
    full = plan.trials(cheap=False)
    if plan.halving:
        cheap = plan.trials(cheap=True)
        cheap_study = open_study(plan, cheap=True)
        work(plan, cheap_study, cheap, lambda trial: run_and_score(plan, trial))
        wait_until_settled(plan, cheap_study, cheap)
        full = survivors(plan)
        log(f"sweep: the cheap rung is done; {len(full)} of {len(cheap)} recipes go on in full")
    study = open_study(plan, cheap=False)
    work(plan, study, full, lambda trial: run_and_score(plan, trial))
    wait_until_settled(plan, study, full)
    sweep_report(plan)
    log(f"sweep: report at {plan.dir / 'report.md'}")
    return plan.dir / "report.md"


def _results(plan: SweepPlan, cheap: bool, trials: list[Trial]) -> tuple[list[TrialResult], dict[str, str]]:
    study = open_study(plan, cheap)
    done, front = finished(study), pareto_keys(study)
    results = []
    for trial in trials:
        if trial.key in done:
            result = trial_result(plan, trial)
            result.on_front = trial.key in front
            results.append(result)
    errors = failed(study)
    return results, {key: error for key, error in errors.items() if key not in done}


def survivors(plan: SweepPlan) -> list[Trial]:
    """The cheap rung's best 1/reduction_factor (in the pick's order: clearing the bars first), in full."""
    results, _ = _results(plan, True, plan.trials(cheap=True))
    ranked = pick(results, plan.config.benchmark.verdict).ranked
    keep = max(1, math.ceil(len(plan.points) / plan.sweep.halving.reduction_factor))
    return [Trial(result.trial.knobs, cheap=False) for result in ranked[:keep]]


def sweep_report(plan: SweepPlan) -> SweepReport:
    """report.md, report.json and pareto.png from the trials finished so far."""
    cheap: list[TrialResult] = []
    full_trials = plan.trials(cheap=False)
    if plan.halving:
        cheap, _ = _results(plan, True, plan.trials(cheap=True))
        full_trials = survivors(plan) if cheap else []
    results, errors = _results(plan, False, full_trials)
    picked = pick(results, plan.config.benchmark.verdict)
    cheap_ranked = pick(cheap, plan.config.benchmark.verdict).ranked if cheap else []
    return write_sweep_report(plan, picked, cheap_ranked, [t.key for t in full_trials] if cheap else [], errors)
