"""`sweep`: the recipes `distill sweep` trains on one teacher generation, how it searches them, and where the study
lives (pipeline/sweep/). The bars a pick must clear are the verdict's own (`benchmark.verdict`), not restated."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from pipeline.config.base import StrictModel

# The top-level keys some stage reads: a knob elsewhere (run_name, tracking, promote, sweep) changes no trial.
STAGE_SECTIONS = ("seed", "task", "teacher", "student", "filter", "train", "benchmark")


def knob_error(key: str) -> str | None:
    """Why `key` cannot be a knob, or None when a stage reads it."""
    if not key or any(not part for part in key.split(".")):
        return "not a dotted config key such as train.learning_rate"
    if key.split(".")[0] not in STAGE_SECTIONS:
        return f"no stage reads it (a knob sets one of {', '.join(STAGE_SECTIONS)})"
    return None


class HalvingConfig(StrictModel):
    """Successive halving: every recipe first at a cheap fidelity, then the best share of them in full."""

    reduction_factor: int = Field(3, ge=2, description="Keep the best 1/reduction_factor of the cheap rung.")
    cheap: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides that make the cheap rung, e.g. {train.max_steps: 10, benchmark.max_test_examples: 20}.",
    )

    @field_validator("cheap")
    @classmethod
    def _cheap_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if why := knob_error(key):
                raise ValueError(f"{key}: {why}")
        return value


class SweepConfig(StrictModel):
    """A set of recipes trained on one teacher generation; `distill sweep` runs them and picks one."""

    name: str | None = Field(None, description="The sweep's folder under runs_dir; None: <run_name>-sweep.")
    knobs: dict[str, list[Any]] = Field(
        description="Each config key a trial sets, with the values to try, e.g. {train.learning_rate: [1e-4, 2e-4]}."
    )
    fixed: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings every trial shares and the experiment's own run does not, e.g. {train.method: full}.",
    )
    search: Literal["grid", "random", "halving"] = Field(
        "grid",
        description="grid: every combination; random: `trials` of them, drawn with the seed; halving: every "
        "combination at the cheap fidelity, then the best 1/reduction_factor in full.",
    )
    trials: int | None = Field(None, ge=1, description="random: how many combinations to draw; None: all of them.")
    halving: HalvingConfig = Field(default_factory=HalvingConfig, description="The cheap rung of search: halving.")
    storage: str | None = Field(
        None,
        description="The Optuna study's database URL; None: SQLite in the sweep's folder. A PostgreSQL or MySQL URL "
        "lets workers on several machines share it.",
    )
    heartbeat_s: float = Field(
        30.0, gt=0, description="A worker's trial is taken over by another once silent for three heartbeats."
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or value.startswith(".")):
            raise ValueError("must be a plain folder name")
        return value

    @field_validator("fixed")
    @classmethod
    def _fixed_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if why := knob_error(key):
                raise ValueError(f"{key}: {why}")
        return value

    @field_validator("knobs")
    @classmethod
    def _knobs(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not value:
            raise ValueError("name at least one config key with the values to try")
        for key, values in value.items():
            if why := knob_error(key):
                raise ValueError(f"{key}: {why}")
            if not values:
                raise ValueError(f"{key}: an empty list of values")
            if len({repr(v) for v in values}) < len(values):
                raise ValueError(f"{key}: a value is listed twice")
        return value
