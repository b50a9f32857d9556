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

# report.json's layout, which the site's report.json reference is generated from. 3 since 2026-11-27: pairs with an
# answer identical to the teacher's are ties not asked, and judge.reliability.pairs counts only those asked.
REPORT_SCHEMA_VERSION = 3

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

    requests_per_s: Maybe[float] = UNSET  # requests finished per second
    output_tokens_per_s: Maybe[float] = UNSET  # tokens generated per second
    prompt_tokens_per_s: Maybe[float] = UNSET  # prompt tokens read per second


class LoadLevel(Figures):
    """One concurrency level of the load test through a server (serving.summarize_level)."""

    requests: Maybe[int] = UNSET  # timed requests at this level
    wall_s: Maybe[float] = UNSET  # seconds from the first request sent to the last answer
    ttft_p50_s: Maybe[float | None] = UNSET  # time to first token, median
    ttft_p95_s: Maybe[float | None] = UNSET  # time to first token, 95th percentile
    ttft_p99_s: Maybe[float | None] = UNSET  # time to first token, 99th percentile
    tpot_p50_s: Maybe[float | None] = UNSET  # time per output token after the first, median
    tpot_p95_s: Maybe[float | None] = UNSET  # time per output token, 95th percentile
    tpot_p99_s: Maybe[float | None] = UNSET  # time per output token, 99th percentile
    e2e_p50_s: Maybe[float | None] = UNSET  # end-to-end latency of a request, median
    e2e_p95_s: Maybe[float | None] = UNSET  # end-to-end latency, 95th percentile
    e2e_p99_s: Maybe[float | None] = UNSET  # end-to-end latency, 99th percentile
    requests_per_s: Maybe[float] = UNSET  # requests finished per second
    output_tokens_per_s: Maybe[float] = UNSET  # tokens generated per second
    prompt_tokens_per_s: Maybe[float] = UNSET  # prompt tokens read per second
    mean_prompt_tokens: Maybe[float] = UNSET  # prompt tokens per request, as the server counted them
    # How much of a request's time goes to its prompt (prefill, until the first token): what a long prompt costs.
    prompt_time_share: Maybe[float | None] = UNSET


class AccuracyFigures(Figures):
    """A system's accuracy with its Wilson interval, per rule, per example category, and the rate of each named
    failure mode (evaluate.accuracy_metrics; recomputed from the judge's pass or fail for open-ended tasks)."""

    n: Maybe[int] = UNSET  # test examples answered
    accuracy: Maybe[float] = UNSET  # share of test examples with every rule passed
    accuracy_ci95: Maybe[list[float]] = UNSET  # 95% Wilson interval of accuracy
    rule_accuracy: Maybe[dict[str, float]] = UNSET  # share passing each rule of the scorer
    rule_accuracy_ci95: Maybe[dict[str, list[float]]] = UNSET  # 95% Wilson interval per rule
    failure_rates: Maybe[dict[str, float]] = UNSET  # `truncated`: cut at max_tokens; the task's named modes
    failure_rates_ci95: Maybe[dict[str, list[float]]] = UNSET  # 95% Wilson interval per failure mode
    category_accuracy: Maybe[dict[str, float]] = UNSET  # accuracy per example category
    category_accuracy_ci95: Maybe[dict[str, list[float]]] = UNSET  # 95% Wilson interval per category
    category_n: Maybe[dict[str, int]] = UNSET  # test examples per category


