"""report.json as types: every figure the benchmark makes, with the module that makes it, and one way in and out.

    report = read_report(layout.report_json)       # a Report; a report this version cannot read: one PipelineError
    report.systems["student_tuned"].accuracy
    write_report_json(layout.report_json, report)

Each field says where it is made; grep a field's name to find that place and every reader (`verdict`, `report`,
`promote`, `status` and `compare` read attributes, never keys). report.json is this schema encoded, its layout
unchanged since schema 3: a system's row is flat (its accuracy, latency, cost and roofline figures side by side),
so those figures are groups of `SystemResult`'s fields, each group filled by one module. Longer than most
modules: the whole schema is kept in one file, so that one file shows every figure a report can hold.

Reports written by earlier versions hold fewer fields: a field they lack reads as UNSET (falsy, and `is UNSET`
where 0 is a value), or as the default shown where an empty value says the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from msgspec import UNSET, Struct, UnsetType

from pipeline.console import PipelineError
from pipeline.files import write_json

REPORT_SCHEMA_VERSION = 3  # report.json's layout; README "report.json" documents it

T = TypeVar("T")
Maybe = T | UnsetType  # a field an older report, or a system it does not apply to, lacks

# Latency under load, per system and concurrency level: `<measure>_p<q>_s`, the fields of `LoadLevel`.
LATENCY_MEASURES = ("ttft", "tpot", "e2e")  # time to first token, per output token after it, end to end
LATENCY_PERCENTILES = (50, 95, 99)

# `cost_basis` of a system priced by its tokens at a hosted API's list price (`price`), not by a machine's hour.
LIST_PRICE_BASIS = "list price per token"


def present_or(value: Maybe[T], default: T) -> T:
    """`value`, or `default` where an older report lacks the field."""
    return default if value is UNSET else value


def latency_key(measure: str, q: int) -> str:
    """`latency_key("e2e", 95)` is "e2e_p95_s", the field of that percentile in a `LoadLevel`."""
    return f"{measure}_p{q}_s"


class Figures(Struct, kw_only=True):
    """A part of report.json: its fields by keyword, unknown keys of a newer report ignored."""


class OfflineThroughput(Figures):
    """The offline engine's batched run over the whole test split (evaluate.py)."""

    requests_per_s: Maybe[float] = UNSET
    output_tokens_per_s: Maybe[float] = UNSET
    prompt_tokens_per_s: Maybe[float] = UNSET


class LoadLevel(Figures):
    """One concurrency level of the load test through a server (serving.summarize_level)."""

    requests: Maybe[int] = UNSET
    wall_s: Maybe[float] = UNSET
    ttft_p50_s: Maybe[float | None] = UNSET
    ttft_p95_s: Maybe[float | None] = UNSET
    ttft_p99_s: Maybe[float | None] = UNSET
    tpot_p50_s: Maybe[float | None] = UNSET
    tpot_p95_s: Maybe[float | None] = UNSET
    tpot_p99_s: Maybe[float | None] = UNSET
    e2e_p50_s: Maybe[float | None] = UNSET
    e2e_p95_s: Maybe[float | None] = UNSET
    e2e_p99_s: Maybe[float | None] = UNSET
    requests_per_s: Maybe[float] = UNSET
    output_tokens_per_s: Maybe[float] = UNSET
    prompt_tokens_per_s: Maybe[float] = UNSET
    mean_prompt_tokens: Maybe[float] = UNSET
    # How much of a request's time goes to its prompt (prefill, until the first token): what a long prompt costs.
    prompt_time_share: Maybe[float | None] = UNSET


class AccuracyFigures(Figures):
    """A system's accuracy with its Wilson interval, per rule, per example category, and the rate of each named
    failure mode (evaluate.accuracy_metrics; recomputed from the judge's pass or fail for open-ended tasks)."""

    n: Maybe[int] = UNSET
    accuracy: Maybe[float] = UNSET
    accuracy_ci95: Maybe[list[float]] = UNSET
    rule_accuracy: Maybe[dict[str, float]] = UNSET
    rule_accuracy_ci95: Maybe[dict[str, list[float]]] = UNSET
    failure_rates: Maybe[dict[str, float]] = UNSET  # `truncated`: cut at max_tokens; the task's named modes
    failure_rates_ci95: Maybe[dict[str, list[float]]] = UNSET
    category_accuracy: Maybe[dict[str, float]] = UNSET
    category_accuracy_ci95: Maybe[dict[str, list[float]]] = UNSET
    category_n: Maybe[dict[str, int]] = UNSET


