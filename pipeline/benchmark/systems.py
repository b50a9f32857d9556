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
