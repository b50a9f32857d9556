"""The sweep's Optuna study: the queue the workers share, and the store of every trial's figures.

Each recipe is enqueued once as a waiting trial; a worker's `optimize` pops one (atomically: no two workers take
the same), runs it, and tells the study its four objectives. A worker heartbeats while it runs. One that is killed
falls silent, and the next worker to ask marks its trial failed and enqueues it again
(RetryHeartbeatStaleTrialCallback), so it resumes in its run directory from what was finished.

Why Optuna's storage and not Ray tasks: workers need nothing but the database, so a Slurm array, cron jobs or a second
terminal all join one sweep, and a worker lost with its node costs only its own trial.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from pipeline.console import PipelineError, log
from pipeline.sweep.plan import SweepPlan, Trial

# What each trial is judged on, and which way is better: the axes of the Pareto front.
OBJECTIVES = ("accuracy", "cost_per_1k_requests", "probe_drop", "leakage_rise")
DIRECTIONS = ("maximize", "minimize", "minimize", "minimize")
KEY, KNOBS, ERROR, WORKER = "key", "knobs", "error", "worker"  # the user attributes a trial carries


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(logging.WARNING)  # our log names each trial; Optuna's repeats it
    # Heartbeats and stale-trial retries are marked experimental since Optuna 2.8; they are what a killed worker needs.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


@contextmanager
def _study_lock(plan: SweepPlan):
    """One worker at a time creates the study and fills its queue (SQLite: a lock file beside the database)."""
    from filelock import FileLock

    plan.dir.mkdir(parents=True, exist_ok=True)
    with FileLock(plan.dir / ".study.lock"):
        yield


def open_study(plan: SweepPlan, cheap: bool) -> Any:
    optuna = _optuna()
    beat = max(1, round(plan.sweep.heartbeat_s))
    with _study_lock(plan):  # the first worker creates the database's tables
        storage = optuna.storages.RDBStorage(
            plan.storage_url,
            heartbeat_interval=beat,
            grace_period=3 * beat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
        )
        study = optuna.create_study(
            study_name=plan.study_name(cheap), storage=storage, directions=list(DIRECTIONS), load_if_exists=True
        )
        if not study.metric_names:
            study.set_metric_names(list(OBJECTIVES))
    return study


def enqueue_missing(plan: SweepPlan, study: Any, trials: list[Trial]) -> None:
    """Enqueue each trial the study has not finished, queued or running; one that a worker left (interrupted, or
    killed and found silent) is queued again. A trial that failed with an error stays failed: the report names it."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    with _study_lock(plan):
        optuna.storages.fail_stale_trials(study)
        seen: dict[str, set[Any]] = {}
        errored: set[str] = set()
        for frozen in study.get_trials(deepcopy=False):
            key = frozen.user_attrs.get(KEY)
            if key:
                seen.setdefault(key, set()).add(frozen.state)
                if frozen.state == state.FAIL and ERROR in frozen.user_attrs:
                    errored.add(key)
        for trial in trials:
            states = seen.get(trial.key, set())
            if states & {state.COMPLETE, state.WAITING, state.RUNNING} or trial.key in errored:
                continue
            study.enqueue_trial({}, user_attrs={KEY: trial.key, KNOBS: json.dumps(trial.knobs)}, skip_if_exists=False)


def work(plan: SweepPlan, study: Any, trials: list[Trial], run: Callable[[Trial], list[float]]) -> None:
    """Take queued trials until the queue is empty; `run` returns a trial's objectives."""
    optuna = _optuna()
    by_key = {trial.key: trial for trial in trials}

    def objective(optuna_trial: Any) -> list[float]:
        key = optuna_trial.user_attrs.get(KEY)
        if key is None:  # the queue emptied between this worker's look and its ask: nothing left to take
            optuna_trial.study.stop()
            raise optuna.TrialPruned()
        if key not in by_key:  # queued by an earlier version of the sweep's knobs
            raise optuna.TrialPruned()
        optuna_trial.set_user_attr(WORKER, f"{platform.node()}:{os.getpid()}")
        try:
            return run(by_key[key])
        except PipelineError as exc:
            optuna_trial.set_user_attr(ERROR, str(exc))
            log(f"sweep: trial {key} failed: {exc}")
            raise

    def stop_when_empty(study: Any, _: Any) -> None:
        if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            study.stop()

    enqueue_missing(plan, study, trials)
    if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        study.optimize(objective, catch=(PipelineError,), callbacks=[stop_when_empty], gc_after_trial=True)


def wait_until_settled(plan: SweepPlan, study: Any, trials: list[Trial], poll_s: float = 5.0) -> None:
    """Wait while other workers still run trials of `study` (the cheap rung must finish before its survivors are
    chosen); a silent worker's trial is taken over and run here."""
    optuna = _optuna()
    said = False
    while True:
        enqueue_missing(plan, study, trials)
        if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            work(plan, study, trials, _run_in(plan))
            continue
        running = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
        if not running:
            return
        if not said:
            log(f"sweep: waiting for {len(running)} trial(s) that other workers run")
            said = True
        time.sleep(poll_s)


def _run_in(plan: SweepPlan) -> Callable[[Trial], list[float]]:
    from pipeline.sweep.results import run_and_score

    return lambda trial: run_and_score(plan, trial)


def finished(study: Any) -> dict[str, Any]:
    """The latest complete trial of each key, as Optuna's FrozenTrial."""
    optuna = _optuna()
    done: dict[str, Any] = {}
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if KEY in frozen.user_attrs:
            done[frozen.user_attrs[KEY]] = frozen
    return done


def failed(study: Any) -> dict[str, str]:
    """Trials whose last attempt failed with an error, and the error."""
    optuna = _optuna()
    errors: dict[str, str] = {}
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        if ERROR in frozen.user_attrs:
            errors[frozen.user_attrs[KEY]] = frozen.user_attrs[ERROR]
    return errors


def pareto_keys(study: Any) -> set[str]:
    """The trials no other beats on every objective (Optuna's multi-objective best_trials)."""
    return {t.user_attrs[KEY] for t in study.best_trials if KEY in t.user_attrs}
