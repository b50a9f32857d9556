"""`benchmark` (its systems, machines, load test, judge and the verdict's rules) and `promote`, the gate that reads
the same rules."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline import hardware, names
from pipeline.config.base import StrictModel
from pipeline.config.engine import EngineConfig, SamplingConfig
from pipeline.probe_questions import load_probe_shots, probe_categories


class HardwareConfig(StrictModel):
    """A machine a system may run on: its price, and its limits for the roofline shares (None: unknown, or for a
    CPU profile measured on this machine at benchmark time)."""

    usd_per_hour: float = Field(gt=0, description="The machine's price per hour, one device of it.")
    peak_tflops: float | None = Field(
        None, gt=0, description="Peak dense bf16 TFLOP/s (fp32 for a measured CPU); null: unknown."
    )
    memory_gbps: float | None = Field(None, gt=0, description="Memory bandwidth in GB/s; null: unknown.")


def _default_hardware_profiles() -> dict[str, HardwareConfig]:
    """The datasheet table (pipeline/hardware.py) with its indicative prices, this kind of CPU, and the profile
    an unknown GPU falls back to."""
    profiles = {
        a.name: HardwareConfig(usd_per_hour=a.usd_per_hour, peak_tflops=a.peak_tflops, memory_gbps=a.memory_gbps)
        for _, a in hardware.ACCELERATORS
    }
    profiles[hardware.UNKNOWN_GPU] = HardwareConfig(usd_per_hour=hardware.UNKNOWN_GPU_USD_PER_HOUR)
    profiles[hardware.cpu_profile_name(2)] = HardwareConfig(usd_per_hour=2 * hardware.CPU_USD_PER_CORE_HOUR)
    return profiles


class TokenPriceConfig(StrictModel):
    """A hosted model's list price per token: a system with one is priced by its tokens, not by a machine's hour."""

    usd_per_1m_input_tokens: float = Field(ge=0, description="USD per million prompt tokens.")
    usd_per_1m_output_tokens: float = Field(ge=0, description="USD per million output tokens.")


class SystemConfig(StrictModel):
    """One row of the benchmark: a model, the prompt it gets, where it runs, and how it is priced."""

    name: str = Field(
        description="The system's name in the report; teacher, student_base and student_tuned are required."
    )
    model: str = Field(
        description="teacher, student (untuned), tuned (the trained student; pipeline/names.py), or a model folder "
        "or HF id."
    )
    # student.prompt_style is the one setting for the prompt the tuned student trains on and is served with, so
    # student_tuned may not differ from it.
    prompt_style: str | None = Field(
        None,
        description="The task's prompt style; null: teacher.prompt_style for the teacher and student_prompted, "
        "student.prompt_style for the others.",
    )
    probe: bool = Field(False, description="Also ask the general forgetting probe.")
    hardware: str | None = Field(
        None, description="The profile it is priced on, a key of hardware_profiles; null: serving_hardware."
    )
    # A hosted or remote teacher may exist nowhere else.
    engine: EngineConfig | None = Field(
        None,
        description="Its own engine; null: benchmark.engine, or teacher.engine for a system on the teacher's model "
        "when that is a server.",
    )
    price: TokenPriceConfig | None = Field(
        None, description="A hosted API's list price per token, instead of `hardware`."
    )
    # Declare `{name: teacher_free, model: teacher, constrained: false}` to see the teacher answer freely too.
    constrained: bool | None = Field(
        None,
        description="Constrain its answers to the task's answer set; null: the teacher's model as it generated, "
        "other systems as benchmark.constrained.",
    )

    @model_validator(mode="after")
    def _priced_once(self) -> SystemConfig:
        if self.price is not None and self.hardware is not None:
            raise ValueError("price and hardware: a system is priced per token or by a machine's hour, not both")
        if self.model == names.TUNED_MODEL and self.engine is not None and self.engine.backend == "openai":
            raise ValueError("engine: the tuned student is served from this run's weights, not through a server")
        return self


def _default_systems() -> list[SystemConfig]:
    return [
        SystemConfig(name=names.TEACHER, model=names.TEACHER_MODEL),
        SystemConfig(name=names.STUDENT_BASE, model=names.STUDENT_MODEL, probe=True),
        # "Try prompting first": the untuned student given the teacher's whole prompt.
        SystemConfig(name=names.STUDENT_PROMPTED, model=names.STUDENT_MODEL),
        SystemConfig(name=names.STUDENT_TUNED, model=names.TUNED_MODEL, probe=True),
    ]


class LoadTestConfig(StrictModel):
    """Latency and throughput under load through a real OpenAI-compatible server (`vllm serve`), the same
    for every system: per concurrency level, TTFT, time per output token and end-to-end latency (p50/p95/p99),
    requests/s and output tokens/s. The throughput at `cost_concurrency` prices serving."""

    enabled: bool = Field(True, description="Run the load test through `vllm serve`.")
    concurrency: list[int] = Field(
        default_factory=lambda: [1, 4, 16], description="Concurrency levels, each measured in turn."
    )
    requests: int = Field(
        32, ge=1, description="Timed requests per level; at least two waves of the level are sent (serving.MIN_WAVES)."
    )
    warmup: int = Field(4, ge=0, description="Untimed requests before the first level.")
    cost_concurrency: int | None = Field(
        None, description="The level whose throughput prices serving; null: the highest level."
    )
    startup_timeout_s: float = Field(600, gt=0, description="Seconds a server may take to become healthy.")

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, levels: list[int]) -> list[int]:
        if not levels or any(level < 1 for level in levels):
            raise ValueError("give one or more concurrency levels, each at least 1")
        return sorted(set(levels))


class LmEvalConfig(StrictModel):
    """Named lm-evaluation-harness tasks (e.g. ["arc_easy", "hellaswag"]) for the untuned and the tuned
    student, through lm-eval's Python API: a second forgetting measure beside the probe. Needs `pip install
    lm-eval` and a hub to fetch the task data; without them it is skipped, and the report says why."""

    tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness task names; empty: not run.")
    limit: int | None = Field(None, ge=1, description="Examples per task; null: all.")
    batch_size: int = Field(8, ge=1, description="lm-eval's batch size.")


class VerdictConfig(StrictModel):
    """What counts as a regression and as "near the teacher": one set of rules, read by the report's verdict
    and by the promotion gate (`distill promote`). None switches a forgetting rule off in both."""

    max_probe_accuracy_drop: float | None = Field(
        0.05,
        ge=0,
        description="A regression: the tuned student's probe accuracy this far below the untuned student's; null: off.",
    )
    max_leakage_increase: float | None = Field(
        0.10,
        ge=0,
        description="A regression: its leakage rate, task behaviour in general answers, up this much; null: off.",
    )
    min_kept_of_teacher: float = Field(0.9, ge=0, description='"Worth it" needs this share of the teacher\'s accuracy.')
    # A ratio over an accuracy near 0 is noise: 1 of 60 is 1.7%.
    min_teacher_accuracy: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="A teacher at or below this test accuracy has nothing to teach: no share of it or break-even.",
    )
    significance: float = Field(
        0.05, gt=0, lt=1, description="A paired McNemar p-value below this is a real difference."
    )
    # One load test's figures are noisy (docs/measurements.md, "The load test and the verdict's noise band").
    min_serving_gain: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Cheaper or faster means a cost or p50 latency lower by more than this share; else no break-even.",
    )
    max_judge_position_bias: float = Field(
        0.5,
        ge=0,
        le=1,
        description="A judge whose choice followed the order shown in more pairs than this cannot rank: undecided.",
    )


class BenchmarkJudgeConfig(StrictModel):
    """A judge model at benchmark time (pipeline/benchmark/judge.py), for tasks whose answers no rule can score
    (`task.name: chat`). It grades every system's answers 1-10 against the rubric (a grade at or above
    `pass_threshold` passes: the system's accuracy is then its pass rate), and compares each system's answer
    with the teacher's on the same prompt, in both orders (a verdict that flips with the order is a tie, counted
    as position bias)."""

    enabled: bool | None = Field(
        None, description="Run the judge; null: on for open-ended tasks (Task.open_ended), off for tasks with a scorer."
    )
    model: str = Field(
        names.TEACHER_MODEL,
        description="teacher, student, or a model folder or HF id; with engine.backend openai, the served name.",
    )
    engine: EngineConfig | None = Field(
        None,
        description="The judge's engine; null: teacher.engine for the teacher, else benchmark.engine; openai: hosted.",
    )
    rubric: str | None = Field(
        None, description="What a good answer is; null: the task's rubric (task.params.rubric), else a generic one."
    )
    pass_threshold: int = Field(7, ge=1, le=10, description="A grade at or above this passes.")
    pairwise: bool = Field(True, description="Also compare each system's answer with the teacher's, in both orders.")
    # Unconstrained replies are read strictly and the unreadable ones counted.
    constrained: bool = Field(
        True,
        description="Constrain the judge's replies to the grades or A/B/tie; false for an API without vLLM's "
        "structured outputs.",
    )
    max_tokens: int = Field(8, gt=0, description="Most tokens of a judge's reply; constrained replies need 1-3.")


class BenchmarkConfig(StrictModel):
    """Every system answers the same held-out test split, offline and under load, and the verdict reads the figures."""

    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="The engine systems run on (the teacher's may be teacher.engine)."
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="How every system answers the test split."
    )
    systems: list[SystemConfig] = Field(default_factory=_default_systems, description="The systems compared.")
    # Merged weights are as fast as the base model; one server can host many unmerged adapters, at some latency.
    student_serving: Literal["merged", "lora"] = Field(
        "merged",
        description="Serve the tuned student as merged weights, or as the base model plus the unmerged adapter.",
    )
    load_test: LoadTestConfig = Field(
        default_factory=LoadTestConfig, description="Latency and throughput under load, through `vllm serve`."
    )
    latency_requests: int = Field(
        16, ge=1, description="Offline engine: requests timed one at a time per system, warm and cold."
    )
    max_test_examples: int | None = Field(None, ge=1, description="Answer at most this many test examples; null: all.")
    # The teacher's and the untuned and prompted student's figures are measured once there, for every run that
    # agrees on all they depend on (pipeline/benchmark/shared_units.py). `distill sweep` sets it for its trials.
    shared_units: str | None = Field(
        None,
        description="A folder several runs share, where systems not serving the tuned student are measured once.",
    )
    # Off, the benchmark measures whether a student answers with a valid label by itself (invalid labels counted).
    # The teacher is measured as it taught unless its system says otherwise; the probe is never constrained.
    constrained: bool = Field(
        False, description="Constrain the students' answers to the task's answer set, as the teacher's were."
    )
    # The fields you give of a default profile replace only those fields; the others stay.
    hardware_profiles: dict[str, HardwareConfig] = Field(
        default_factory=_default_hardware_profiles,
        description="Machines systems may be priced on, added to the defaults (pipeline/hardware.py's table, "
        "cpu-2core, unknown-gpu).",
    )
    serving_hardware: str | None = Field(
        None,
        description="The profile systems are priced on unless they name theirs; null: the machine detected here.",
    )
    pipeline_hardware: str | None = Field(
        None,
        description="The profile generate and train are priced on, the one-off cost; null: the machine detected here.",
    )

    @field_validator("hardware_profiles", mode="before")
    @classmethod
    def _on_top_of_defaults(cls, value: Any) -> Any:
        """A profile the user gives is laid over the default of that name field by field: setting only a price
        keeps the datasheet's limits (and so the roofline shares and MFU)."""
        if not isinstance(value, dict):
            return value  # pydantic's own error names the key
        merged: dict[str, Any] = {name: p.model_dump() for name, p in _default_hardware_profiles().items()}
        for name, given in value.items():
            fields = given.model_dump(exclude_unset=True) if isinstance(given, HardwareConfig) else given
            merged[name] = {**merged[name], **fields} if name in merged and isinstance(fields, dict) else fields
        return merged

    requests_per_day: float = Field(10_000, gt=0, description="Traffic, to turn the break-even into days.")
    probe: bool = Field(True, description="Ask the general forgetting probe of the systems with probe: true.")
    probe_max_tokens: int = Field(32, gt=0, description="Most tokens of a probe answer.")
    # Asked bare, an untuned base model repeats the question; a chat model or a tuned student, asked as it is
    # served, would copy the examples' answers (docs/measurements.md, "The probe of a base student").
    probe_shots: int | None = Field(
        None,
        ge=0,
        description="Worked examples shown before each probe question; null: all 5 to an untuned base model, none to "
        "others.",
    )
    # So the task's own skill rising cannot hide a loss elsewhere.
    probe_task_categories: list[str] = Field(
        default_factory=list,
        description="Probe categories the task itself trains: left out of the forgetting figures, shown apart.",
    )
    lm_eval: LmEvalConfig = Field(
        default_factory=LmEvalConfig, description="lm-evaluation-harness tasks, a second forgetting measure."
    )
    verdict: VerdictConfig = Field(
        default_factory=VerdictConfig, description="The verdict's thresholds, shared with the promotion gate."
    )
    judge: BenchmarkJudgeConfig = Field(
        default_factory=BenchmarkJudgeConfig, description="A judge model, for answers no rule can score."
    )

    @field_validator("probe_shots")
    @classmethod
    def _shots_shipped(cls, value: int | None) -> int | None:
        shipped = len(load_probe_shots())
        if value is not None and value > shipped:
            raise ValueError(f"the probe ships {shipped} worked examples")
        return value

    @field_validator("probe_task_categories")
    @classmethod
    def _known_categories(cls, value: list[str]) -> list[str]:
        if not value:
            return value
        unknown = sorted(set(value) - probe_categories())
        if unknown:
            raise ValueError(
                f"unknown probe categories: {', '.join(unknown)}; the probe has {', '.join(sorted(probe_categories()))}"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> BenchmarkConfig:
        declared = [system.name for system in self.systems]
        if len(set(declared)) != len(declared):
            raise ValueError("systems: two systems share a name")
        missing = [name for name in names.REQUIRED_SYSTEMS if name not in declared]
        if missing:
            raise ValueError(
                f"systems: {', '.join(missing)} missing (the verdict compares {', '.join(names.REQUIRED_SYSTEMS)})"
            )
        named = {"serving_hardware": self.serving_hardware, "pipeline_hardware": self.pipeline_hardware}
        named |= {f"systems.{s.name}.hardware": s.hardware for s in self.systems}
        for key, profile in named.items():
            if profile is not None and profile not in self.hardware_profiles:
                raise ValueError(
                    f"{key}: {profile!r} is not in hardware_profiles ({', '.join(self.hardware_profiles)})"
                )
        return self


class PromoteConfig(StrictModel):
    """The gate a tuned student must clear before `distill promote` copies it to `target` (scheduled jobs)."""

    target: str = Field("promoted", description="The folder serving reads, relative to the working directory.")
    max_accuracy_drop: float = Field(
        0.005,
        ge=0,
        description="Accuracy may fall at most this much below the promoted student's; 0.005: half a point.",
    )
    min_accuracy: float | None = Field(None, ge=0, le=1, description="The lowest accuracy promoted; null: none.")
    # Forgetting (probe accuracy drop, leakage increase) is judged by benchmark.verdict's rules, as in the report:
    # one set of thresholds for both.
    max_latency_p95_s: float | None = Field(
        None,
        gt=0,
        description="The highest end-to-end p95 latency promoted: through `vllm serve` at the lowest concurrency, "
        "else offline; null: none.",
    )
    wandb_alias: str | None = Field(
        "promoted",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="The W&B Artifact alias of the promoted student (with tracking.artifacts on); null: folder only.",
    )
