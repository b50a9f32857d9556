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

    usd_per_hour: float = Field(gt=0)
    peak_tflops: float | None = Field(None, gt=0)  # dense bf16 (fp32 for a measured CPU)
    memory_gbps: float | None = Field(None, gt=0)


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

    usd_per_1m_input_tokens: float = Field(ge=0)
    usd_per_1m_output_tokens: float = Field(ge=0)


class SystemConfig(StrictModel):
    """One row of the benchmark: a model, the prompt it gets, where it runs, and how it is priced."""

    name: str
    # "teacher", "student" (untuned), "tuned" (the trained student; pipeline/names.py), or any model folder / HF id.
    model: str
    # None: the prompt its model is trained or configured with. The teacher and student_prompted get
    # teacher.prompt_style; every other system student.prompt_style, the one setting for the prompt the tuned
    # student trains on and is served with (student_tuned may not differ from it).
    prompt_style: str | None = None
    probe: bool = False  # ask the general forgetting probe (base capabilities)
    hardware: str | None = None  # a key of benchmark.hardware_profiles; None: benchmark.serving_hardware
    # None: benchmark.engine, except a system on the teacher's model when teacher.engine is an OpenAI-compatible
    # server (a hosted or remote teacher may exist nowhere else). Backend openai: measured through that server.
    engine: EngineConfig | None = None
    price: TokenPriceConfig | None = None  # a hosted API's list price, instead of `hardware`
    # Answers constrained to the task's answer set (a label task's labels). None: the teacher's model answers as it
    # generated the training data (constrained on a label task), every other system as benchmark.constrained says.
    # Declare `{name: teacher_free, model: teacher, constrained: false}` to see the teacher answer freely too.
    constrained: bool | None = None

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

    enabled: bool = True
    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16])
    requests: int = Field(32, ge=1)  # timed requests per level (at least two waves of the level: serving.MIN_WAVES)
    warmup: int = Field(4, ge=0)  # untimed requests before the first level
    cost_concurrency: int | None = None  # None: the highest level
    startup_timeout_s: float = Field(600, gt=0)

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

    tasks: list[str] = Field(default_factory=list)  # empty: not run
    limit: int | None = Field(None, ge=1)  # examples per task (None: all)
    batch_size: int = Field(8, ge=1)


class VerdictConfig(StrictModel):
    """What counts as a regression and as "near the teacher": one set of rules, read by the report's verdict
    and by the promotion gate (`distill promote`). None switches a forgetting rule off in both."""

    # Base capabilities, the tuned student against the untuned one on the general probe: a regression is
    # probe accuracy down more than this, or the leakage rate (task behaviour in general answers) up more.
    max_probe_accuracy_drop: float | None = Field(0.05, ge=0)
    max_leakage_increase: float | None = Field(0.10, ge=0)
    min_kept_of_teacher: float = Field(0.9, ge=0)  # "worth it" needs this share of the teacher's accuracy
    # A teacher at or below this accuracy on the test split has nothing to teach (1 of 60 is 1.7%): the verdict
    # leads with it, and no share of its accuracy or break-even against it is stated (a ratio over ~0 is noise).
    min_teacher_accuracy: float = Field(0.05, ge=0, lt=1)
    significance: float = Field(0.05, gt=0, lt=1)  # a paired McNemar p-value below this is a real difference
    # The tuned student counts as cheaper or faster than another system (and a break-even is stated) only when
    # its cost or p50 latency is lower by more than this share: one load test's figures are noisy (docs/
    # measurements.md, "The load test and the verdict's noise band").
    min_serving_gain: float = Field(0.2, ge=0, lt=1)
    # Open-ended tasks: a judge whose pairwise choice followed the order the answers were shown in for more than
    # this share of pairs, or that gave every answer one grade, cannot rank the systems; the verdict says so
    # instead of reading its numbers.
    max_judge_position_bias: float = Field(0.5, ge=0, le=1)