class SystemResult(AccuracyFigures):
    """One system's row of report.json: its accuracy figures, then each group below, filled by the module named."""

    # evaluate.evaluate_system: what was measured and how it answered, on the offline engine.
    model: Maybe[str] = UNSET
    serving: Maybe[str] = UNSET  # "weights", or "base + unmerged LoRA adapter"
    prompt_style: Maybe[str] = UNSET
    latency_p50_s: Maybe[float] = UNSET  # requests one at a time, warm: prompt prefixes may be cached
    latency_p95_s: Maybe[float] = UNSET
    latency_cold_p50_s: Maybe[float] = UNSET  # the prefix cache cleared before each request
    latency_cold_p95_s: Maybe[float] = UNSET
    latency_requests: Maybe[int] = UNSET
    output_tokens_per_s: Maybe[float] = UNSET  # the batched run's, as `offline`
    offline: Maybe[OfflineThroughput] = UNSET
    mean_prompt_tokens: Maybe[float] = UNSET
    mean_output_tokens: Maybe[float] = UNSET
    single_request_output_tokens_per_s: Maybe[float] = UNSET  # the warm one-at-a-time requests, prefill included
    # benchmark.stage: a system measured as another (the same weights and prompt), or through its own server.
    measured_as: Maybe[str] = UNSET
    server: Maybe[str] = UNSET
    constrained: Maybe[bool] = UNSET  # evaluate: its answers constrained to the task's answer set
    # serving.run_load_tests: each concurrency level through a server, by level ("1", "4", "16").
    load: Maybe[dict[str, LoadLevel]] = UNSET
    # costs.add_costs: what serving it costs, from its machine's $/hour and the throughput of `cost_basis`.
    cost_per_1m_input_tokens: Maybe[float] = UNSET
    cost_per_1m_output_tokens: Maybe[float] = UNSET
    cost_per_1k_requests: Maybe[float] = UNSET
    hardware: Maybe[str | None] = UNSET  # a key of benchmark.hardware_profiles; None when priced per token
    usd_per_hour: Maybe[float | None] = UNSET  # one replica's: the profile's $/hour times `devices`
    devices: Maybe[int] = UNSET  # the devices one replica holds (tensor x pipeline parallel)
    measured_on: Maybe[str] = UNSET  # the machine whose throughput was priced, where it was measured here
    cost_basis: Maybe[str] = UNSET
    # roofline.add_roofline_shares: how close it came to its machine's limits, where the weights are readable here.
    parameters: Maybe[int] = UNSET
    parameters_per_output_token: Maybe[int] = UNSET
    weight_dtype: Maybe[str | None] = UNSET
    weight_bytes: Maybe[int] = UNSET
    decode_tokens_per_s: Maybe[float] = UNSET
    decode_basis: Maybe[str] = UNSET
    decode_ceiling_tokens_per_s: Maybe[float] = UNSET
    decode_roofline_share: Maybe[float] = UNSET
    batched_compute_share: Maybe[float] = UNSET
    batched_compute_basis: Maybe[str] = UNSET


class PairedComparison(Figures):
    """The tuned student against another system on the same test examples, exact McNemar (evaluate.comparisons)."""

    accuracy_diff: Maybe[float] = UNSET
    tuned_only_correct: Maybe[int] = UNSET
    other_only_correct: Maybe[int] = UNSET
    p_value: float | None = None


class KeptOfTeacher(Figures):
    """The tuned student's accuracy over the teacher's, with a paired bootstrap interval (evaluate.comparisons)."""

    ratio: float | None = None  # None: the teacher scored 0
    ci95: Maybe[list[float]] = UNSET


class Comparisons(Figures):
    student_tuned_vs: dict[str, PairedComparison] = {}
    kept_of_teacher: Maybe[KeptOfTeacher] = UNSET


class Payback(Figures):
    """When distilling pays for itself against one baseline (costs.break_even); `skipped` says why no break-even
    is stated where a saving would mean nothing."""

    saving_per_1k_requests_usd: Maybe[float] = UNSET
    requests: float | None = None
    days: float | None = None
    skipped: str | None = None


