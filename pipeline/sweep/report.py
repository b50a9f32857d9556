"""The sweep's report: every trial's knobs and figures, the Pareto front, the pick and why (report.md, report.json,
pareto.png in the sweep's folder), and one W&B run of the sweep in the trials' group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from pipeline.benchmark.report import interval_text
from pipeline.config import VerdictConfig
from pipeline.files import write_json, write_text
from pipeline.sweep.plan import SweepPlan
from pipeline.sweep.results import Pick, TrialResult


class TrialRow(msgspec.Struct, kw_only=True):
    key: str
    knobs: dict[str, Any]
    cheap: bool
    run_dir: str
    accuracy: float
    accuracy_ci95: list[float] | None
    kept_of_teacher: float
    cost: float  # $ per 1k requests where the load test ran, else $ per 1M output tokens
    cost_ratio: float  # over the teacher's
    probe_drop: float
    leakage_rise: float
    train_benchmark_s: float
    on_front: bool
    bars_missed: list[str]


class SweepReport(msgspec.Struct, kw_only=True):
    name: str
    search: str
    storage: str
    knobs: dict[str, list[Any]]
    bars: dict[str, Any]  # benchmark.verdict, the rules every trial is held to
    trials: list[TrialRow]  # in full: the pick's order
    cheap_trials: list[TrialRow] = []  # successive halving's first rung
    survivors: list[str] = []  # the cheap rung's trials run in full
    failed: dict[str, str] = {}  # trial: the error it stopped with
    pick: str | None = None
    why: str = ""
    promote: str | None = None  # the command that promotes the pick
    seconds: dict[str, float] = {}  # train + benchmark time: cheap rung, full rung, total


def row(result: TrialResult) -> TrialRow:
    return TrialRow(
        key=result.trial.key,
        knobs=result.trial.knobs,
        cheap=result.trial.cheap,
        run_dir=str(result.run_dir),
        accuracy=result.accuracy,
        accuracy_ci95=list(result.tuned.accuracy_ci95) if result.tuned.accuracy_ci95 else None,
        kept_of_teacher=result.accuracy / result.teacher.accuracy if result.teacher.accuracy else float("nan"),
        cost=result.cost,
        cost_ratio=result.cost_ratio,
        probe_drop=result.probe_drop,
        leakage_rise=result.leakage_rise,
        train_benchmark_s=round(result.seconds, 1),
        on_front=result.on_front,
        bars_missed=[f"{m.bar}: {m.said}" for m in result.misses],
    )


def write_sweep_report(
    plan: SweepPlan,
    picked: Pick,
    cheap: list[TrialResult],
    survivors: list[str],
    failed: dict[str, str],
) -> SweepReport:
    full = [row(result) for result in picked.ranked]
    cheap_rows = [row(result) for result in cheap]
    seconds = {"cheap": sum(r.train_benchmark_s for r in cheap_rows), "full": sum(r.train_benchmark_s for r in full)}
    seconds["total"] = seconds["cheap"] + seconds["full"]
    report = SweepReport(
        name=plan.name,
        search=plan.sweep.search,
        storage=plan.storage_url,
        knobs=plan.sweep.knobs,
        bars=plan.config.benchmark.verdict.model_dump(),
        trials=full,
        cheap_trials=cheap_rows,
        survivors=survivors,
        failed=failed,
        pick=picked.chosen.trial.key if picked.chosen else None,
        why=picked.sentence,
        promote=plan.command("promote", picked.chosen.trial) if picked.chosen else None,
        seconds={k: round(v, 1) for k, v in seconds.items()},
    )
    plan.dir.mkdir(parents=True, exist_ok=True)
    write_json(plan.dir / "report.json", msgspec.to_builtins(report))
    pareto = draw_pareto(report, plan.dir / "pareto.png")
    write_text(plan.dir / "report.md", markdown(report, plan.config.benchmark.verdict, pareto.name))
    track(plan, report)
    return report


TRACKED_COLUMNS = ("accuracy", "kept_of_teacher", "cost_ratio", "probe_drop", "leakage_rise", "train_benchmark_s")


def track(plan: SweepPlan, report: SweepReport) -> None:
    """The sweep as one W&B run in the trials' group: every trial's knobs and figures as a table, the pick."""
    from pipeline.tracking import start_tracking

    config = plan.config.model_copy(update={"run_name": plan.name, "runs_dir": str(plan.dir.parent)})
    tracker = start_tracking(config, "sweep")
    knobs = list(report.knobs)
    rows = [
        [r.key, r.cheap, *(json.dumps(r.knobs.get(k)) for k in knobs), *(getattr(r, c) for c in TRACKED_COLUMNS)]
        + [r.on_front, r.key == report.pick]
        for r in [*report.trials, *report.cheap_trials]
    ]
    tracker.table("trials", ["trial", "cheap", *knobs, *TRACKED_COLUMNS, "on_front", "pick"], rows)
    tracker.summary(
        {"pick": report.pick or "", "why": report.why, **{f"seconds_{k}": v for k, v in report.seconds.items()}}
    )
    tracker.finish()


def markdown(report: SweepReport, rules: VerdictConfig, plot: str) -> str:
    lines = [f"# Sweep `{report.name}`: {len(report.trials)} recipes in full, search {report.search}", ""]
    lines += [report.why, ""]
    if report.promote:
        lines += ["Promote it:", "", "```bash", report.promote, "```", ""]
    lines += [
        "The bars are the verdict's own (benchmark.verdict): the tuned student keeps "
        f"{rules.min_kept_of_teacher:.0%} of the teacher's accuracy, probe accuracy falls at most "
        f"{_points(rules.max_probe_accuracy_drop)}, leakage rises at most {_points(rules.max_leakage_increase)}, "
        f"and serving costs under {1 - rules.min_serving_gain:.2f}x the teacher. Accuracy ties are paired McNemar "
        f"p >= {rules.significance}.",
        "",
        f"![accuracy against cost]({plot})",
        "",
        *_table(report.trials, report.knobs),
        "",
    ]
    if report.cheap_trials:
        lines += [
            f"Successive halving: every recipe first at the cheap fidelity; {len(report.survivors)} of "
            f"{len(report.cheap_trials)} went on in full.",
            "",
            *_table(report.cheap_trials, report.knobs),
            "",
        ]
    for key, error in report.failed.items():
        lines.append(f"- `{key}` failed: {error}")
    seconds = report.seconds
    lines.append(
        f"Train + benchmark time: {seconds.get('total', 0):.0f} s"
        + (f" ({seconds['cheap']:.0f} s cheap rung, {seconds['full']:.0f} s in full)" if report.cheap_trials else "")
        + "; the teacher generation and each filter setting ran once, shared by the trials."
    )
    return "\n".join(lines) + "\n"


def _points(share: float | None) -> str:
    return "without limit" if share is None else f"{share * 100:g} points"


def _table(rows: list[TrialRow], knobs: dict[str, list[Any]]) -> list[str]:
    names = list(knobs)
    header = ["trial", *names, "accuracy [95% CI]", "kept", "cost", "vs teacher", "probe", "leakage", "s", "front"]
    lines = ["| " + " | ".join(header) + " | bars missed |", "|" + "---|" * (len(header) + 1)]
    for r in rows:
        cells = [
            f"`{r.key}`",
            *(f"{r.knobs.get(name)}" for name in names),
            f"{r.accuracy:.3f}{interval_text(r.accuracy_ci95)}",
            "-" if r.kept_of_teacher != r.kept_of_teacher else f"{r.kept_of_teacher:.0%}",
            f"{r.cost:.4f}",
            f"{r.cost_ratio:.2f}x",
            f"{-r.probe_drop * 100:+.1f}",
            f"{r.leakage_rise * 100:+.1f}",
            f"{r.train_benchmark_s:.0f}",
            "yes" if r.on_front else "",
            "; ".join(r.bars_missed) or "none",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def draw_pareto(report: SweepReport, path: Path) -> Path:
    """Accuracy against serving cost, one point per trial with its 95% interval, probe accuracy lost as colour,
    the Pareto front ringed and the pick starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rows = report.trials
    if rows:
        xs, ys = [r.cost_ratio for r in rows], [r.accuracy for r in rows]
        low = [r.accuracy - (r.accuracy_ci95 or [r.accuracy])[0] for r in rows]
        high = [(r.accuracy_ci95 or [0, r.accuracy])[1] - r.accuracy for r in rows]
        ax.errorbar(xs, ys, yerr=[low, high], fmt="none", ecolor="0.7", zorder=1)
        drops = [r.probe_drop * 100 for r in rows]
        points = ax.scatter(xs, ys, c=drops, cmap="viridis_r", s=60, zorder=2)
        fig.colorbar(points, ax=ax, label="probe accuracy lost (points)")
        front = [r for r in rows if r.on_front]
        ax.scatter(
            [r.cost_ratio for r in front],
            [r.accuracy for r in front],
            s=160,
            facecolors="none",
            edgecolors="black",
            label="Pareto front",
            zorder=3,
        )
        for r in rows:
            if r.key == report.pick:
                ax.scatter([r.cost_ratio], [r.accuracy], marker="*", s=320, color="tab:red", label="pick", zorder=4)
            ax.annotate(
                r.key.rsplit("-", 1)[0],
                (r.cost_ratio, r.accuracy),
                fontsize=6,
                xytext=(4, 4),
                textcoords="offset points",
            )
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("serving cost over the teacher's")
    ax.set_ylabel("tuned student's accuracy")
    ax.set_title(f"Sweep {report.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