class BenchmarkJudgeConfig(StrictModel):
    """A judge model at benchmark time (pipeline/benchmark/judge.py), for tasks whose answers no rule can score
    (`task.name: chat`). It grades every system's answers 1-10 against the rubric (a grade at or above
    `pass_threshold` passes: the system's accuracy is then its pass rate), and compares each system's answer
    with the teacher's on the same prompt, in both orders (a verdict that flips with the order is a tie, counted
    as position bias)."""

    enabled: bool | None = None  # None: on for open-ended tasks (Task.open_ended), off for tasks with a scorer
    # "teacher" (default), "student", or any model folder / HF id; with engine.backend openai, the served name.
    model: str = names.TEACHER_MODEL
    # None: teacher.engine when the judge is the teacher, else benchmark.engine. A hosted judge: backend openai.
    engine: EngineConfig | None = None
    rubric: str | None = None  # None: the task's rubric (task.params.rubric), else a generic one
    pass_threshold: int = Field(7, ge=1, le=10)
    pairwise: bool = True  # each system against the teacher, both orders
    # The judge answers through constrained decoding to the grades 1-10 / A, B, tie (vLLM, transformers, `vllm
    # serve`). Set false for a hosted API that does not take vLLM's structured outputs: replies are then read
    # strictly and the unreadable ones counted.
    constrained: bool = True
    max_tokens: int = Field(8, gt=0)  # of a judge's reply; constrained replies need 1-3


class BenchmarkConfig(StrictModel):
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    systems: list[SystemConfig] = Field(default_factory=_default_systems)
    # How the tuned student is served: "merged" weights (the adapter folded in, as fast as the base model),
    # or "lora": the base model plus the unmerged adapter (vLLM enable_lora), which lets one server host many
    # adapters but costs latency. The report says which was measured.
    student_serving: Literal["merged", "lora"] = "merged"
    load_test: LoadTestConfig = Field(default_factory=LoadTestConfig)
    latency_requests: int = Field(16, ge=1)  # offline engine: requests timed one at a time per system
    max_test_examples: int | None = Field(None, ge=1)
    # A folder several runs share (a sweep's trials): the figures of the systems that do not serve the tuned student
    # (teacher, untuned and prompted student) are measured once there, for runs that agree on everything they read.
    shared_units: str | None = None
    # Constrain the students' task answers to the task's answer set (a label task's labels), as the teacher's were
    # at generate time. Off by default: the benchmark then measures whether a student answers with a valid label by
    # itself (the report counts invalid labels per system). The teacher is measured as it taught (constrained on a
    # label task) unless its system says otherwise (systems.<name>.constrained). The probe is never constrained.
    constrained: bool = False
    # $/hour of each machine a system may run on (list prices; set your own). Serving cost and break-even
    # are computed from these and measured throughput and wall times.
    # Profiles you give are added to the defaults (pipeline/hardware.py's table, cpu-2core, unknown-gpu); the fields
    # you give of a default profile replace its fields, the others stay.
    hardware_profiles: dict[str, HardwareConfig] = Field(default_factory=_default_hardware_profiles)
    # Where systems are priced unless they name their own, and where generate + train ran (the one-off cost of
    # distillation). None: the machine the benchmark runs on, detected (a CUDA device name, else cpu-<n>core).
    serving_hardware: str | None = None
    pipeline_hardware: str | None = None

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

    requests_per_day: float = Field(10_000, gt=0)  # traffic, to turn break-even into days
    probe: bool = True
    probe_max_tokens: int = Field(32, gt=0)
    # Worked examples (question, short answer) shown before each probe question. None: all of them (5) to an
    # untuned base model (no chat template: the plain one), which asked bare repeats the question; none to a chat
    # model or a tuned student, asked as it is served, which would copy their answers (docs/measurements.md, "The
    # probe of a base student"). A number: that many to every system.
    probe_shots: int | None = Field(None, ge=0)
    # Probe categories the task itself trains (`arithmetic` for an arithmetic task): left out of the forgetting
    # figures (probe accuracy and leakage, and so the verdict and the promotion gate), shown apart per category,
    # so the task's own skill rising cannot hide a loss elsewhere.
    probe_task_categories: list[str] = Field(default_factory=list)
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)
    verdict: VerdictConfig = Field(default_factory=VerdictConfig)
    judge: BenchmarkJudgeConfig = Field(default_factory=BenchmarkJudgeConfig)

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

    target: str = "promoted"  # folder (relative: to the working directory) that serving reads
    # Accuracy may fall at most this much below the currently promoted student's (0.005 = half a point).
    max_accuracy_drop: float = Field(0.005, ge=0)
    min_accuracy: float | None = Field(None, ge=0, le=1)
    # Forgetting (probe accuracy drop, leakage increase) is judged by benchmark.verdict's rules, as in the report:
    # one set of thresholds for both.
    max_latency_p95_s: float | None = Field(None, gt=0)
    # W&B Artifact alias given to the promoted student's artifact (with tracking.artifacts on); None: path only.
    wandb_alias: str | None = Field("promoted", pattern=r"^[A-Za-z0-9_.-]+$")