class BreakEven(Payback):
    """The one-off cost of distilling (generate + train) and its payback against the teacher (costs.break_even)."""

    one_off_usd: Maybe[float] = UNSET
    generate_usd_at_list_price: float | None = None  # None: generate priced by its wall time, as train
    one_off_wall_s: Maybe[dict[str, float]] = UNSET
    one_off_devices: Maybe[dict[str, int]] = UNSET  # the devices each stage held, priced each at pipeline_hardware's
    one_off_device_hours: Maybe[dict[str, float]] = UNSET
    pipeline_hardware: Maybe[str] = UNSET
    pipeline_usd_per_hour: Maybe[float] = UNSET  # one device's
    # On-policy training: the teacher's tokens scored (prefill only) and the student's sampled, within train's time.
    teacher_scored_tokens: Maybe[int] = UNSET
    student_sampled_tokens: Maybe[int] = UNSET
    requests_per_day: Maybe[float] = UNSET
    vs_prompted: Maybe[Payback] = UNSET  # the "try prompting first" baseline, where the benchmark has one


class HardwareProfile(Figures):
    usd_per_hour: Maybe[float] = UNSET
    peak_tflops: float | None = None
    memory_gbps: float | None = None


class HardwareRecord(Figures):
    """The machine detected and the profiles systems and the one-off cost were priced on (costs.Hardware)."""

    device: Maybe[str] = UNSET
    count: Maybe[int] = UNSET
    detected_profile: Maybe[str] = UNSET
    serving_hardware: Maybe[str] = UNSET
    serving_source: Maybe[str] = UNSET  # "configured" or "detected"
    pipeline_hardware: Maybe[str] = UNSET
    pipeline_source: Maybe[str] = UNSET
    profiles: dict[str, HardwareProfile] = {}


class ProbeSummary(Figures):
    """One system on the general probe (probe.summarize_probe): accuracy and leakage outside the task's own
    categories, and accuracy per category (all of them)."""

    accuracy: Maybe[float] = UNSET
    leakage_rate: Maybe[float] = UNSET
    n: Maybe[int] = UNSET
    per_category: Maybe[dict[str, float]] = UNSET
    per_category_n: Maybe[dict[str, int]] = UNSET
    task_categories: Maybe[list[str]] = UNSET  # benchmark.probe_task_categories, where set
    shots: Maybe[int] = UNSET  # worked examples shown before each question (evaluate.run_probe)
    plain_chat_template: Maybe[bool] = UNSET  # True: a base model, asked in a chat format it never learned


class McNemarCounts(Figures):
    tuned_only: int = 0
    base_only: int = 0
    p_value: float = 1.0


class ForgettingChange(Figures):
    """The tuned student against the untuned one on the same probe questions (benchmark.stage, probe.py)."""

    accuracy: Maybe[float] = UNSET
    leakage_rate: Maybe[float] = UNSET
    accuracy_test: Maybe[McNemarCounts] = UNSET
    leakage_rate_test: Maybe[McNemarCounts] = UNSET


class Forgetting:
    """report.json's `forgetting`: each probed system's `ProbeSummary` under its name, beside `lm_eval` (the
    lm-evaluation-harness scores, or why they were skipped) and `change`, in one object as every report has
    written it; here the systems are apart from the two."""

    def __init__(
        self,
        systems: dict[str, ProbeSummary] | None = None,
        lm_eval: Maybe[dict[str, Any]] = UNSET,
        change: Maybe[ForgettingChange] = UNSET,
        change_vs_teacher: Maybe[ForgettingChange] = UNSET,
    ) -> None:
        self.systems = systems if systems is not None else {}
        self.lm_eval = lm_eval
        self.change = change
        # A student pruned from the teacher: the tuned student against the teacher's model, the general ability
        # the deployment gives up (the untuned pruned student is already below it).
        self.change_vs_teacher = change_vs_teacher

    KEYS = ("lm_eval", "change", "change_vs_teacher")  # what is not a system's name

    def __bool__(self) -> bool:
        return bool(self.systems) or self.lm_eval is not UNSET or self.change is not UNSET

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Forgetting) and self.to_builtins() == other.to_builtins()

    def __repr__(self) -> str:
        return (
            f"Forgetting(systems={self.systems!r}, lm_eval={self.lm_eval!r}, change={self.change!r}, "
            f"change_vs_teacher={self.change_vs_teacher!r})"
        )

    def to_builtins(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: msgspec.to_builtins(summary) for name, summary in self.systems.items()}
        if self.lm_eval is not UNSET:
            out["lm_eval"] = self.lm_eval
        if self.change is not UNSET:
            out["change"] = msgspec.to_builtins(self.change)
        if self.change_vs_teacher is not UNSET:
            out["change_vs_teacher"] = msgspec.to_builtins(self.change_vs_teacher)
        return out

    @classmethod
    def from_builtins(cls, raw: dict[str, Any]) -> Forgetting:
        if not isinstance(raw, dict):
            raise msgspec.ValidationError(f"Expected `object`, got `{type(raw).__name__}`")
        return cls(
            {name: msgspec.convert(value, ProbeSummary) for name, value in raw.items() if name not in cls.KEYS},
            raw.get("lm_eval", UNSET),
            msgspec.convert(raw["change"], ForgettingChange) if "change" in raw else UNSET,
            msgspec.convert(raw["change_vs_teacher"], ForgettingChange) if "change_vs_teacher" in raw else UNSET,
        )