class SystemResult(AccuracyFigures):
    """One system's row of report.json: its accuracy figures, then each group below, filled by the module named."""

    # evaluate.evaluate_system: what was measured and how it answered, on the offline engine.
    model: Maybe[str] = UNSET  # the model folder or id served
    serving: Maybe[str] = UNSET  # "weights", or "base + unmerged LoRA adapter"
    prompt_style: Maybe[str] = UNSET  # the task's prompt style it was asked with
    latency_p50_s: Maybe[float] = UNSET  # requests one at a time, warm: prompt prefixes may be cached
    latency_p95_s: Maybe[float] = UNSET  # warm, 95th percentile
    latency_cold_p50_s: Maybe[float] = UNSET  # the prefix cache cleared before each request
    latency_cold_p95_s: Maybe[float] = UNSET  # cold, 95th percentile
    latency_requests: Maybe[int] = UNSET  # requests timed one at a time
    output_tokens_per_s: Maybe[float] = UNSET  # the batched run's, as `offline`
    offline: Maybe[OfflineThroughput] = UNSET  # the batched run's throughput
    mean_prompt_tokens: Maybe[float] = UNSET  # prompt tokens per test example
    mean_output_tokens: Maybe[float] = UNSET  # output tokens per answer
    single_request_output_tokens_per_s: Maybe[float] = UNSET  # the warm one-at-a-time requests, prefill included
    # benchmark.stage: a system measured as another (the same weights and prompt), or through its own server.
    measured_as: Maybe[str] = UNSET  # the system whose rows these are: the same model and prompt, measured once
    server: Maybe[str] = UNSET  # the base URL it was measured through: latency over the network
    constrained: Maybe[bool] = UNSET  # evaluate: its answers constrained to the task's answer set
    # serving.run_load_tests: each concurrency level through a server, by level ("1", "4", "16").
    load: Maybe[dict[str, LoadLevel]] = UNSET  # per concurrency level
    # costs.add_costs: what serving it costs, from its machine's $/hour and the throughput of `cost_basis`.
    cost_per_1m_input_tokens: Maybe[float] = UNSET  # USD per million prompt tokens, the whole machine charged to them
    cost_per_1m_output_tokens: Maybe[float] = UNSET  # USD per million output tokens, the whole machine charged to them
    cost_per_1k_requests: Maybe[float] = UNSET  # USD per thousand requests
    hardware: Maybe[str | None] = UNSET  # a key of benchmark.hardware_profiles; None when priced per token
    usd_per_hour: Maybe[float | None] = UNSET  # one replica's: the profile's $/hour times `devices`
    devices: Maybe[int] = UNSET  # the devices one replica holds (tensor x pipeline parallel)
    measured_on: Maybe[str] = UNSET  # the machine whose throughput was priced, where it was measured here
    cost_basis: Maybe[str] = UNSET  # the throughput priced: a load-test level, the offline batched run, or a list price
    # roofline.add_roofline_shares: how close it came to its machine's limits, where the weights are readable here.
    parameters: Maybe[int] = UNSET  # parameters in the served weights
    parameters_per_output_token: Maybe[int] = UNSET  # weights read per decode step
    weight_dtype: Maybe[str | None] = UNSET
    weight_bytes: Maybe[int] = UNSET  # bytes read per decode step, in weight_dtype
    decode_tokens_per_s: Maybe[float] = UNSET  # one request's decode speed
    decode_basis: Maybe[str] = UNSET  # where decode_tokens_per_s was measured
    decode_ceiling_tokens_per_s: Maybe[float] = UNSET  # memory bandwidth over weight_bytes
    decode_roofline_share: Maybe[float] = UNSET  # decode speed over its ceiling; above 1: weights read from cache
    batched_compute_share: Maybe[float] = UNSET  # the batched run's FLOP/s over the machine's peak_tflops
    batched_compute_basis: Maybe[str] = UNSET  # the tokens counted as computed


class PairedComparison(Figures):
    """The tuned student against another system on the same test examples, exact McNemar (evaluate.comparisons)."""

    accuracy_diff: Maybe[float] = UNSET  # the tuned student's accuracy minus the other's
    tuned_only_correct: Maybe[int] = UNSET  # examples only the tuned student got right
    other_only_correct: Maybe[int] = UNSET  # examples only the other system got right
    p_value: float | None = None  # exact McNemar test, two-sided


class KeptOfTeacher(Figures):
    """The tuned student's accuracy over the teacher's, with a paired bootstrap interval (evaluate.comparisons)."""

    ratio: float | None = None  # None: the teacher scored 0
    ci95: Maybe[list[float]] = UNSET  # 95% paired bootstrap interval


class Comparisons(Figures):
    student_tuned_vs: dict[str, PairedComparison] = {}  # by the other system's name
    kept_of_teacher: Maybe[KeptOfTeacher] = UNSET  # its share of the teacher's accuracy


class Payback(Figures):
    """When distilling pays for itself against one baseline (costs.break_even); `skipped` says why no break-even
    is stated where a saving would mean nothing."""

    saving_per_1k_requests_usd: Maybe[float] = UNSET  # the baseline's cost per 1k requests minus the tuned student's
    requests: float | None = None  # requests until the one-off cost is paid back; null: no saving, or `skipped`
    days: float | None = None  # requests over requests_per_day
    skipped: str | None = None  # why no break-even is stated


