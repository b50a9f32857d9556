"""A finished trial's figures, the bars it must clear (the verdict's own, `benchmark.verdict`), and the pick.

The pick: of the trials that clear every bar, those tied in accuracy with the most accurate (paired McNemar on the
same test examples, p >= benchmark.verdict.significance); among them the cheapest, where a cost within one load
test's noise of the cheapest (benchmark.verdict.min_serving_gain) counts as as cheap; then the one that forgets less.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msgspec import UNSET

from pipeline import names
from pipeline.benchmark.evaluate import task_outcomes
from pipeline.benchmark.results import ForgettingChange, Report, read_report
from pipeline.benchmark.stats import mcnemar
from pipeline.benchmark.verdict import cost
from pipeline.config import VerdictConfig
from pipeline.files import read_jsonl
from pipeline.layout import RunLayout, read_manifest
from pipeline.sweep.plan import SweepPlan, Trial

TIMED_STAGES = ("train", "benchmark")  # a trial's own work; generate and filter are shared


@dataclass
class Miss:
    """A bar a trial does not clear: the key that sets it, what was measured against it, and how far off it is."""

    bar: str
    said: str
    by: float | None  # how far off in the bar's unit (a share, a cost ratio), to rank the nearest; None: unmeasured


@dataclass
class TrialResult:
    trial: Trial
    run_dir: Path
    report: Report
    outcomes: dict[str, bool]  # the tuned student right or wrong per test example id
    seconds: float  # train + benchmark wall time of this trial (its shared stages are counted once, apart)
    misses: list[Miss] = field(default_factory=list)
    on_front: bool = False

    @property
    def tuned(self) -> Any:
        return self.report.systems[names.STUDENT_TUNED]

    @property
    def teacher(self) -> Any:
        return self.report.systems[names.TEACHER]

    @property
    def accuracy(self) -> float:
        return self.tuned.accuracy

    @property
    def cost(self) -> float:
        return cost(self.tuned)

    @property
    def cost_ratio(self) -> float:
        return cost(self.tuned) / cost(self.teacher)

    @property
    def probe_drop(self) -> float:
        """The larger fall in probe accuracy, against the untuned student and (a pruned student) the teacher."""
        return max((-(c.accuracy or 0.0) for c in _changes(self.report)), default=0.0)

    @property
    def leakage_rise(self) -> float:
        return max((c.leakage_rate or 0.0 for c in _changes(self.report)), default=0.0)

    def objectives(self) -> list[float]:
        """The study's objectives, in OBJECTIVES' order (study.py)."""
        return [self.accuracy, self.cost, self.probe_drop, self.leakage_rise]


def _changes(report: Report) -> list[ForgettingChange]:
    found = [report.forgetting.change, report.forgetting.change_vs_teacher]
    return [change for change in found if change not in (None, UNSET)]


def trial_result(plan: SweepPlan, trial: Trial) -> TrialResult:
    layout = RunLayout(plan.trials_dir / trial.key)
    report = read_report(layout.report_json)
    outcomes = task_outcomes(list(read_jsonl(layout.records)), names.STUDENT_TUNED) if layout.records.is_file() else {}
    seconds = sum((read_manifest(layout.stage_dir(stage)) or {}).get("wall_s", 0.0) for stage in TIMED_STAGES)
    result = TrialResult(trial, layout.root, report, outcomes, seconds)
    result.misses = bars_missed(result, plan.config.benchmark.verdict)
    return result


def run_and_score(plan: SweepPlan, trial: Trial) -> list[float]:
    """Run one trial (its finished stages are skipped) and return its objectives."""
    from pipeline.sweep.trial import run_trial

    run_trial(plan.trial_config(trial))
    return trial_result(plan, trial).objectives()


def bars_missed(result: TrialResult, rules: VerdictConfig) -> list[Miss]:
    """Each verdict bar the trial misses: the teacher's level, probe accuracy, leakage, serving cost."""
    misses = []
    teacher, tuned = result.teacher.accuracy, result.accuracy
    judged = result.report.judge.systems.get(names.STUDENT_TUNED) if result.report.judge else None
    versus = judged.vs_teacher if judged and judged.vs_teacher else None
    if teacher <= rules.min_teacher_accuracy:
        misses.append(
            Miss(
                "benchmark.verdict.min_teacher_accuracy", f"the teacher scores {teacher:.1%}, too low to measure", None
            )
        )
    elif versus is not None and versus.n:
        upper = versus.win_or_tie_ci95[1]
        if upper < 0.5:
            short = f"{(0.5 - upper) * 100:.0f} points under 50%"
            misses.append(Miss("judge", f"win + tie vs the teacher at most {upper:.0%}, {short}", 0.5 - upper))
    elif tuned / teacher < rules.min_kept_of_teacher:
        kept = tuned / teacher
        misses.append(
            Miss(
                "benchmark.verdict.min_kept_of_teacher",
                f"keeps {kept:.0%} of the teacher's accuracy, "
                f"{(rules.min_kept_of_teacher - kept) * 100:.0f} points under {rules.min_kept_of_teacher:.0%}",
                rules.min_kept_of_teacher - kept,
            )
        )
    limit = rules.max_probe_accuracy_drop
    if limit is not None and result.probe_drop > limit:
        misses.append(
            Miss(
                "benchmark.verdict.max_probe_accuracy_drop",
                f"probe accuracy fell {result.probe_drop * 100:.1f} points, "
                f"{(result.probe_drop - limit) * 100:.1f} more than the {limit * 100:g} allowed",
                result.probe_drop - limit,
            )
        )
    limit = rules.max_leakage_increase
    if limit is not None and result.leakage_rise > limit:
        misses.append(
            Miss(
                "benchmark.verdict.max_leakage_increase",
                f"leakage rose {result.leakage_rise * 100:.1f} points, "
                f"{(result.leakage_rise - limit) * 100:.1f} more than the {limit * 100:g} allowed",
                result.leakage_rise - limit,
            )
        )
    ceiling = 1 - rules.min_serving_gain
    if result.cost_ratio >= ceiling:
        misses.append(
            Miss(
                "benchmark.verdict.min_serving_gain",
                f"costs {result.cost_ratio:.2f}x the teacher, "
                f"{result.cost_ratio - ceiling:.2f}x over the {ceiling:.2f}x that counts as cheaper",
                result.cost_ratio - ceiling,
            )
        )
    return misses


