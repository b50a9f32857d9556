"""The systems a benchmark compares (`benchmark.systems`): each a model, the prompt it gets, and whether it
takes the forgetting probe. Model roles ("teacher", "student", "tuned") resolve to folders here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline import names
from pipeline.config import ExperimentConfig
from pipeline.models import resolve_model
from pipeline.runs import PipelineError


@dataclass(frozen=True)
class System:
    name: str
    model: str  # resolved path or HF id
    prompt_style: str
    probe: bool  # students get the forgetting probe
    adapter: str | None = None  # a LoRA adapter served unmerged on top of `model`


def twins(systems: list[System]) -> dict[str, str]:
    """Systems that would be measured twice on the same weights with the same prompt: {later name: first name}.

    They are one system (in the embedded default the teacher and the prompted student are one model with one
    prompt), so the benchmark measures it once and copies its rows: two measurements differed only by noise
    (4.5% and 14.5% in cost per request in two demo runs), and cost the demo ~3 minutes."""
    first: dict[tuple[str, str | None, str], str] = {}
    copies = {}
    for system in systems:
        key = (system.model, system.adapter, system.prompt_style)
        if key in first:
            copies[system.name] = first[key]
        else:
            first[key] = system.name
    return copies


def copy_rows(records: list[dict], source: str, name: str, kinds: tuple[str, ...]) -> list[dict]:
    """`source`'s records of these kinds as `name`'s (marked `measured_as`), so every system's numbers still
    recompute from its own rows."""
    return [
        {**r, "system": name, "measured_as": source} for r in records if r["system"] == source and r["kind"] in kinds
    ]


def tuned_student_dir(config: ExperimentConfig) -> Path:
    """What the benchmark serves as the tuned student: the merged weights, or the adapter (`student_serving`)."""
    return config.layout.adapter if config.benchmark.student_serving == "lora" else config.layout.merged


def systems_for(config: ExperimentConfig) -> list[System]:
    """The systems of `benchmark.systems`, their model names resolved ("teacher", "student", "tuned")."""
    tuned = tuned_student_dir(config)
    lora = config.benchmark.student_serving == "lora"
    if lora and config.train.method == "full":
        raise PipelineError("benchmark.student_serving: lora needs an adapter; train.method is full")
    wants_tuned = any(s.model == names.TUNED_MODEL for s in config.benchmark.systems)
    if wants_tuned and lora and not (tuned / "adapter_config.json").exists():
        raise PipelineError(f"benchmark: no adapter at {tuned}; run train first")
    if wants_tuned and not lora and not (tuned / "config.json").exists():
        raise PipelineError(f"benchmark: no merged student at {tuned}; run train with train.merge=true")
    base_student = resolve_model(config.student.model)
    models = {names.TEACHER_MODEL: resolve_model(config.teacher.model), names.STUDENT_MODEL: base_student}
    systems = []
    for declared in config.benchmark.systems:
        adapter = None
        if declared.model == names.TUNED_MODEL:
            model, adapter = (base_student, str(tuned)) if lora else (str(tuned), None)
        else:
            model = models.get(declared.model) or resolve_model(declared.model)
        systems.append(System(declared.name, model, declared.prompt_style, declared.probe, adapter))
    return systems