class BreakEven(Payback):
    """The one-off cost of distilling (generate + train) and its payback against the teacher (costs.break_even)."""

    one_off_usd: Maybe[float] = UNSET  # what generate and train cost, once
    generate_usd_at_list_price: float | None = None  # None: generate priced by its wall time, as train
    scoring_usd_at_list_price: float | None = None  # on-policy through a hosted teacher: its scored tokens billed
    one_off_wall_s: Maybe[dict[str, float]] = UNSET  # each stage's wall time, from its manifest
    one_off_devices: Maybe[dict[str, int]] = UNSET  # the devices each stage held, priced each at pipeline_hardware's
    one_off_device_hours: Maybe[dict[str, float]] = UNSET  # each stage's device hours, priced
    pipeline_hardware: Maybe[str] = UNSET  # the profile generate and train were priced on
    pipeline_usd_per_hour: Maybe[float] = UNSET  # one device's
    # On-policy training: the teacher's tokens scored (prefill only) and the student's sampled, within train's time.
    teacher_scored_tokens: Maybe[int] = UNSET  # on-policy training: the teacher's scored tokens
    student_sampled_tokens: Maybe[int] = UNSET  # on-policy training: the student's sampled tokens
    requests_per_day: Maybe[float] = UNSET  # benchmark.requests_per_day
    vs_prompted: Maybe[Payback] = UNSET  # the "try prompting first" baseline, where the benchmark has one


class HardwareProfile(Figures):
    usd_per_hour: Maybe[float] = UNSET  # one device's price per hour
    peak_tflops: float | None = None  # dense bf16 TFLOP/s; null: unknown
    memory_gbps: float | None = None  # memory bandwidth in GB/s; null: unknown


class HardwareRecord(Figures):
    """The machine detected and the profiles systems and the one-off cost were priced on (costs.Hardware)."""

    device: Maybe[str] = UNSET  # the device the benchmark ran on
    count: Maybe[int] = UNSET  # how many of it
    detected_profile: Maybe[str] = UNSET  # the profile the device was matched to
    serving_hardware: Maybe[str] = UNSET  # the profile systems were priced on
    serving_source: Maybe[str] = UNSET  # "configured" or "detected"
    pipeline_hardware: Maybe[str] = UNSET  # the profile the one-off cost was priced on
    pipeline_source: Maybe[str] = UNSET  # "configured" or "detected"
    profiles: dict[str, HardwareProfile] = {}  # every profile, with its price and limits


class ProbeSummary(Figures):
    """One system on the general probe (probe.summarize_probe): accuracy and leakage outside the task's own
    categories, and accuracy per category (all of them)."""

    accuracy: Maybe[float] = UNSET  # share of probe questions right, the task's own categories left out
    leakage_rate: Maybe[float] = UNSET  # share of general answers that drift into task behaviour
    n: Maybe[int] = UNSET  # probe questions counted
    per_category: Maybe[dict[str, float]] = UNSET  # accuracy per probe category, all of them
    per_category_n: Maybe[dict[str, int]] = UNSET  # questions per category
    task_categories: Maybe[list[str]] = UNSET  # benchmark.probe_task_categories, where set
    shots: Maybe[int] = UNSET  # worked examples shown before each question (evaluate.run_probe)
    plain_chat_template: Maybe[bool] = UNSET  # True: a base model, asked in a chat format it never learned


class McNemarCounts(Figures):
    tuned_only: int = 0  # questions only the tuned student passed (or leaked on)
    base_only: int = 0  # questions only the untuned student passed (or leaked on)
    p_value: float = 1.0  # exact McNemar test, two-sided


class ForgettingChange(Figures):
    """The tuned student against the untuned one on the same probe questions (benchmark.stage, probe.py)."""

    accuracy: Maybe[float] = UNSET  # probe accuracy, tuned minus untuned
    leakage_rate: Maybe[float] = UNSET  # leakage rate, tuned minus untuned
    accuracy_test: Maybe[McNemarCounts] = UNSET  # paired test on the same questions
    leakage_rate_test: Maybe[McNemarCounts] = UNSET  # paired test on the same questions


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
    n: Maybe[int] = UNSET  # answers with a reference
    rouge_l: Maybe[float] = UNSET  # mean ROUGE-L F1 against the references
    chrf: Maybe[float] = UNSET  # mean chrF against the references