class ReferenceScores(Figures):
    n: Maybe[int] = UNSET
    rouge_l: Maybe[float] = UNSET
    chrf: Maybe[float] = UNSET


class PairSummary(Figures):
    """One system's answers against the teacher's, judged pairwise in both orders (judge.summarize_pairs)."""

    pairs: Maybe[int] = UNSET
    win: Maybe[int] = UNSET
    tie: Maybe[int] = UNSET
    loss: Maybe[int] = UNSET
    unparsed: Maybe[int] = UNSET
    n: Maybe[int] = UNSET
    win_rate: Maybe[float | None] = UNSET  # a tie counts half
    win_or_tie_rate: Maybe[float | None] = UNSET
    win_or_tie_ci95: Maybe[list[float]] = UNSET
    length_controlled_win_rate: Maybe[float | None] = UNSET
    identical: Maybe[int] = UNSET  # answers identical to the teacher's: ties, the judge not asked
    position_biased: Maybe[int] = UNSET
    position_bias_rate: Maybe[float | None] = UNSET
    mean_words: Maybe[float] = UNSET
    teacher_mean_words: Maybe[float] = UNSET


class JudgedSystem(Figures):
    """One system's answers as the judge graded them (judge.summarize_judge)."""

    n: Maybe[int] = UNSET
    grade_mean: Maybe[float | None] = UNSET
    grades_unparsed: Maybe[int] = UNSET
    pass_rate: Maybe[float] = UNSET
    pass_rate_ci95: Maybe[list[float]] = UNSET
    mean_words: Maybe[float] = UNSET
    reference: Maybe[ReferenceScores] = UNSET  # where the task has reference answers
    vs_teacher: Maybe[PairSummary] = UNSET  # every system but the teacher, with pairwise judging on


class Agreement(Figures):
    n: int = 0
    agreement: float | None = None


class JudgeReliability(Figures):
    """How far the judge can be trusted (judge.reliability)."""

    grades: Maybe[int] = UNSET
    grades_unparsed: Maybe[int] = UNSET
    distinct_grades: Maybe[list[int]] = UNSET
    pairs: Maybe[int] = UNSET  # pairs asked, in both orders
    pairs_identical: Maybe[int] = UNSET  # answers identical to the teacher's: ties, not asked, not in `pairs`
    pairs_unparsed: Maybe[int] = UNSET
    position_biased: Maybe[int] = UNSET
    position_bias_rate: Maybe[float | None] = UNSET
    teacher_grade_mean: Maybe[float | None] = UNSET
    teacher_pass_rate: Maybe[float | None] = UNSET
    reference_agreement: Maybe[dict[str, Agreement] | None] = UNSET


class JudgeSection(Figures):
    """The benchmark's judge (judge.run_judge): per system, then its reliability and how it was asked."""

    systems: dict[str, JudgedSystem] = {}
    reliability: JudgeReliability = msgspec.field(default_factory=JudgeReliability)
    model: Maybe[str] = UNSET
    backend: Maybe[str] = UNSET
    rubric: Maybe[str] = UNSET
    pass_threshold: Maybe[int] = UNSET
    constrained: Maybe[bool] = UNSET


class Recipe(Figures):
    """The training knobs that move forgetting, as the run set them (benchmark.stage.recipe). A knob an older run
    did not record is UNSET or None."""

    replay_fraction: Maybe[float | None] = UNSET
    replay_source: Maybe[str | None] = UNSET
    replay_rows: Maybe[int | None] = UNSET  # the replay rows the filter really added
    replay_wanted: Maybe[int | None] = UNSET
    learning_rate: Maybe[float | None] = UNSET
    lora_r: Maybe[int | None] = UNSET  # None: every weight trained
    num_train_epochs: Maybe[float | None] = UNSET
    prompt_style: Maybe[str | None] = UNSET


