"""The systems a benchmark compares (`benchmark.systems`): each a model, the prompt it gets, the engine it runs
on, and whether it takes the forgetting probe. Model roles ("teacher", "student", "tuned") resolve to folders
here, or to a served name for a system measured through an OpenAI-compatible server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline import names
from pipeline.config import EngineConfig, ExperimentConfig, SystemConfig
from pipeline.console import PipelineError
from pipeline.engines import model_for
from pipeline.models import resolve_model
from pipeline.pruning import student_model_name
from pipeline.tasks import Task, task_for


@dataclass(frozen=True)
class System:
    name: str
    model: str  # resolved path or HF id
    prompt_style: str
    probe: bool  # students get the forgetting probe
    adapter: str | None = None  # a LoRA adapter served unmerged on top of `model`
    engine: EngineConfig | None = None  # None: benchmark.engine (see system_engine)
    constrained: bool = False  # its task answers constrained to the task's answer set, where it has one

    @property
    def on_server(self) -> bool:
        """Measured through an OpenAI-compatible server: its weights and machine are not here."""
        return self.engine is not None and self.engine.backend == "openai"


def twins(systems: list[System]) -> dict[str, str]:
    """Systems that would be measured twice on the same weights with the same prompt: {later name: first name}.

    They are one system (in the embedded default the teacher and the prompted student are one model with one
    prompt), so the benchmark measures it once and copies its rows: two measurements differ only by noise and
    cost minutes."""
    first: dict[tuple[str, str | None, str, str, bool], str] = {}
    copies = {}
    for system in systems:
        key = (system.model, system.adapter, system.prompt_style, engine_key(system.engine), system.constrained)
        if key in first:
            copies[system.name] = first[key]
        else:
            first[key] = system.name
    return copies


def engine_key(engine: EngineConfig | None) -> str:
    """Systems on equal engine settings (chat template included) can share an engine: one key for them."""
    return engine.model_dump_json() if engine is not None else ""


def copy_rows(records: list[dict], source: str, name: str, kinds: tuple[str, ...]) -> list[dict]:
    """`source`'s records of these kinds as `name`'s (marked `measured_as`), so every system's numbers still
    recompute from its own rows."""
    return [
        {**r, "system": name, "measured_as": source} for r in records if r["system"] == source and r["kind"] in kinds
    ]


def tuned_student_dir(config: ExperimentConfig) -> Path:
    """What the benchmark serves as the tuned student: the merged weights, or the adapter (`student_serving`)."""
    return config.layout.adapter if config.benchmark.student_serving == "lora" else config.layout.merged


def systems_for(config: ExperimentConfig, task: Task | None = None) -> list[System]:
    """The systems of `benchmark.systems`, their model names resolved ("teacher", "student", "tuned"), and
    whether each answers constrained to the task's answer set (`task`: the experiment's, built if not given)."""
    has_answer_set = (task or task_for(config)).answer_choices() is not None
    tuned = tuned_student_dir(config)
    lora = config.benchmark.student_serving == "lora"
    if lora and config.train.method == "full":
        raise PipelineError("benchmark.student_serving: lora needs an adapter; train.method is full")
    wants_tuned = any(s.model == names.TUNED_MODEL for s in config.benchmark.systems)
    if wants_tuned and lora and not (tuned / "adapter_config.json").exists():
        raise PipelineError(f"benchmark: no adapter at {tuned}; run train first")
    if wants_tuned and not lora and not (tuned / "config.json").exists():
        raise PipelineError(f"benchmark: no merged student at {tuned}; run train with train.merge=true")
    named = {names.TEACHER_MODEL: config.teacher.model, names.STUDENT_MODEL: student_model_name(config)}
    systems = []
    for declared in config.benchmark.systems:
        engine = system_engine(config, declared)
        constrained = has_answer_set and answers_constrained(config, declared)
        # A student pruned from the teacher is judged against what it replaces: the teacher takes the probe too.
        probe = declared.probe or (config.student.prune is not None and declared.model == names.TEACHER_MODEL)
        if engine.backend == "openai":
            if declared.price is None and declared.hardware is None:
                raise PipelineError(
                    f"benchmark.systems.{declared.name}: measured through a server, so it is priced by its `price` "
                    "(a hosted API's list price per token) or its `hardware` (the machine serving it); set one"
                )
            model = model_for(named.get(declared.model, declared.model), engine)  # the served name
            systems.append(
                System(declared.name, model, declared.prompt_style, probe, engine=engine, constrained=constrained)
            )
            continue
        adapter = None
        if declared.model == names.TUNED_MODEL:
            base_student = resolve_model(student_model_name(config))
            model, adapter = (base_student, str(tuned)) if lora else (str(tuned), None)
        else:
            model = resolve_model(named.get(declared.model, declared.model))
        systems.append(System(declared.name, model, declared.prompt_style, probe, adapter, engine, constrained))
    return systems


def answers_constrained(config: ExperimentConfig, declared: SystemConfig) -> bool:
    """Whether a system's task answers are constrained to the task's answer set: its own `constrained`, else the
    teacher's model as it generated the training data (constrained to a label task's labels: measured free, a
    teacher that taught well can score 0% and the verdict would say there was nothing to distill), else
    benchmark.constrained."""
    if declared.constrained is not None:
        return declared.constrained
    return declared.model == names.TEACHER_MODEL or config.benchmark.constrained


def system_engine(config: ExperimentConfig, declared: SystemConfig) -> EngineConfig:
    """Where a system runs: its own `engine`, else the teacher's server for a system on the teacher's model
    (a hosted or remote teacher may exist nowhere else), else benchmark.engine, with the teacher's chat template
    for a system on the teacher's model: it is measured as it generated (benchmark.engine.chat_template is the
    student's, which it trains with)."""
    if declared.engine is not None:
        return declared.engine
    teacher = config.teacher.engine
    if declared.model == names.TEACHER_MODEL and teacher.backend == "openai":
        return teacher
    if declared.model == names.TEACHER_MODEL and teacher.chat_template != config.benchmark.engine.chat_template:
        return config.benchmark.engine.model_copy(update={"chat_template": teacher.chat_template})
    return config.benchmark.engine
