"""Experiment config: one YAML per experiment, validated on load, with `key=value` overrides.

Every error names the offending key, e.g. `config error: train.learning_rate: Input should be a valid number`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineConfig(_Strict):
    """Inference engine options; the vLLM ones pass straight through to `vllm.LLM`."""

    backend: Literal["vllm", "transformers"] = "vllm"
    dtype: str = "auto"
    max_model_len: int | None = Field(2048, gt=0)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    enable_prefix_caching: bool = True
    enforce_eager: bool | None = None  # None: eager on CPU (compiling costs ~90 s and gains nothing there)
    tensor_parallel_size: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)  # transformers backend only
    extra: dict[str, Any] = Field(default_factory=dict)  # any other vllm.LLM keyword


class SamplingConfig(_Strict):
    n: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(128, gt=0)
    seed: int | None = None


class TaskConfig(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class TeacherConfig(_Strict):
    model: str
    prompt_style: str = "full"
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    chunk_size: int = Field(64, ge=1)  # prompts per resumable chunk


class StudentConfig(_Strict):
    model: str
    prompt_style: str = "short"


class FilterConfig(_Strict):
    val_fraction: float = Field(0.1, ge=0, lt=1)
    drop_truncated: bool = True  # finish reason "length"; off only for models that cannot stop (random test weights)
    require_correct: bool = True  # rejection sampling against the task's scorer
    min_agreement: float = Field(0.0, ge=0, le=1)  # share of a prompt's n samples that must pass
    max_samples_per_prompt: int = Field(1, ge=1)  # distinct passing samples kept per prompt


class LoraConfig(_Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class TrainConfig(_Strict):
    lora: LoraConfig = Field(default_factory=LoraConfig)
    learning_rate: float = Field(2e-4, gt=0)
    num_train_epochs: float = Field(3.0, gt=0)
    max_steps: int = -1
    per_device_train_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(512, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler_type: str = "cosine"
    logging_steps: int = Field(5, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool | None = None  # None: chosen by device (on for CUDA with bf16 support, off on CPU)
    gradient_checkpointing: bool | None = None  # None: on for CUDA, off on CPU (68 s vs 4.5 s a step here)
    merge: bool = True  # also save merged weights that vLLM serves directly


class HardwareConfig(_Strict):
    name: str
    usd_per_hour: float = Field(gt=0)


class BenchmarkConfig(_Strict):
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    latency_requests: int = Field(16, ge=1)  # requests timed one at a time per system
    max_test_examples: int | None = Field(None, ge=1)
    hardware: HardwareConfig = Field(default_factory=lambda: HardwareConfig(name="cpu-2core", usd_per_hour=0.10))
    probe: bool = True
    probe_max_tokens: int = Field(32, gt=0)


class TrackingConfig(_Strict):
    wandb: bool = True
    project: str = "distill"
    mode: Literal["offline", "online", "disabled"] | None = None  # None: $WANDB_MODE, else offline


class ExperimentConfig(_Strict):
    run_name: str
    runs_dir: str = "runs"
    seed: int = 1234
    task: TaskConfig
    teacher: TeacherConfig
    student: StudentConfig
    filter: FilterConfig = Field(default_factory=FilterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or "/" in value or value.startswith("."):
            raise ValueError("must be a plain folder name")
        return value

    @property
    def base_dir(self) -> Path:
        """Relative paths in the config (data files, runs_dir) resolve against the working directory."""
        return Path.cwd()

    @property
    def run_dir(self) -> Path:
        runs = Path(self.runs_dir)
        return (runs if runs.is_absolute() else Path.cwd() / runs) / self.run_name


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
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    raw = _deep_merge(raw, parse_overrides(overrides or []))
    return validate_config(raw)


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{key}: {msg}{more}") from None


def resolved_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The config with every default filled in, as written to each run's manifest."""
    return config.model_dump(mode="json")
