"""The experiment: one YAML per run, its top-level keys, loading with `key=value` overrides, and validation.

Every error names the offending key, e.g. `train.learning_rate: Input should be a valid number`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline import names
from pipeline.config.base import ConfigError, StrictModel
from pipeline.config.benchmark import BenchmarkConfig, PromoteConfig
from pipeline.config.engine import EngineConfig, SamplingConfig
from pipeline.config.filter import FilterConfig
from pipeline.config.sweep import SweepConfig
from pipeline.config.train import TrainConfig
from pipeline.layout import RunLayout


class TaskConfig(StrictModel):
    """The task: its data splits, prompts and scorer (pipeline/tasks/)."""

    name: str = Field(
        description="A registered task (support, classification, exact_answer, chat) or package.module:ClassName."
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="The task's own parameters: its data file, columns, few_shot, rubric, ..."
    )


class RayConfig(StrictModel):
    """Multi-node generation: `workers` shards run as Ray tasks, then merge (see `distill generate --shard`)."""

    workers: int = Field(0, ge=0, description="Shards run as Ray tasks, one engine each; 0: no Ray.")
    address: str | None = Field(
        None, description="null: start Ray here, on one machine; auto or ray://host:port: join a cluster."
    )
    gpus_per_worker: float = Field(1.0, ge=0, description="GPUs each worker holds; 0 on a CPU-only cluster.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker holds.")


class TeacherConfig(StrictModel):
    """The model whose answers become the training data, and how it is run."""

    model: str = Field(description="A model folder, an HF id, a bundled:<name> model, or a server's model name.")
    prompt_style: str = Field("full", description="The task's prompt style the teacher is asked with.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="How the teacher is run.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="How the teacher answers.")
    chunk_size: int = Field(64, ge=1, description="Prompts per resumable chunk of the generate stage.")
    on_prompt_error: Literal["skip", "fail"] = Field(
        "skip",
        description="A prompt the engine cannot answer: skip records it with its error and goes on; fail stops.",
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="Multi-node generation with Ray.")


class PruneConfig(StrictModel):
    """A student derived from the teacher's weights by dropping whole decoder layers: those whose output least
    changes their input on calibration prompts (block influence, 1 - cosine of a layer's input and output hidden
    states: ShortGPT). The pruned model shares the teacher's tokenizer, so logit KD applies to its recovery."""

    keep_layers: float = Field(
        gt=0, description="The decoder layers kept: a fraction of the teacher's (0.5: half), or a count (15)."
    )
    # Calibration prompts are the inputs the student will serve.
    calibration_examples: int = Field(
        32, ge=1, description="Train-split prompts, in student.prompt_style, that rank the layers."
    )
    calibration_max_length: int = Field(512, ge=8, description="Tokens of a calibration prompt kept.")

    @field_validator("keep_layers")
    @classmethod
    def _fraction_or_count(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("a fraction below 1 (0.5: half the layers) or a whole count of layers (15)")
        return value


class StudentConfig(StrictModel):
    """The model that is fine-tuned, and the prompt it trains on and is served with."""

    model: str | None = Field(
        None, description="A model folder, an HF id or a bundled:<name> model; null with `prune`: teacher.model."
    )
    prompt_style: str = Field("short", description="The task's prompt style the student trains on and is served with.")
    prune: PruneConfig | None = Field(
        None, description="Derive the student from teacher.model by dropping decoder layers (pipeline/pruning.py)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if self.model is None and self.prune is None:
            raise ValueError("model: a model to train, or `prune` to derive the student from teacher.model")
        return self


class TrackingConfig(StrictModel):
    """Weights & Biases: one group of runs per experiment."""

    wandb: bool = Field(True, description="Log each stage to Weights & Biases.")
    project: str = Field("distill", description="The W&B project.")
    mode: Literal["offline", "online", "disabled"] | None = Field(
        None, description="W&B's mode; null: $WANDB_MODE, else offline."
    )
    # Each artifact is linked to the one it was made from, so the dashboard shows which data made which model.
    artifacts: bool = Field(
        True, description="Log each stage's outputs as a W&B Artifact: teacher outputs, dataset, student, report."
    )
    group: str | None = Field(
        None,
        description="The W&B group of this run's stage runs; null: run_name. A sweep groups its trials under its name.",
    )


class ExperimentConfig(StrictModel):
    """One experiment: one YAML in configs/, every key below validated on load."""

    run_name: str = Field(description="The run's folder name under runs_dir.")
    runs_dir: str = Field("runs", description="Where run folders live, relative to the working directory.")
    seed: int = Field(1234, description="The one seed: sampling, splits, shuffles and training.")
    task: TaskConfig = Field(description="The task and its data.")
    teacher: TeacherConfig = Field(description="The teacher model and how it answers.")
    student: StudentConfig = Field(description="The student model.")
    filter: FilterConfig = Field(
        default_factory=FilterConfig, description="Which teacher answers become training data."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="How the student is fine-tuned.")
    benchmark: BenchmarkConfig = Field(
        default_factory=BenchmarkConfig, description="What is measured, and the verdict."
    )
    promote: PromoteConfig = Field(default_factory=PromoteConfig, description="The gate of `distill promote`.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Weights & Biases tracking.")
    sweep: SweepConfig | None = Field(
        None,
        description="The recipes `distill sweep` trains on this experiment and picks from; `distill run` ignores it.",
    )

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or "/" in value or value.startswith("."):
            raise ValueError("must be a plain folder name")
        return value

    @model_validator(mode="after")
    def _pruned_from_the_teacher(self) -> ExperimentConfig:
        """A pruned student's source is the teacher's model: `student.model` names it, filled in when left out."""
        if self.student.prune is None:
            return self
        if self.student.model is None:
            self.student.model = self.teacher.model
        elif self.student.model != self.teacher.model:
            raise ValueError(
                f"student.model: a pruned student is derived from teacher.model ({self.teacher.model!r}); leave "
                f"student.model out, or drop student.prune to train {self.student.model!r} as it is"
            )
        return self

    @model_validator(mode="after")
    def _system_prompts(self) -> ExperimentConfig:
        """Fill each benchmark system's prompt style; the tuned student is served the prompt it trained on."""
        for system in self.benchmark.systems:
            if system.prompt_style is None:
                by_teacher = system.model == names.TEACHER_MODEL or system.name == names.STUDENT_PROMPTED
                system.prompt_style = self.teacher.prompt_style if by_teacher else self.student.prompt_style
            elif system.name == names.STUDENT_TUNED and system.prompt_style != self.student.prompt_style:
                raise ValueError(
                    f"benchmark.systems.{names.STUDENT_TUNED}.prompt_style: {system.prompt_style!r} is not "
                    f"student.prompt_style {self.student.prompt_style!r}, the prompt it trains on; leave it unset, "
                    "or declare another system (model: tuned) to serve it another prompt"
                )
        return self

    @property
    def base_dir(self) -> Path:
        """Relative paths in the config (data files, runs_dir) resolve against the working directory."""
        return Path.cwd()

    @property
    def run_dir(self) -> Path:
        runs = Path(self.runs_dir)
        return (runs if runs.is_absolute() else Path.cwd() / runs) / self.run_name

    @property
    def layout(self) -> RunLayout:
        """Every path of this run's directory."""
        return RunLayout(self.run_dir)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.learning_rate=1e-4", "seed=3"]` -> nested dict; values parse as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.learning_rate=1e-4")
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is set to a scalar elsewhere")
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return nested


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, merge overrides into, and validate one experiment YAML."""
    return validate_config(load_raw(path, overrides))


def load_raw(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """One experiment YAML with its overrides merged in, not yet validated (a sweep adds each trial's own)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return _deep_merge(raw, parse_overrides(overrides or []))


def with_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`raw` with dotted keys set to values (`{"train.learning_rate": 1e-4}`), as `key=value` overrides do."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return _deep_merge(raw, nested)


# Keys older configs hold, and where what they set is now: one set of forgetting rules, the verdict's.
RETIRED_KEYS = {
    "promote.max_probe_accuracy_drop": "moved to benchmark.verdict.max_probe_accuracy_drop",
    "promote.max_leakage_rate": "removed: the gate judges leakage as the verdict does, by "
    "benchmark.verdict.max_leakage_increase (the rise over the untuned student)",
}


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        msg = RETIRED_KEYS.get(key, msg)
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{key}: {msg}{more}") from None


def resolved_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The config with every default filled in, as written to each run's manifest."""
    return config.model_dump(mode="json")