class CategoryCoverage(Figures):
    """The tuned student on test examples of categories (a label task's labels) its training data showed, against
    those it never saw: a label without one kept example cannot be learned (benchmark.stage.category_coverage)."""

    word: str = "categories"  # "labels" for a label task
    categories: int = 0  # in the test split
    untrained: list[str] = []  # test categories without a kept training example
    trained_n: int = 0
    trained_accuracy: float | None = None
    untrained_n: int = 0
    untrained_accuracy: float | None = None


class PrunedStudent(Figures):
    """A student derived from the teacher by depth pruning (pipeline/pruning.py): what was kept and why."""

    source: str = ""
    layers_total: int = 0
    layers_kept: int = 0
    layers_dropped: list[int] = []
    importance: list[float] = []  # each teacher layer's block influence, in layer order
    parameters: int | None = None


class Comparable(Figures):
    """What must match for two runs' figures to be compared (benchmark.stage.comparable_on): the same task on the
    same data, the same student model, the same test examples. Everything else is a lever."""

    task: str = ""
    task_params: str = ""  # a digest of task.params, data files by their content
    student_model: str = ""
    test_split: str = ""  # a digest of the test examples answered


class OtherRun(Figures):
    """Another finished run of this task in the same runs folder, what it measured (benchmark.stage)."""

    run: str = ""
    recipe: Recipe = msgspec.field(default_factory=Recipe)
    tuned_accuracy: Maybe[float] = UNSET
    probe_change: float | None = None
    leakage_change: float | None = None


class FilterSummary(Figures):
    """What the filter made of the teacher's training answers (its filter_report.json, benchmark.stage)."""

    samples_in: int | None = None
    samples_kept: int | None = None
    train: int | None = None
    dropped: dict[str, int] | None = None
    teacher_verified: int | None = None
    teacher_verified_rate: float | None = None


class Report(Figures):
    """report.json: every system's figures, the paired comparisons, latency CDFs, break-even and forgetting
    (benchmark.stage._report assembles it)."""

    schema_version: int = 1  # reports before the field was written
    run_name: Maybe[str] = UNSET
    task: Maybe[str] = UNSET
    test_examples: Maybe[int] = UNSET
    hardware_profiles: Maybe[dict[str, float]] = UNSET  # $/hour of each
    hardware: Maybe[HardwareRecord] = UNSET
    engine: str = "vllm"  # benchmark.engine.backend
    systems: dict[str, SystemResult] = {}
    comparisons: Comparisons = msgspec.field(default_factory=Comparisons)
    latency_cdf: dict[str, dict[str, list[float]]] = {}  # end-to-end seconds per system and level, sorted
    break_even: Maybe[BreakEven] = UNSET
    forgetting: Forgetting = msgspec.field(default_factory=Forgetting)
    answer_choices: list[str] | None = None  # the task's answer set, where a system answered constrained to it
    judge: JudgeSection | None = None  # None: the task's own scorer decided every answer
    filter: FilterSummary | None = None  # None: the filter did not run here
    recipe: Recipe | None = None
    comparable: Comparable | None = None  # None: written before runs were matched on it
    pruned: PrunedStudent | None = None  # None: the student was not derived from the teacher here
    coverage: CategoryCoverage | None = None  # None: every test category had training examples, or no data here
    other_runs: list[OtherRun] = []


def _enc_hook(value: Any) -> Any:
    if isinstance(value, Forgetting):
        return value.to_builtins()
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is Forgetting:
        return Forgetting.from_builtins(value)
    raise NotImplementedError(f"cannot decode {kind.__name__}")


def to_builtins(value: Any) -> Any:
    """Figures (or any value holding them) as plain dicts, lists and numbers, as report.json writes them."""
    return msgspec.to_builtins(value, enc_hook=_enc_hook)


def convert(raw: Any, kind: type[T]) -> T:
    """Plain data (a report.json read, a saved unit of work) as `kind`; msgspec.ValidationError names the field."""
    return msgspec.convert(raw, kind, dec_hook=_dec_hook)


def write_report_json(path: Path, report: Report) -> None:
    """report.json: the report encoded (json's own encoder, as every report has been written: NaN as NaN)."""
    write_json(path, to_builtins(report))


def read_report(path: Path) -> Report:
    """A report.json as a `Report`; one that cannot be read is a PipelineError naming the file and the field."""
    try:
        return convert(json.loads(path.read_text()), Report)
    except (ValueError, msgspec.ValidationError) as exc:
        raise PipelineError(f"{path}: not a report this version reads ({exc})") from None