def paired_p(first: TrialResult, other: TrialResult) -> float | None:
    """Exact McNemar p of two trials' tuned students on the test examples both answered; None without records."""
    shared = sorted(first.outcomes.keys() & other.outcomes.keys())
    if not shared:
        return None
    return float(mcnemar([first.outcomes[i] for i in shared], [other.outcomes[i] for i in shared])["p_value"])


@dataclass
class Pick:
    chosen: TrialResult | None
    sentence: str
    ranked: list[TrialResult]  # every trial, the pick's order: clearing first, then by how near they come


def _forgetting(result: TrialResult) -> tuple[float, float]:
    return (result.probe_drop, result.leakage_rise)


def pick(results: list[TrialResult], rules: VerdictConfig) -> Pick:
    clearing = [r for r in results if not r.misses]
    missing = sorted((r for r in results if r.misses), key=_nearness)
    if not clearing:
        return Pick(None, _none_clears(missing), missing)
    best = max(clearing, key=lambda r: r.accuracy)
    tied = [r for r in clearing if r is best or (paired_p(best, r) or 0.0) >= rules.significance]
    cheapest = min(r.cost for r in tied)
    as_cheap = [r for r in tied if r.cost * (1 - rules.min_serving_gain) <= cheapest]
    order = sorted(as_cheap, key=lambda r: (_forgetting(r), -r.accuracy, r.cost))
    chosen = order[0]
    rest = sorted(
        (r for r in clearing if r is not chosen),
        key=lambda r: (r not in tied, r not in as_cheap, _forgetting(r), -r.accuracy, r.cost),
    )
    sentence = _why(chosen, rest[0] if rest else None, best, tied, as_cheap, rules, missing)
    return Pick(chosen, sentence, [chosen, *rest, *missing])


def _nearness(result: TrialResult) -> tuple[int, float]:
    return (len(result.misses), sum(m.by if m.by is not None else 1.0 for m in result.misses))


def _name(result: TrialResult) -> str:
    return f"`{result.trial.key}` ({result.trial.described()})"


def _why(
    chosen: TrialResult,
    rival: TrialResult | None,
    best: TrialResult,
    tied: list[TrialResult],
    as_cheap: list[TrialResult],
    rules: VerdictConfig,
    missing: list[TrialResult],
) -> str:
    head = f"Picked {_name(chosen)}: it clears every bar"
    if rival is None:
        if not missing:
            return f"{head}, the only trial run."
        near = missing[0]
        return f"{head}, the only trial that does; the nearest other, {_name(near)}, {_missed(near)}."
    p = paired_p(chosen, rival)
    p_said = f"McNemar p = {p:.2g}" if p is not None else "no paired records"
    if rival not in tied:
        return (
            f"{head} and is the most accurate that does; the next, {_name(rival)}, is less accurate "
            f"({rival.accuracy:.3f} vs {chosen.accuracy:.3f}, {p_said})."
        )
    if rival not in as_cheap:
        return (
            f"{head} and is as accurate as {_name(rival)} ({chosen.accuracy:.3f} vs {rival.accuracy:.3f}, {p_said}) "
            f"at {chosen.cost / rival.cost:.2f}x its serving cost."
        )
    forgot = (
        f"probe {-chosen.probe_drop * 100:+.1f} vs {-rival.probe_drop * 100:+.1f} points, leakage "
        f"{chosen.leakage_rise * 100:+.1f} vs {rival.leakage_rise * 100:+.1f}"
    )
    if _forgetting(chosen) < _forgetting(rival):
        return (
            f"{head}, is as accurate as {_name(rival)} ({p_said}) at a cost within one load test's noise of it "
            f"({chosen.cost / rival.cost:.2f}x, benchmark.verdict.min_serving_gain), and forgets less ({forgot})."
        )
    return (
        f"{head} and ties {_name(rival)} on accuracy ({p_said}), cost within noise ({chosen.cost / rival.cost:.2f}x) "
        f"and forgetting ({forgot}); it is ahead on accuracy or cost by a margin no test separates."
    )


def _missed(result: TrialResult) -> str:
    return "misses " + "; ".join(f"{m.bar} ({m.said})" for m in result.misses)


def _none_clears(ranked: list[TrialResult]) -> str:
    if not ranked:
        return "No trial has finished."
    nearest = "; ".join(f"{_name(r)} {_missed(r)}" for r in ranked[:3])
    return f"No trial clears every bar. The nearest: {nearest}."
