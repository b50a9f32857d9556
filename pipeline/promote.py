"""After the benchmark: promote the tuned student to a stable folder, only if it clears the gate.

    distill promote --config configs/smollm2_support.yaml

The gate's rules (`promote:` in the config) compare the new benchmark report with the report of the
student promoted before it: accuracy may not fall more than `max_accuracy_drop`, p95 latency stays under a
ceiling, and the student may not have regressed on base capabilities (probe accuracy down, leakage up) by the
rules the report's verdict applies (`benchmark.verdict`). A refusal exits with code 3 and one line
per failed rule, so a scheduler can alert on it; nothing in the target changes. A promotion swaps the whole folder
at once (weights, adapter, report, provenance), keeping the previous one as `<target>.previous`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from pipeline import names
from pipeline.benchmark.results import Report, SystemResult, read_report
from pipeline.benchmark.verdict import all_regressions, lowest_load_level
from pipeline.config import ExperimentConfig, PromoteConfig, VerdictConfig
from pipeline.console import PipelineError, log
from pipeline.files import sha256_tree, write_json
from pipeline.layout import read_manifest
from pipeline.tracking import artifact_name, start_tracking, tracking_enabled

PROMOTED_REPORT = "report.json"


class PromotionRefused(PipelineError):
    """The tuned student did not clear the gate (exit code 3)."""


def target_dir(config: ExperimentConfig) -> Path:
    target = Path(config.promote.target)
    return target if target.is_absolute() else Path.cwd() / target


def gate(rules: PromoteConfig, forgetting_rules: VerdictConfig, report: Report, current: Report | None) -> list[str]:
    """The failed rules, each as one readable line; empty when the student may be promoted. Forgetting is judged
    by `forgetting_rules` (benchmark.verdict), as the report's verdict judges it."""
    tuned = report.systems[names.STUDENT_TUNED]
    failures = []
    if current is not None:
        promoted = current.systems[names.STUDENT_TUNED].accuracy
        floor = promoted - rules.max_accuracy_drop
        if tuned.accuracy < floor:
            failures.append(
                f"accuracy {tuned.accuracy:.3f} < {floor:.3f} (the promoted student's "
                f"{promoted:.3f} minus {rules.max_accuracy_drop})"
            )
    if rules.min_accuracy is not None and tuned.accuracy < rules.min_accuracy:
        failures.append(f"accuracy {tuned.accuracy:.3f} < min_accuracy {rules.min_accuracy}")
    failures += all_regressions(report, forgetting_rules)
    p95, measured = latency_p95(tuned)
    if rules.max_latency_p95_s is not None and p95 > rules.max_latency_p95_s:
        failures.append(f"latency p95 {p95:.2f} s ({measured}) > max_latency_p95_s {rules.max_latency_p95_s}")
    return failures


def latency_p95(system: SystemResult) -> tuple[float, str]:
    """End-to-end p95 through the server at its lowest concurrency (what one user waits), where the benchmark
    ran a load test; else the offline one-at-a-time p95."""
    lowest = lowest_load_level(system)
    if lowest:
        level, summary = lowest
        return summary.e2e_p95_s, f"through vllm serve at concurrency {level}"
    return system.latency_p95_s, "offline engine, one request at a time"


def run_promote(config: ExperimentConfig, force: bool = False) -> Path:
    """Copy the tuned student and its report to `promote.target` if it clears the gate (force: skip the gate)."""
    layout = config.layout
    report_path = layout.report_json
    if not report_path.is_file():
        raise PipelineError(f"input file not found: {report_path} (run benchmark first)")
    report = read_report(report_path)
    target = target_dir(config)
    current_path = target / PROMOTED_REPORT
    current = read_report(current_path) if current_path.is_file() else None
    if current == report and not force:  # a night on which nothing changed
        log(f"promote: skipped, {config.run_name} is already the promoted student ({target})")
        return target
    failures = gate(config.promote, config.benchmark.verdict, report, current)
    if failures and not force:
        raise PromotionRefused("promotion refused: " + "; ".join(failures))
    parts = [p for p in (layout.merged, layout.adapter) if p.is_dir()]
    if not parts:
        raise PipelineError(f"input file not found: {layout.adapter} (run train first)")

    staging = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for part in parts:
        shutil.copytree(part, staging / part.name)
    shutil.copy2(report_path, staging / PROMOTED_REPORT)
    provenance = {
        "run_name": config.run_name,
        "run_dir": str(config.run_dir),
        "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "forced_past": failures,
        "replaces": current.run_name or None if current else None,
        "hashes": {part.name: sha256_tree(staging / part.name) for part in parts},
    }
    write_json(staging / "promotion.json", provenance)
    previous = target.with_name(f"{target.name}.previous")
    if target.exists():
        shutil.rmtree(previous, ignore_errors=True)
        target.rename(previous)
    staging.rename(target)
    log(f"promote: {config.run_name} promoted to {target}" + (f" (gate forced past: {failures})" if failures else ""))
    _alias_student_artifact(config)
    return target


def _alias_student_artifact(config: ExperimentConfig) -> None:
    """Give the promoted student's W&B Artifact the `promote.wandb_alias` alias, so serving can pull
    `<run>-student:promoted`. The files are the train stage's, so W&B attaches the alias to its version."""
    if not (config.promote.wandb_alias and config.tracking.artifacts and tracking_enabled(config)):
        return
    manifest = read_manifest(config.layout.stage_dir("train"))
    if manifest is None:
        log(f"promote: no W&B alias, {config.layout.manifest('train')} is missing (a train stage run elsewhere?)")
        return
    tracker = start_tracking(config, "promote")
    try:
        paths = config.layout.student_artifact
        tracker.artifact(config, "train", manifest["fingerprint"], paths, aliases=(config.promote.wandb_alias,))
    finally:
        tracker.finish()
    log(f"promote: W&B artifact {artifact_name(config, 'train')}:{config.promote.wandb_alias}")
