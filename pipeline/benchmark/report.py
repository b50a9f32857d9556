"""report.md from a `Report`: the verdict first, then the numbers it was computed from, section by section, and
the plots (plots.py) below them. Longer than most modules: every section of report.md is here, in the order a
reader meets it, so that one file shows the whole page."""

from __future__ import annotations

from pathlib import Path

from msgspec import UNSET

from pipeline import names
from pipeline.benchmark.plots import draw_plots
from pipeline.benchmark.results import (
    LATENCY_PERCENTILES,
    LIST_PRICE_BASIS,
    BreakEven,
    Forgetting,
    JudgeSection,
    LoadLevel,
    Maybe,
    ProbeSummary,
    Report,
    SystemResult,
    latency_key,
    present_or,
)
from pipeline.benchmark.verdict import judge_reliability_sentence, lowest_load_level, verdict
from pipeline.config import VerdictConfig
from pipeline.files import write_text

NAN = float("nan")


def interval_text(values: Maybe[list[float]] | None) -> str:
    """ " [0.94, 1.00]" after a figure with its 95% interval; nothing where a report has none."""
    return f" [{values[0]:.2f}, {values[1]:.2f}]" if values else ""


def _table(report: Report) -> list[str]:
    lines = [
        "| system | prompt | accuracy [95% CI] | mean prompt tok | prompt share of request time "
        "| offline p50 warm / cold (s) | offline output tok/s | decode roofline share "
        "| hardware | $ / 1M input tok | $ / 1M output tok | $ / 1k requests |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report.systems.items():
        share = present_or(m.decode_roofline_share, None)
        hardware = m.hardware or ("list price" if m.cost_basis == LIST_PRICE_BASIS else "")
        if hardware and present_or(m.devices, 1) > 1:
            hardware += f" x{m.devices}"
        lines.append(
            f"| {name} | {m.prompt_style} | {m.accuracy:.3f}{interval_text(m.accuracy_ci95)} "
            f"| {m.mean_prompt_tokens:.0f} | {_prompt_share(m)} "
            f"| {m.latency_p50_s:.2f} / {present_or(m.latency_cold_p50_s, NAN):.2f} "
            f"| {m.output_tokens_per_s:.1f} | {'-' if share is None else f'{share:.1%}'} "
            f"| {hardware} "
            f"| {present_or(m.cost_per_1m_input_tokens, NAN):.3f} | {m.cost_per_1m_output_tokens:.3f} "
            f"| {present_or(m.cost_per_1k_requests, NAN):.4f} |"
        )
    rules = sorted({rule for m in report.systems.values() for rule in m.rule_accuracy})
    lines += ["", "| system | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    for name, m in report.systems.items():
        cis = m.rule_accuracy_ci95 or {}
        cells = [f"{m.rule_accuracy.get(r, NAN):.3f}{interval_text(cis.get(r))}" for r in rules]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += _failures_table(report)
    tests = report.comparisons.student_tuned_vs
    if tests:
        lines += [
            "",
            "Paired exact McNemar tests, tuned student against each system on the same test examples:",
            "",
            "| against | accuracy difference | only tuned right | only other right | p-value |",
            "|---|---|---|---|---|",
        ]
        for other, t in tests.items():
            lines.append(
                f"| {other} | {t.accuracy_diff:+.3f} | {t.tuned_only_correct} | {t.other_only_correct} "
                f"| {t.p_value:.3g} |"
            )
    loads = {name: m.load for name, m in report.systems.items() if m.load}
    if loads:
        lines += [
            "",
            "Under load through `vllm serve` (a system on its own server: through that server; streamed requests; "
            "TTFT = time to first token, TPOT = time per output token after it):",
            "",
            "| system | concurrency | TTFT p50 / p95 / p99 (s) | TPOT p50 / p95 / p99 (ms) | e2e p50 / p95 / p99 (s) "
            "| requests/s | output tok/s |",
            "|---|---|---|---|---|---|---|",
        ]

        def trio(level: LoadLevel, measure: str, scale: float = 1.0, digits: int = 2) -> str:
            values = [present_or(getattr(level, latency_key(measure, q)), None) for q in LATENCY_PERCENTILES]
            return " / ".join("-" if v is None else f"{v * scale:.{digits}f}" for v in values)

        for name, levels in loads.items():
            for concurrency, level in levels.items():
                lines.append(
                    f"| {name} | {concurrency} | {trio(level, 'ttft')} | {trio(level, 'tpot', 1000, 1)} "
                    f"| {trio(level, 'e2e')} | {level.requests_per_s:.2f} | {level.output_tokens_per_s:.1f} |"
                )
    return lines


def _failures_table(report: Report) -> list[str]:
    """Accuracy per example category and the rate of each named failure mode, per system (schema 2 reports
    written before these fields existed have neither)."""
    systems = {name: m for name, m in report.systems.items() if m.category_accuracy is not UNSET}
    if not systems:
        return []
    categories = sorted({c for m in systems.values() for c in m.category_accuracy})
    modes = sorted({f for m in systems.values() for f in m.failure_rates})
    sizes = next(iter(systems.values())).category_n  # every system answers the same test split
    lines = [
        "",
        "Where each system fails: accuracy per example category (n) and the share of answers showing each "
        "failure mode (`truncated`: cut off at max_tokens, never stopped; `invalid_label`: none of the task's "
        "labels).",
        "",
        "| system | " + " | ".join(f"{c} (n={sizes.get(c, 0)})" for c in categories) + " | " + " | ".join(modes) + " |",
        "|---|" + "---|" * (len(categories) + len(modes)),
    ]
    for name, m in systems.items():
        cells = [
            f"{m.category_accuracy.get(c, NAN):.3f}{interval_text(m.category_accuracy_ci95.get(c))}" for c in categories
        ]
        cells += [f"{m.failure_rates.get(f, NAN):.1%}" for f in modes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _prompt_share(system: SystemResult) -> str:
    """Time to first token over end-to-end time through the server at the lowest concurrency (no queueing)."""
    lowest = lowest_load_level(system)
    share = present_or(lowest[1].prompt_time_share, None) if lowest else None
    return "-" if share is None else f"{share:.0%}"


# How each engine serves an unmerged LoRA adapter on top of its base model.
ADAPTER_SERVING = {"vllm": "vLLM `enable_lora`", "transformers": "a PEFT model on the transformers engine"}


def _serving_note(report: Report) -> str:
    tuned = report.systems[names.STUDENT_TUNED]
    serving = present_or(tuned.serving, "weights")
    if tuned.server:
        return "The tuned student was served by its own server, as that server loaded it."
    if serving == "weights":
        return "The tuned student was served as merged weights (the adapter folded in)."
    how = ADAPTER_SERVING.get(report.engine, report.engine)
    return (
        f"The tuned student was served as the base model plus its unmerged LoRA adapter ({how}): "
        "slower than merged weights, measured as such."
    )


ENGINE_NAMES = {
    "vllm": "vLLM's offline engine",
    "transformers": "the transformers engine",
    "openai": "the OpenAI-compatible server",
}


def _latency_note(engine: str) -> str:
    """What warm and cold latency mean on the engine that ran: only vLLM's cache is known and cleared here."""
    name = ENGINE_NAMES.get(engine, engine)
    if engine == "vllm":
        return (
            f"Offline latency is from requests run one at a time on {name}, warm (shared prompt prefixes served "
            "from vLLM's prefix cache, as on a busy server) and cold (the cache cleared before each request)."
        )
    if engine == "transformers":
        return (
            f"Offline latency is from requests run one at a time on {name}, which has no prefix cache: every "
            "request computes its whole prompt, so warm and cold are the same work measured twice."
        )
    return (
        f"Offline latency is from requests run one at a time through {name}, end to end over the network; whether "
        "the server caches prompt prefixes is its own business, so warm and cold cannot be told apart here."
    )


def _hardware_note(report: Report) -> str:
    """One sentence: the machine detected, and the profiles used and how they were chosen."""
    hardware = report.hardware
    if not hardware:
        return ""

    def said(key: str, source: str) -> str:
        profile = hardware.profiles.get(key)
        limits = []
        if profile and profile.memory_gbps:
            limits.append(f"{profile.memory_gbps:,.0f} GB/s")
        if profile and profile.peak_tflops:
            limits.append(f"{profile.peak_tflops:g} TFLOP/s")
        measured = " measured here" if source == "detected" and key.startswith("cpu-") else ""
        shown = f", {', '.join(limits)}{measured}" if limits else ", limits unknown"
        usd_per_hour = present_or(profile.usd_per_hour, NAN) if profile else NAN
        return f"`{key}` ({source}; ${usd_per_hour:.2f}/hour{shown})"

    serving = said(hardware.serving_hardware, hardware.serving_source)
    # A hosted teacher's generate is priced by its tokens (the break-even section): only training is timed here.
    one_off = "generate + train"
    if report.break_even and report.break_even.generate_usd_at_list_price is not None:
        one_off = "train"
    if hardware.pipeline_hardware == hardware.serving_hardware:
        where = f"Systems and the one-off {one_off} are priced on {serving}"
    else:
        pipeline = said(hardware.pipeline_hardware, hardware.pipeline_source)
        where = f"Systems are priced on {serving}, {one_off} on {pipeline}"
    if any(m.server for m in report.systems.values()):
        where += " (systems on their own server: below)"
    own = sorted({m.hardware for m in report.systems.values() if m.hardware} - {hardware.serving_hardware})
    if own:
        where += f" (systems that name their own `hardware` on theirs: {', '.join(f'`{k}`' for k in own)})"
    count = present_or(hardware.count, 1)
    device = f"{count} x {hardware.device}" if count > 1 and not hardware.detected_profile.startswith("cpu-") else None
    return f"Ran on {device or hardware.device}. {where}. "


def _servers_note(report: Report) -> str:
    """Systems measured through their own OpenAI-compatible server (a hosted or remote teacher)."""
    said = []
    for name, m in report.systems.items():
        if not m.server:
            continue
        if m.cost_basis == LIST_PRICE_BASIS:
            priced = (
                f"priced at its list price (${m.cost_per_1m_input_tokens:g} / ${m.cost_per_1m_output_tokens:g} "
                "per 1M input / output tokens)"
            )
        else:
            priced = f"priced on `{present_or(m.hardware, None)}`"
        said.append(
            f"`{name}` was measured through its server ({m.server}): its latency includes the network, its warm "
            f"and cold latency cannot be told apart, and it is {priced}. "
        )
    return "".join(said)


def _cost_note(report: Report) -> str:
    """How serving cost was reached: one replica's machine time (its devices times the profile's $/hour) over
    measured throughput, save for systems priced by the token; and which systems are priced on another machine
    than the one that measured their throughput."""
    basis = present_or(report.systems[names.STUDENT_TUNED].cost_basis, "the offline engine's batched throughput")
    listed = [f"`{name}`" for name, m in report.systems.items() if m.cost_basis == LIST_PRICE_BASIS]
    by_token = f", except {', '.join(listed)}, priced by the token at its list price" if listed else ""
    replicas = [f"`{name}` {m.devices}" for name, m in report.systems.items() if present_or(m.devices, 1) > 1]
    split = f" (devices per replica: {', '.join(replicas)})" if replicas else ""
    return (
        f"Serving cost from the $/hour of the devices one replica of each system holds{split} and its measured "
        f"throughput ({basis}){by_token}. " + _priced_elsewhere_note(report)
    )


def _priced_elsewhere_note(report: Report) -> str:
    """Systems priced on a profile other than the machine that measured them: what their price means."""
    detected = report.hardware.detected_profile if report.hardware else UNSET
    elsewhere: dict[str, list[str]] = {}
    for name, m in report.systems.items():
        if m.measured_on and m.hardware and detected and m.hardware != detected:
            elsewhere.setdefault(m.hardware, []).append(f"`{name}`")
    said = ""
    for profile, systems in elsewhere.items():
        measured_on = report.hardware.device
        said += (
            f"{', '.join(systems)} {'is' if len(systems) == 1 else 'are'} priced on `{profile}` but "
            f"{'its' if len(systems) == 1 else 'their'} speed was measured here, on {measured_on}: the cost is "
            f"`{profile}`'s hour at this machine's throughput, not a measurement on `{profile}`, and the roofline "
            "shares are against this machine's limits. "
        )
    return said


def _twins_note(report: Report) -> str:
    """Systems measured once because they are another's model with its prompt (systems.twins)."""
    said = [
        f"`{name}` is `{m.measured_as}`'s model with its prompt, so it was measured once: its row is "
        f"`{m.measured_as}`'s. "
        for name, m in report.systems.items()
        if m.measured_as
    ]
    return "".join(said)


def _roofline_note(report: Report) -> str:
    tuned = report.systems[names.STUDENT_TUNED]
    if tuned.decode_roofline_share is UNSET:
        return ""
    return (
        "The decode roofline share is a system's decode speed for one request ("
        + tuned.decode_basis
        + ") over the ceiling of the machine that measured it"
        + _measuring_machine(report)
        + ", memory bandwidth over the bytes of the weights one decode step reads "
        f"(the tuned student: {tuned.decode_tokens_per_s:.1f} of {tuned.decode_ceiling_tokens_per_s:,.0f} "
        f"tok/s, {tuned.weight_bytes / 1e6:,.0f} MB of {tuned.weight_dtype} weights; the input embedding "
        "table is looked up, not read). "
    )


def _measuring_machine(report: Report) -> str:
    """ " (`cpu-2core`, 12 GB/s measured here)": the profile whose limits the roofline shares are taken against."""
    hardware = report.hardware
    if not hardware or not hardware.detected_profile:
        return ""
    key = hardware.detected_profile
    profile = hardware.profiles.get(key)
    bandwidth = f", {profile.memory_gbps:,.0f} GB/s" if profile and profile.memory_gbps else ""
    measured = " measured here" if bandwidth and key.startswith("cpu-") else ""
    return f" (`{key}`{bandwidth}{measured})"


def _pruned_note(report: Report) -> str:
    """How the student was derived from the teacher, where it was (student.prune)."""
    pruned = report.pruned
    if not pruned:
        return ""
    parameters = f", {pruned.parameters / 1e6:,.0f}M parameters" if pruned.parameters else ""
    return (
        f" The student is the teacher's model pruned from {pruned.layers_total} to {pruned.layers_kept} decoder "
        f"layers{parameters}: those with the lowest block influence on the task's train prompts were dropped "
        f"({', '.join(map(str, pruned.layers_dropped))}; `layer_importance.png`), then it was trained."
    )


def _constraint_note(report: Report) -> str:
    """Which systems answered constrained to the task's labels: the teacher as it taught, the students where
    `benchmark.constrained` says (reports before systems said it: all of them)."""
    choices = report.answer_choices
    if not choices:
        return ""
    constrained = [name for name, m in report.systems.items() if m.constrained]
    if not constrained or len(constrained) == len(report.systems):
        return (
            f" Every system's answers were constrained to the task's {len(choices)} labels, so none can answer "
            "with an invalid label."
        )
    free = [name for name in report.systems if name not in constrained]
    teacher = " (the teacher as it generated the training data)" if names.TEACHER in constrained else ""
    return (
        f" {_listed(constrained)} answered constrained to the task's {len(choices)} labels{teacher}; "
        f"{_listed(free)} answered freely (`benchmark.constrained`), so an invalid label counts against them."
    )


def _listed(systems: list[str]) -> str:
    return ", ".join(f"`{name}`" for name in systems)


def write_report(report: Report, path: Path, rules: VerdictConfig | None = None) -> list[Path]:
    """Write report.md to `path` (the verdict by `rules`, default `benchmark.verdict`'s) and its plots beside it;
    return the paths written."""
    plots = draw_plots(report, path.parent)
    lines = [
        f"# Distillation report: {report.run_name}",
        "",
        verdict(report, rules),
        "",
        f"Task `{report.task}`, {report.test_examples} held-out test examples, report schema "
        f"{report.schema_version}. "
        + _hardware_note(report)
        + _servers_note(report)
        + _twins_note(report)
        + _cost_note(report)
        + _latency_note(report.engine)
        + " The prompt's share of request time is time to first token over end-to-end "
        "time through the server at the lowest concurrency: the part of a request's serving time its prompt takes. "
        + _roofline_note(report)
        + _serving_note(report)
        + _pruned_note(report)
        + _constraint_note(report),
        "",
        *_table(report),
        "",
    ]
    lines += _judge_section(report.judge)
    lines += _break_even_section(report.break_even or None) + _forgetting_section(report.forgetting)
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    write_text(path, "\n".join(lines) + "\n")
    return [path, *plots]


def _judge_section(judge: JudgeSection | None) -> list[str]:
    """The judge's grades and pairwise results per system, and how far the judge can be trusted."""
    if not judge:
        return []
    lines = [
        "## Judge",
        "",
        f"Every answer graded 1-10 by `{judge.model}` ({judge.backend}"
        + (", constrained to the grades" if judge.constrained else "")
        + f') against the rubric: "{judge.rubric}". A grade of {judge.pass_threshold} or more passes, and '
        "a system's accuracy above is its pass rate. Against the teacher, each pair of answers was judged in both "
        "orders: a win or loss needs both orders to agree, a disagreement is a tie; an answer identical to the "
        "teacher's is a tie without asking (`identical`). The length-controlled win rate "
        "is a logistic regression of the outcome on the difference in words, read at equal length.",
        "",
        "| system | pass rate [95% CI] | mean grade | unreadable grades | vs teacher win / tie / loss "
        "| win + tie [95% CI] | win rate | length-controlled | mean words | ROUGE-L | chrF |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in judge.systems.items():
        versus = m.vs_teacher
        grade = f"{m.grade_mean:.2f}" if m.grade_mean is not None else "-"
        if versus and versus.n:
            pairwise = (
                f"{versus.win} / {versus.tie} / {versus.loss}"
                + (f" ({versus.unparsed} unreadable)" if versus.unparsed else "")
                + (f" ({versus.identical} identical)" if versus.identical else "")
                + f" | {versus.win_or_tie_rate:.2f}{interval_text(versus.win_or_tie_ci95)} | {versus.win_rate:.2f} "
                f"| {versus.length_controlled_win_rate:.2f}"
            )
        else:
            pairwise = "- | - | - | -"
        reference = m.reference
        metrics = f"{reference.rouge_l:.3f} | {reference.chrf:.1f}" if reference else "- | -"
        lines.append(
            f"| {name} | {m.pass_rate:.2f}{interval_text(m.pass_rate_ci95)} | {grade} | {m.grades_unparsed} "
            f"| {pairwise} | {m.mean_words:.1f} | {metrics} |"
        )
    return [*lines, "", judge_reliability_sentence(judge), ""]


def _stage_said(even: BreakEven, stage: str) -> str:
    """ "train 3,600 s on 8 devices": a stage's wall time and the devices it held (older reports: no count)."""
    said = f"{stage} {even.one_off_wall_s.get(stage, 0.0):,.0f} s"
    devices = (even.one_off_devices or {}).get(stage)
    return said + (f" on {devices} device{'s' if devices != 1 else ''}" if devices else "")


def _one_off_said(even: BreakEven) -> str:
    """Where the one-off cost came from: generate + train wall time on the devices each held of the pipeline's
    profile, or a hosted teacher's tokens at its list price plus training's time."""
    rate = f" at ${even.pipeline_usd_per_hour:.2f}/hour each" if even.pipeline_usd_per_hour else ""
    hours = sum((even.one_off_device_hours or {}).values())
    device_hours = f", {hours:,.2f} device-hours" if even.one_off_device_hours else ""
    generate_usd = even.generate_usd_at_list_price
    if even.teacher_scored_tokens:  # on-policy training: the teacher's work inside train's time
        device_hours += (
            f"; in train, the teacher scored {even.teacher_scored_tokens:,} tokens (its prompt and the student's "
            f"answer, prefill only) and the student sampled {even.student_sampled_tokens:,}"
        )
    if generate_usd is None:
        stages = ", ".join(_stage_said(even, stage) for stage in even.one_off_wall_s)
        return f"{stages}, of `{even.pipeline_hardware}`{rate}{device_hours}"
    scoring = even.scoring_usd_at_list_price
    billed = f"; train's scoring ${scoring:.4f}, the tokens it scored at its input price" if scoring else ""
    return (
        f"generate ${generate_usd:.4f}: the hosted teacher's tokens at its list price{billed}; "
        f"{_stage_said(even, 'train')} of `{even.pipeline_hardware}`{rate}"
    )


def _break_even_section(even: BreakEven | None) -> list[str]:
    if not even:
        return []
    lines = [
        "## Break-even",
        "",
        f"One-off cost ${even.one_off_usd:,.4f} ({_one_off_said(even)}).",
        "",
        "| against | saving per 1k requests | break-even (requests) | break-even (days) |",
        "|---|---|---|---|",
    ]
    baselines = {names.TEACHER: even, names.STUDENT_PROMPTED: even.vs_prompted}
    for name, row in baselines.items():
        if row:
            if row.skipped:
                after = f"not computed: {row.skipped} | - |"
            elif row.requests is None:
                after = "never (no saving) | - |"
            else:
                after = f"{row.requests:,.0f} | {row.days:.2f} |"
            lines.append(f"| {name} | ${row.saving_per_1k_requests_usd:.4f} | {after}")
    return lines + ["", f"Days at {even.requests_per_day:,.0f} requests/day (`benchmark.requests_per_day`).", ""]


def _forgetting_section(forgetting: Forgetting) -> list[str]:
    if not forgetting:
        return []
    lines = [
        "## Base capabilities (forgetting probe)",
        "",
        "| system | probe accuracy | leakage rate | n |",
        "|---|---|---|---|",
    ]
    probed = forgetting.systems
    for name, f in probed.items():
        lines.append(f"| {name} | {f.accuracy:.3f} | {f.leakage_rate:.3f} | {f.n} |")
    base, tuned = probed.get(names.STUDENT_BASE, ProbeSummary()), probed.get(names.STUDENT_TUNED, ProbeSummary())
    if base.plain_chat_template and base.shots:
        tuned_asked = (
            "the tuned student bare, as it is served" if not tuned.shots else f"the tuned student after {tuned.shots}"
        )
        lines += [
            "",
            f"The untuned student is a base model (no chat template of its own), shown {base.shots} worked "
            f"examples before each probe question (`benchmark.probe_shots`), as base models are evaluated, and "
            f"{tuned_asked}; each answer read up to the next turn it began itself. The change is general ability "
            "kept, the tuned student as asked against what the base model could do.",
        ]
    elif base.plain_chat_template:
        lines += [
            "",
            "The untuned student is a base model (no chat template of its own), asked the probe's questions in the "
            "plain chat format it was never trained on without worked examples (`benchmark.probe_shots` 0): a change "
            "against it measures that format learned as well as general ability kept.",
        ]
    change = forgetting.change
    if change and change.accuracy_test:
        said = []
        for value, test, what, how in (
            (change.accuracy, change.accuracy_test, "accuracy", "right"),
            (change.leakage_rate, change.leakage_rate_test, "leakage", "leaking"),
        ):
            said.append(
                f"{what} {value * 100:+.1f} points (the tuned student {how} and the untuned not on "
                f"{test.tuned_only} questions, the reverse on {test.base_only}; p = {test.p_value:.2g})"
            )
        lines += ["", "Tuned against untuned on the same questions (exact McNemar): " + "; ".join(said) + "."]
    trained = next((f.task_categories for f in probed.values() if f.task_categories), [])
    if trained:
        lines += [
            "",
            f"Left out of these figures: the probe categories the task itself trains ({', '.join(trained)}; "
            "`benchmark.probe_task_categories`), marked * below.",
        ]
    lines += ["", *_probe_categories(probed, trained)]
    harness = forgetting.lm_eval
    if harness and "skipped" in harness:
        lines += [f"lm-evaluation-harness: skipped ({harness['skipped']}).", ""]
    elif harness:
        lines += [
            "lm-evaluation-harness (adapter checked as applied):",
            "",
            "| system | task | metrics |",
            "|---|---|---|",
        ]
        for name, tasks in harness.items():
            for task_name, metrics in tasks.items():
                shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                lines.append(f"| {name} | {task_name} | {shown} |")
        lines.append("")
    return lines


def _probe_categories(probed: dict[str, ProbeSummary], trained: list[str]) -> list[str]:
    """Probe accuracy per category and system, the tuned student's largest losses first: where general ability
    moved, and a category the task itself trains (arithmetic questions in an arithmetic task) rising; those
    named in `trained` are marked."""
    with_categories = {name: f.per_category for name, f in probed.items() if f.per_category}
    if not with_categories:
        return []
    sizes = next((f.per_category_n for f in probed.values() if f.per_category_n), {})
    categories = sorted({c for per in with_categories.values() for c in per})
    base, tuned = with_categories.get(names.STUDENT_BASE), with_categories.get(names.STUDENT_TUNED)
    changes = {c: tuned.get(c, 0) - base.get(c, 0) for c in categories} if base and tuned else {}
    categories.sort(key=lambda c: changes.get(c, 0))  # stable: alphabetical without a change to sort by
    header = ["category", *(["n"] if sizes else []), *with_categories, *(["change"] if changes else [])]
    lines = ["Probe accuracy per category:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for category in categories:
        cells = [category + (" *" if category in trained else ""), *([str(sizes.get(category, ""))] if sizes else [])]
        cells += [f"{per[category]:.3f}" if category in per else "-" for per in with_categories.values()]
        cells += [f"{changes[category]:+.3f}"] if changes else []
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]