class PairSummary(Figures):
    """One system's answers against the teacher's, judged pairwise in both orders (judge.summarize_pairs)."""

    pairs: Maybe[int] = UNSET  # pairs asked, in both orders
    win: Maybe[int] = UNSET  # both orders preferred this system
    tie: Maybe[int] = UNSET  # the orders disagreed, or a tie
    loss: Maybe[int] = UNSET  # both orders preferred the teacher
    unparsed: Maybe[int] = UNSET  # pairs with an unreadable reply
    n: Maybe[int] = UNSET  # pairs counted
    win_rate: Maybe[float | None] = UNSET  # a tie counts half
    win_or_tie_rate: Maybe[float | None] = UNSET
    win_or_tie_ci95: Maybe[list[float]] = UNSET  # 95% Wilson interval of win_or_tie_rate
    length_controlled_win_rate: Maybe[float | None] = UNSET  # win rate read at equal length
    identical: Maybe[int] = UNSET  # answers identical to the teacher's: ties, the judge not asked
    position_biased: Maybe[int] = UNSET  # pairs where the judge picked the same slot in both orders
    position_bias_rate: Maybe[float | None] = UNSET  # position_biased over the pairs asked
    mean_words: Maybe[float] = UNSET  # this system's answers, in words
    teacher_mean_words: Maybe[float] = UNSET  # the teacher's answers, in words


class JudgedSystem(Figures):
    """One system's answers as the judge graded them (judge.summarize_judge)."""

    n: Maybe[int] = UNSET  # answers graded
    grade_mean: Maybe[float | None] = UNSET  # mean grade, 1-10
    grades_unparsed: Maybe[int] = UNSET  # unreadable grades, counted as fails
    pass_rate: Maybe[float] = UNSET  # share graded at or above pass_threshold
    pass_rate_ci95: Maybe[list[float]] = UNSET  # 95% Wilson interval
    mean_words: Maybe[float] = UNSET  # answer length in words
    reference: Maybe[ReferenceScores] = UNSET  # where the task has reference answers
    vs_teacher: Maybe[PairSummary] = UNSET  # every system but the teacher, with pairwise judging on


class Agreement(Figures):
    n: int = 0  # decided pairs where the metric prefers one answer
    agreement: float | None = None  # share where the judge agreed with it


class JudgeReliability(Figures):
    """How far the judge can be trusted (judge.reliability)."""

    grades: Maybe[int] = UNSET  # grades asked
    grades_unparsed: Maybe[int] = UNSET  # unreadable grades
    distinct_grades: Maybe[list[int]] = UNSET  # the grades it gave
    pairs: Maybe[int] = UNSET  # pairs asked, in both orders
    pairs_identical: Maybe[int] = UNSET  # answers identical to the teacher's: ties, not asked, not in `pairs`
    pairs_unparsed: Maybe[int] = UNSET  # pairs with an unreadable reply
    position_biased: Maybe[int] = UNSET  # pairs where it picked the same slot in both orders
    position_bias_rate: Maybe[float | None] = UNSET  # position_biased over pairs
    teacher_grade_mean: Maybe[float | None] = UNSET  # its mean grade of the teacher's answers
    teacher_pass_rate: Maybe[float | None] = UNSET  # share of the teacher's answers it passed
    reference_agreement: Maybe[dict[str, Agreement] | None] = UNSET  # by reference metric


class JudgeSection(Figures):
    """The benchmark's judge (judge.run_judge): per system, then its reliability and how it was asked."""

    systems: dict[str, JudgedSystem] = {}  # by system name
    reliability: JudgeReliability = msgspec.field(default_factory=JudgeReliability)  # how far the judge can be trusted
    model: Maybe[str] = UNSET  # the judge model
    backend: Maybe[str] = UNSET  # its engine's backend
    rubric: Maybe[str] = UNSET  # what it graded against
    pass_threshold: Maybe[int] = UNSET  # benchmark.judge.pass_threshold
    constrained: Maybe[bool] = UNSET  # its replies constrained to grades and A/B/tie


class Recipe(Figures):
    """The training knobs that move forgetting, as the run set them (benchmark.stage.recipe). A knob an older run
    did not record is UNSET or None."""

    replay_fraction: Maybe[float | None] = UNSET  # train.replay.fraction
    replay_source: Maybe[str | None] = UNSET  # train.replay.source
    replay_rows: Maybe[int | None] = UNSET  # the replay rows the filter really added
    replay_wanted: Maybe[int | None] = UNSET  # the replay rows the fraction asked for
    learning_rate: Maybe[float | None] = UNSET  # train.learning_rate
    lora_r: Maybe[int | None] = UNSET  # None: every weight trained
    num_train_epochs: Maybe[float | None] = UNSET  # train.num_train_epochs
    prompt_style: Maybe[str | None] = UNSET  # student.prompt_style


