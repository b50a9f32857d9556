"""Benchmark figures shared between runs (`benchmark.shared_units`): a sweep's trials differ in how the student is
made or trained, so the teacher and the untuned and prompted student are often the same in several. They are
measured by the first trial that needs them and read by the rest, from files named by a fingerprint of everything
they depend on: the config the benchmark reads (the seed, task, teacher, benchmark sections) and the task's data,
never the tuned student. The systems on the student's model also depend on the student section; the others (the
teacher, a hosted model) do not, so a sweep over student models or prune levels measures its teacher once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline import __version__, names
from pipeline.benchmark.systems import System, twins
from pipeline.config import SystemConfig
from pipeline.console import log
from pipeline.runs import FinishedUnits, Stage

SHARED_KINDS = ("offline", "load")  # a system's offline figures and its load test; not the judge or lm_eval


class SharedUnits(FinishedUnits):
    """A benchmark's finished units: those of the systems that do not serve the tuned student kept in a shared file
    (`shared`, by system name), the rest in the stage's own (FinishedUnits' interface)."""

    def __init__(self, own: FinishedUnits, shared: dict[str, FinishedUnits]) -> None:
        self.own, self.shared = own, shared
        found = sorted({unit for store in shared.values() for unit in store.values if self._is_shared(unit)})
        if found:
            log(f"benchmark: measured by an earlier run with the same settings: {FinishedUnits.describe(found)}")

    def _is_shared(self, unit: str) -> bool:
        kind, _, system = unit.partition(":")
        return kind in SHARED_KINDS and system in self.shared

    def _store(self, unit: str) -> FinishedUnits:
        return self.shared[unit.partition(":")[2]] if self._is_shared(unit) else self.own

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
    units: FinishedUnits,
    stage: Stage,
    folder: str,
    declared: list[SystemConfig],
    systems: list[System],
    tuned_input: str,
) -> FinishedUnits:
    """`units` with the untuned systems' units routed to files in `folder` (benchmark.shared_units)."""
    roles = {system.name: system.model for system in declared}
    copied_from = twins(systems)
    untuned = [system for system in systems if roles[system.name] != names.TUNED_MODEL]
    # A system measured as a copy of one on the student's model (twins) depends on the student as that one does.
    on_student = {s.name for s in untuned if names.STUDENT_MODEL in (roles[s.name], roles.get(copied_from.get(s.name)))}
    sections = json.loads(json.dumps(stage.sections))
    sections["benchmark"].pop("shared_units", None)
    inputs = sorted(digest for label, digest in stage.inputs.items() if label != tuned_input)
    with_student = _store(folder, sections, inputs)
    # Without the student section the teacher loses one dependency on it: a pruned student has the teacher probed.
    others = [s for s in untuned if s.name not in on_student]
    sections.pop("student")
    sections["probed"] = sorted(s.name for s in others if s.probe)
    without_student = _store(folder, sections, inputs)
    return SharedUnits(units, {s.name: with_student if s.name in on_student else without_student for s in untuned})


def _store(folder: str, sections: dict[str, Any], inputs: list[str]) -> FinishedUnits:
    payload = json.dumps({"sections": sections, "inputs": inputs, "version": __version__}, sort_keys=True)
    fingerprint = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return FinishedUnits.shared(Path(folder) / f"untuned-{fingerprint}.jsonl", fingerprint)
