"""`distill compare`: finished runs side by side, how each student was trained and what its benchmark measured.

distill compare runs/sft runs/kd
"""

from __future__ import annotations

from pathlib import Path

from msgspec import UNSET

from pipeline import names
from pipeline.benchmark.evaluate import task_outcomes
from pipeline.benchmark.report import interval_text
from pipeline.benchmark.results import SystemResult, present_or, read_report
from pipeline.benchmark.stats import mcnemar
from pipeline.benchmark.verdict import latency_p50
from pipeline.console import PipelineError
from pipeline.files import read_jsonl
from pipeline.layout import RunLayout, read_manifest

NAN = float("nan")


def compare_runs(run_dirs: list[Path]) -> str:
    """A markdown table of finished runs side by side (`distill compare runs/a runs/b`): how each student was
    trained (objective, method, rank, learning rate, epochs, packing, replay fraction, the prompt it trained and
    serves with: the knobs the verdict names against forgetting), and what
    the benchmark measured for it against its teacher and untuned base, with an exact McNemar test of its test
    answers against the first run's where both kept records.jsonl (the same test examples, paired)."""
    header = (
        "| run | objective | method | LoRA r | lr | epochs | packing | replay | prompt | steps | train s | tuned acc "
        "| vs base "
        "| kept of teacher | p50 vs teacher | $/1M out | probe acc change | leakage change | $/1k req "
        "| p vs first run | tuned failure modes |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    labels = [run_dir.name for run_dir in run_dirs]
    if len(set(labels)) < len(labels):  # one run name from several runs folders: the folders as given
        labels = [str(run_dir) for run_dir in run_dirs]
    first: dict[str, bool] | None = None
    for index, (run_dir, label) in enumerate(zip(run_dirs, labels, strict=True)):
        layout = RunLayout(run_dir)
        for path in (layout.report_json, layout.manifest("train")):
            if not path.is_file():
                raise PipelineError(f"{path}: not found; compare takes run folders whose benchmark has run")
        report, train = read_report(layout.report_json), read_manifest(layout.stage_dir("train"))
        config, metrics = train["config"]["train"], train["metrics"]
        prompt = train["config"].get("student", {}).get("prompt_style") or "-"
        systems = report.systems
        teacher, base, tuned = systems[names.TEACHER], systems[names.STUDENT_BASE], systems[names.STUDENT_TUNED]
        change = report.forgetting.change
        probe_change = present_or(change.accuracy, NAN) if change else NAN
        leakage_change = present_or(change.leakage_rate, NAN) if change else NAN
        kept = tuned.accuracy / teacher.accuracy if teacher.accuracy else NAN
        outcomes = _tuned_outcomes(layout.records)
        if index == 0:
            first, versus_first = outcomes, "-"
        else:
            versus_first = _paired_p(first, outcomes)
        per_request = tuned.cost_per_1k_requests
        lines.append(
            f"| {label} | {config.get('objective', 'sft')} | {config.get('method', 'lora')} "
            f"| {config['lora']['r']} | {_number(config.get('learning_rate'))} "
            f"| {_number(config.get('num_train_epochs'))} | {config.get('packing', False)} "
            f"| {config.get('replay', {}).get('fraction', 0):g} | {prompt} | {metrics.get('steps')} "
            f"| {metrics.get('train_runtime_s', NAN):.0f} | {tuned.accuracy:.3f}{interval_text(tuned.accuracy_ci95)} "
            f"| {tuned.accuracy - base.accuracy:+.3f} | {kept:.0%} "
            f"| {latency_p50(tuned) / latency_p50(teacher):.2f}x | {tuned.cost_per_1m_output_tokens:.3f} "
            f"| {probe_change:+.3f} | {leakage_change:+.3f} "
            f"| {'-' if per_request in (None, UNSET) else f'{per_request:.4f}'} | {versus_first} "
            f"| {_failure_summary(tuned)} |"
        )
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _failure_summary(system: SystemResult) -> str:
    """`wrong_kb_article 65%, truncated 3%`: the failure modes a system showed, most frequent first."""
    rates = sorted(((rate, mode) for mode, rate in (system.failure_rates or {}).items() if rate > 0), reverse=True)
    return ", ".join(f"{mode} {rate:.0%}" for rate, mode in rates) or "-"


def _tuned_outcomes(records: Path) -> dict[str, bool] | None:
    """The tuned student's right/wrong per test example id from a run's records.jsonl; None without one."""
    if not records.is_file():
        return None
    return task_outcomes(list(read_jsonl(records)), names.STUDENT_TUNED)


def _paired_p(first: dict[str, bool] | None, other: dict[str, bool] | None) -> str:
    """Exact McNemar p of two runs' tuned students on the test examples both answered; "-" without records."""
    if not first or not other:
        return "-"
    shared = sorted(first.keys() & other.keys())
    if not shared:
        return "-"
    return f"{mcnemar([other[i] for i in shared], [first[i] for i in shared])['p_value']:.3g}"
