"""`distill status`: what each stage of a run has done, and what `distill run` would do next, without running
anything (a scheduled job's owner checks this before queueing hours of GPU time).

    distill status --config configs/smollm2_support.yaml [key=value ...]

Per stage, one of: `done` (its manifest matches the config and inputs: a run skips it), `stale` (it ran under
another config or on other inputs, and says which), `in progress` (a killed run's saved work under this
config: generated rows, a training checkpoint, benchmark units: a run resumes it), `not run`, or `after
<stage>` (an earlier stage will run first, so this one's inputs are not final; they are not read, and whether its
saved work, if any, still holds is judged when it runs).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pipeline.config import ExperimentConfig, resolved_dict
from pipeline.layout import FINISHED_UNITS, STAGES, partial_file
from pipeline.runs import FinishedUnits, Stage
from pipeline.tasks import Task, task_for


@dataclass(frozen=True)
class StageStatus:
    stage: str
    state: str  # done, stale, in progress, not run, after <stage>
    detail: str


def _stage(config: ExperimentConfig, task: Task, name: str) -> Stage:
    if name == "generate":
        from pipeline.generate.stage import generate_stage

        return generate_stage(config, task)
    if name == "filter":
        from pipeline.filter.stage import filter_stage

        return filter_stage(config, task)
    if name == "train":
        from pipeline.train.stage import train_stage

        return train_stage(config)
    from pipeline.benchmark.stage import benchmark_stage

    return benchmark_stage(config, task)


def run_status(config: ExperimentConfig) -> list[StageStatus]:
    """Each stage's state, in order; reads the run directory only."""
    from pipeline.train.stage import barely_moved  # the stage modules load on use, as the CLI's do

    task = task_for(config)
    statuses: list[StageStatus] = []
    waiting: str | None = None  # the first earlier stage that a run will redo
    for name in STAGES:
        if waiting:  # its inputs are not final: not hashed (a merged student can be gigabytes)
            statuses.append(StageStatus(name, f"after {waiting}", ""))
            continue
        stage = _stage(config, task, name)
        manifest = stage.manifest()
        if stage.is_fresh():
            verdict = _verdict(config) if name == "benchmark" else None
            statuses.append(StageStatus(name, "done", _finished(manifest) + (f"; {verdict}" if verdict else "")))
            continue
        moved = barely_moved(config, stage) if name == "train" else None
        if moved is not None:
            statuses.append(StageStatus(name, "done", f"{_finished(manifest)}; the data moved {moved:.1%}: kept"))
            continue
        saved = _saved_work(config, task, stage)
        if saved:
            state, detail = "in progress", f"{saved}; a run resumes it"
        elif manifest:
            state, detail = "stale", _why_stale(config, stage, manifest)
        else:
            state, detail = "not run", ""
        statuses.append(StageStatus(name, state, detail))
        waiting = name
    return statuses


def format_status(config: ExperimentConfig, statuses: list[StageStatus]) -> str:
    width = max(len(s.state) for s in statuses)
    lines = [f"run {config.run_dir}"]
    lines += [f"  {s.stage:<10} {s.state:<{width}}  {s.detail}".rstrip() for s in statuses]
    return "\n".join(lines)


def _finished(manifest: dict | None) -> str:
    if not manifest:
        return ""
    started = manifest.get("started_at", "")
    return f"{started.replace('T', ' ')}, {manifest.get('wall_s', 0):.0f} s"


def _verdict(config: ExperimentConfig) -> str | None:
    """The report's verdict, up to its dash ("Verdict: worth it")."""
    path = config.layout.report_md
    found = re.search(r"Verdict: [^—\n]*", path.read_text()) if path.is_file() else None
    return found.group(0).strip() if found else None


def _saved_work(config: ExperimentConfig, task: Task, stage: Stage) -> str | None:
    """What a killed run of this stage, under this same fingerprint, left for the next run to resume."""
    layout = config.layout
    if stage.name == "generate":
        partial = partial_file(layout.teacher_outputs)
        stamp = partial.with_suffix(".fingerprint")
        if partial.is_file() and stamp.is_file() and stamp.read_text() == stage.fingerprint:
            from pipeline.generate.stage import read_done, train_examples

            return f"{len(read_done(partial))} of {len(train_examples(task))} prompts answered"
    if stage.name == "train":
        stamp = layout.checkpoints / "fingerprint"
        steps = sorted(int(p.name.split("-")[1]) for p in layout.checkpoints.glob("checkpoint-*") if p.is_dir())
        if steps and stamp.is_file() and stamp.read_text() == stage.fingerprint:
            return f"checkpoint at step {steps[-1]}"
    if stage.name == "benchmark":
        units = FinishedUnits.read(stage.dir / FINISHED_UNITS, stage.fingerprint)
        if units:
            return f"saved: {FinishedUnits.describe(units)}"
    return None


def _why_stale(config: ExperimentConfig, stage: Stage, manifest: dict) -> str:
    """Which inputs and config sections differ from the manifest's; a run redoes the stage."""
    inputs = manifest.get("inputs", {})  # keyed by absolute path in older manifests
    changed = [
        f"input {_shown(config, name)}"
        for name, digest in stage.inputs.items()
        if inputs.get(name, inputs.get(str(config.run_dir / name))) != digest
    ]
    if "sections" in manifest:  # the fingerprint's own parts (newer manifests): "config replay"
        now = json.loads(json.dumps(stage.sections))
        changed += [f"config {key}" for key, value in now.items() if manifest["sections"].get(key) != value]
    else:
        before, now = manifest.get("config", {}), resolved_dict(config)
        changed += [f"config {key}" for key in stage.sections if key in now and before.get(key) != now[key]]
    missing = [rel for rel in manifest.get("outputs", {}) if not (stage.dir / rel).exists()]
    changed += [f"output {rel} missing" for rel in missing]
    when = manifest.get("started_at", "")
    at = f" (last run {datetime.fromisoformat(when):%Y-%m-%d %H:%M})" if when else ""
    return f"changed: {', '.join(changed) or 'a setting it derives, or the pipeline version'}{at}; a run redoes it"


def _shown(config: ExperimentConfig, path: str) -> str:
    """A path inside the run directory relative to it (`generate/teacher_outputs.jsonl`), others as they are."""
    try:
        return str(Path(path).relative_to(config.run_dir))
    except ValueError:
        return path
