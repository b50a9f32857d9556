"""Benchmark figures shared between runs (`benchmark.shared_units`): a sweep's trials differ in how the student is
trained, so the teacher and the untuned and prompted student are the same in each. They are measured by the first
trial and read by the rest, from a file named by a fingerprint of everything those systems depend on: the config the
benchmark reads (the seed, task, teacher, student, benchmark sections) and the task's data, not the tuned student."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline import __version__, names
from pipeline.console import log
from pipeline.runs import FinishedUnits, Stage

SHARED_KINDS = ("offline", "load")  # a system's offline figures and its load test; not the judge or lm_eval


class SharedUnits(FinishedUnits):
    """A benchmark's finished units, those of the systems that do not serve the tuned student kept in the shared
    file, the rest in the stage's own (FinishedUnits' interface)."""

    def __init__(self, own: FinishedUnits, shared: FinishedUnits, untuned: set[str]) -> None:
        self.own, self.shared, self.untuned = own, shared, untuned
        found = [unit for unit in shared.values if self._is_shared(unit)]
        if found:
            log(f"benchmark: measured by an earlier run with the same settings: {FinishedUnits.describe(found)}")

    def _is_shared(self, unit: str) -> bool:
        kind, _, system = unit.partition(":")
        return kind in SHARED_KINDS and system in self.untuned

    def _store(self, unit: str) -> FinishedUnits:
        return self.shared if self._is_shared(unit) else self.own

    def __contains__(self, unit: str) -> bool:
        return unit in self._store(unit)

    def get(self, unit: str) -> Any:
        return self._store(unit).get(unit)

    def save(self, unit: str, value: Any) -> None:
        self._store(unit).save(unit, value)

    def run(self, unit: str, compute: Any) -> Any:
        return self._store(unit).run(unit, compute)

    def clear(self) -> None:
        self.own.clear()


def with_shared_units(
    units: FinishedUnits, stage: Stage, folder: str, untuned: set[str], tuned_input: str
) -> FinishedUnits:
    """`units` with the untuned systems' units routed to `folder` (benchmark.shared_units)."""
    sections = json.loads(json.dumps(stage.sections))
    sections["benchmark"].pop("shared_units", None)
    inputs = {label: digest for label, digest in stage.inputs.items() if label != tuned_input}
    payload = json.dumps(
        {"sections": sections, "inputs": sorted(inputs.values()), "version": __version__}, sort_keys=True
    )
    fingerprint = hashlib.sha256(payload.encode()).hexdigest()[:16]
    path = Path(folder) / f"untuned-{fingerprint}.jsonl"
    return SharedUnits(units, FinishedUnits.shared(path, fingerprint), untuned)


def untuned_systems(declared: list[Any]) -> set[str]:
    """The benchmark systems that do not serve the tuned student."""
    return {system.name for system in declared if system.model != names.TUNED_MODEL}
