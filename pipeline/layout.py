"""Where every file of a run lives: `<runs_dir>/<run_name>/<stage>/<file>`, named once, here.

    layout = config.layout                 # or RunLayout(Path("runs/smollm2-support")) for a finished run
    layout.teacher_outputs                 # runs/smollm2-support/generate/teacher_outputs.jsonl
    read_manifest(layout.stage_dir("train"))

Stage code, the report, promotion, tracking and scripts all take their paths from here, so renaming a file
or moving a folder is a change to this module only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGES = ("generate", "filter", "train", "benchmark")
MANIFEST = "manifest.json"
FINISHED_UNITS = "finished_units.jsonl"  # a stage's work done so far, while it runs (runs.FinishedUnits)
LOCK = ".lock"


@dataclass(frozen=True)
class RunLayout:
    root: Path  # the run directory, runs_dir / run_name

    def stage_dir(self, stage: str) -> Path:
        """A stage's folder; a shard's folder is `generate/shards/<i>-of-<n>` (see `shard_name`)."""
        return self.root / stage

    def manifest(self, stage: str) -> Path:
        return self.stage_dir(stage) / MANIFEST

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    # generate
    @staticmethod
    def shard_name(index: int, count: int) -> str:
        return f"generate/shards/{index:05d}-of-{count:05d}"

    @property
    def shards(self) -> Path:
        return self.stage_dir("generate") / "shards"

    @property
    def teacher_outputs(self) -> Path:
        return self.stage_dir("generate") / TEACHER_OUTPUTS

    # the student derived from the teacher (student.prune), made once before the stages that load the student
    @property
    def pruned_student(self) -> Path:
        return self.stage_dir("student") / "model"

    # filter
    @property
    def train_data(self) -> Path:
        return self.stage_dir("filter") / "train.jsonl"

    @property
    def val_data(self) -> Path:
        return self.stage_dir("filter") / "val.jsonl"

    @property
    def drops(self) -> Path:
        return self.stage_dir("filter") / "drops.jsonl"

    @property
    def filter_report(self) -> Path:
        return self.stage_dir("filter") / "filter_report.json"

    @property
    def dataset_card(self) -> Path:
        return self.stage_dir("filter") / "DATASET.md"

    @property
    def length_histogram(self) -> Path:
        return self.stage_dir("filter") / "response_lengths.png"

    # train
    @property
    def adapter(self) -> Path:
        return self.stage_dir("train") / "adapter"

    @property
    def merged(self) -> Path:
        return self.stage_dir("train") / "merged"

    @property
    def checkpoints(self) -> Path:
        return self.stage_dir("train") / "checkpoints"

    @property
    def train_metrics(self) -> Path:
        return self.stage_dir("train") / "train_metrics.json"

    @property
    def data_keys(self) -> Path:
        """A hash per training example, to measure how far the data moved between scheduled runs."""
        return self.stage_dir("train") / "data_keys.json"

    @property
    def student_artifact(self) -> list[Path]:
        """What the student's W&B Artifact holds: the adapter (the full weights when there is none), metrics."""
        return [self.adapter if self.adapter.is_dir() else self.merged, self.train_metrics]

    # benchmark
    @property
    def report_json(self) -> Path:
        return self.stage_dir("benchmark") / "report.json"

    @property
    def report_md(self) -> Path:
        return self.stage_dir("benchmark") / "report.md"

    @property
    def records(self) -> Path:
        return self.stage_dir("benchmark") / "records.jsonl"


TEACHER_OUTPUTS = "teacher_outputs.jsonl"  # also the file name inside each shard's folder


def partial_file(output: Path) -> Path:
    """Where rows are appended while `output` is being written (`x.jsonl` -> `x.partial.jsonl`)."""
    return output.with_name(f"{output.stem}.partial{output.suffix}")


def read_filter_report(layout: RunLayout) -> dict[str, Any] | None:
    """The filter stage's filter_report.json (what it kept and dropped, the teacher's verified share); None where the
    filter did not run here."""
    path = layout.filter_report
    return json.loads(path.read_text()) if path.is_file() else None


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    """A finished stage's manifest (fingerprint, resolved config, versions, wall time, metrics); None if absent."""
    path = stage_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