class CategoryCoverage(Figures):
    """The tuned student on test examples of categories (a label task's labels) its training data showed, against
    those it never saw: a label without one kept example cannot be learned (benchmark.stage.category_coverage)."""

    word: str = "categories"  # "labels" for a label task
    categories: int = 0  # in the test split
    untrained: list[str] = []  # test categories without a kept training example
    trained_n: int = 0  # test examples of categories with training examples
    trained_accuracy: float | None = None  # the tuned student's accuracy on those
    untrained_n: int = 0  # test examples of the others
    untrained_accuracy: float | None = None  # the tuned student's accuracy on those


class PrunedStudent(Figures):
    """A student derived from the teacher by depth pruning (pipeline/pruning.py): what was kept and why."""

    source: str = ""  # the teacher's model
    layers_total: int = 0  # the teacher's decoder layers
    layers_kept: int = 0  # the student's decoder layers
    layers_dropped: list[int] = []  # the teacher's layers dropped, by index
    importance: list[float] = []  # each teacher layer's block influence, in layer order
    parameters: int | None = None  # the pruned student's parameters


class Comparable(Figures):
    """What must match for two runs' figures to be compared (benchmark.stage.comparable_on): the same task on the
    same data, the same student model, the same test examples. Everything else is a lever."""

    task: str = ""  # task.name
    task_params: str = ""  # a digest of task.params, data files by their content
    student_model: str = ""  # student.model
    test_split: str = ""  # a digest of the test examples answered


class OtherRun(Figures):
    """Another finished run of this task in the same runs folder, what it measured (benchmark.stage)."""

    run: str = ""  # its run name
    recipe: Recipe = msgspec.field(default_factory=Recipe)  # its training knobs
    tuned_accuracy: Maybe[float] = UNSET  # its tuned student's accuracy
    probe_change: float | None = None  # its probe accuracy change
    leakage_change: float | None = None  # its leakage rate change


class FilterSummary(Figures):
    """What the filter made of the teacher's training answers (its filter_report.json, benchmark.stage)."""

    samples_in: int | None = None  # teacher samples read
    samples_kept: int | None = None  # samples kept, train and val
    train: int | None = None  # training examples
    dropped: dict[str, int] | None = None  # samples dropped, per filter
    teacher_verified: int | None = None  # teacher samples that pass the task's scorer, before any filter
    teacher_verified_rate: float | None = None  # teacher_verified over samples_in


class Report(Figures):
    """report.json: every system's figures, the paired comparisons, latency CDFs, break-even and forgetting
    (benchmark.stage._report assembles it)."""

    schema_version: int = 1  # reports before the field was written
    run_name: Maybe[str] = UNSET  # the config's run_name
    task: Maybe[str] = UNSET  # task.name
    test_examples: Maybe[int] = UNSET  # test examples each system answered
    hardware_profiles: Maybe[dict[str, float]] = UNSET  # $/hour of each
    hardware: Maybe[HardwareRecord] = UNSET  # the machine detected, and the profiles priced on
    engine: str = "vllm"  # benchmark.engine.backend
    systems: dict[str, SystemResult] = {}  # each system's figures, by name
    comparisons: Comparisons = msgspec.field(default_factory=Comparisons)  # the tuned student against the other systems
    latency_cdf: dict[str, dict[str, list[float]]] = {}  # end-to-end seconds per system and level, sorted
    break_even: Maybe[BreakEven] = UNSET  # when distilling pays for itself
    forgetting: Forgetting = msgspec.field(default_factory=Forgetting)  # the general probe
    answer_choices: list[str] | None = None  # the task's answer set, where a system answered constrained to it
    judge: JudgeSection | None = None  # None: the task's own scorer decided every answer
    filter: FilterSummary | None = None  # None: the filter did not run here
    recipe: Recipe | None = None  # this run's training knobs that move forgetting
    comparable: Comparable | None = None  # None: written before runs were matched on it
    pruned: PrunedStudent | None = None  # None: the student was not derived from the teacher here
    coverage: CategoryCoverage | None = None  # None: every test category had training examples, or no data here
    other_runs: list[OtherRun] = []  # the same task's other finished runs, comparable with this one


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
