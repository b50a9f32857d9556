"""report.md and PNG plots from report.json: the verdict first, then the numbers it was computed from; and
`distill compare`, finished runs side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline import names
from pipeline.benchmark.verdict import cost, judge_reliability_sentence, latency_p50, lowest_load_level, verdict
from pipeline.config import VerdictConfig
from pipeline.console import PipelineError
from pipeline.files import write_text
from pipeline.layout import RunLayout, read_manifest
from pipeline.names import LATENCY_PERCENTILES, latency_key


def _ci(values: list[float] | None) -> str:
    return f" [{values[0]:.2f}, {values[1]:.2f}]" if values else ""


def _table(report: dict[str, Any]) -> list[str]:
    lines = [
        "| system | prompt | accuracy [95% CI] | mean prompt tok | prompt share of request time "
        "| offline p50 warm / cold (s) | offline output tok/s | decode roofline share "
        "| hardware | $ / 1M input tok | $ / 1M output tok | $ / 1k requests |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["systems"].items():
        share = m.get("decode_roofline_share")
        lines.append(
            f"| {name} | {m['prompt_style']} | {m['accuracy']:.3f}{_ci(m.get('accuracy_ci95'))} "
            f"| {m['mean_prompt_tokens']:.0f} | {_prompt_share(m)} "
            f"| {m['latency_p50_s']:.2f} / {m.get('latency_cold_p50_s', float('nan')):.2f} "
            f"| {m['output_tokens_per_s']:.1f} | {'-' if share is None else f'{share:.1%}'} "
            f"| {m.get('hardware') or ('list price' if m.get('cost_basis') == names.LIST_PRICE_BASIS else '')} "
            f"| {m.get('cost_per_1m_input_tokens', float('nan')):.3f} | {m['cost_per_1m_output_tokens']:.3f} "
            f"| {m.get('cost_per_1k_requests', float('nan')):.4f} |"
        )
    rules = sorted({rule for m in report["systems"].values() for rule in m["rule_accuracy"]})
    lines += ["", "| system | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    for name, m in report["systems"].items():
        cis = m.get("rule_accuracy_ci95", {})
        cells = [f"{m['rule_accuracy'].get(r, float('nan')):.3f}{_ci(cis.get(r))}" for r in rules]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += _failures_table(report)
    tests = report.get("comparisons", {}).get("student_tuned_vs")
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
                f"| {other} | {t['accuracy_diff']:+.3f} | {t['tuned_only_correct']} | {t['other_only_correct']} "
                f"| {t['p_value']:.3g} |"
            )
    loads = {name: m["load"] for name, m in report["systems"].items() if m.get("load")}
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

        def trio(level: dict[str, Any], measure: str, scale: float = 1.0, digits: int = 2) -> str:
            values = [level.get(latency_key(measure, q)) for q in LATENCY_PERCENTILES]
            return " / ".join("-" if v is None else f"{v * scale:.{digits}f}" for v in values)

        for name, levels in loads.items():
            for concurrency, level in levels.items():
                lines.append(
                    f"| {name} | {concurrency} | {trio(level, 'ttft')} | {trio(level, 'tpot', 1000, 1)} "
                    f"| {trio(level, 'e2e')} | {level['requests_per_s']:.2f} | {level['output_tokens_per_s']:.1f} |"
                )
    return lines


def _failures_table(report: dict[str, Any]) -> list[str]:
    """Accuracy per example category and the rate of each named failure mode, per system (schema 2 reports
    written before these fields existed have neither)."""
    systems = {name: m for name, m in report["systems"].items() if "category_accuracy" in m}
    if not systems:
        return []
    categories = sorted({c for m in systems.values() for c in m["category_accuracy"]})
    modes = sorted({f for m in systems.values() for f in m["failure_rates"]})
    sizes = next(iter(systems.values()))["category_n"]  # every system answers the same test split
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
            f"{m['category_accuracy'].get(c, float('nan')):.3f}{_ci(m['category_accuracy_ci95'].get(c))}"
            for c in categories
        ]
        cells += [f"{m['failure_rates'].get(f, float('nan')):.1%}" for f in modes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _prompt_share(metrics: dict[str, Any]) -> str:
    """Time to first token over end-to-end time through the server at the lowest concurrency (no queueing)."""
    lowest = lowest_load_level(metrics)
    share = lowest[1].get("prompt_time_share") if lowest else None
    return "-" if share is None else f"{share:.0%}"


def _serving_note(report: dict[str, Any]) -> str:
    serving = report["systems"][names.STUDENT_TUNED].get("serving", "weights")
    if serving == "weights":
        return "The tuned student was served as merged weights (the adapter folded in)."
    return (
        "The tuned student was served as the base model plus its unmerged LoRA adapter (vLLM `enable_lora`): "
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
            f"offline latency from requests run one at a time on {name}, warm (shared prompt prefixes served "
            "from vLLM's prefix cache, as on a busy server) and cold (the cache cleared before each request)."
        )
    if engine == "transformers":
        return (
            f"offline latency from requests run one at a time on {name}, which has no prefix cache: every "
            "request computes its whole prompt, so warm and cold are the same work measured twice."
        )
    return (
        f"offline latency from requests run one at a time through {name}, end to end over the network; whether "
        "the server caches prompt prefixes is its own business, so warm and cold cannot be told apart here."
    )


def _hardware_note(report: dict[str, Any]) -> str:
    """One sentence: the machine detected, and the profiles used and how they were chosen."""
    hardware = report.get("hardware")
    if not hardware:
        return ""
    profiles = hardware["profiles"]

    def said(key: str, source: str) -> str:
        profile = profiles.get(key, {})
        limits = []
        if profile.get("memory_gbps"):
            limits.append(f"{profile['memory_gbps']:,.0f} GB/s")
        if profile.get("peak_tflops"):
            limits.append(f"{profile['peak_tflops']:g} TFLOP/s")
        measured = " measured here" if source == "detected" and key.startswith("cpu-") else ""
        shown = f", {', '.join(limits)}{measured}" if limits else ", limits unknown"
        return f"`{key}` ({source}; ${profile.get('usd_per_hour', float('nan')):.2f}/hour{shown})"

    serving = said(hardware["serving_hardware"], hardware["serving_source"])
    # A hosted teacher's generate is priced by its tokens (the break-even section): only training is timed here.
    one_off = "generate + train"
    if (report.get("break_even") or {}).get("generate_usd_at_list_price") is not None:
        one_off = "train"
    if hardware["pipeline_hardware"] == hardware["serving_hardware"]:
        where = f"Systems and the one-off {one_off} are priced on {serving}"
    else:
        pipeline = said(hardware["pipeline_hardware"], hardware["pipeline_source"])
        where = f"Systems are priced on {serving}, {one_off} on {pipeline}"
    if any(m.get("server") for m in report.get("systems", {}).values()):
        where += " (systems on their own server: below)"
    own = sorted(
        {m["hardware"] for m in report.get("systems", {}).values() if m.get("hardware")}
        - {hardware["serving_hardware"]}
    )
    if own:
        where += f" (systems that name their own `hardware` on theirs: {', '.join(f'`{k}`' for k in own)})"
    return f"Ran on {hardware['device']}. {where}. "


def _servers_note(report: dict[str, Any]) -> str:
    """Systems measured through their own OpenAI-compatible server (a hosted or remote teacher)."""
    said = []
    for name, m in report["systems"].items():
        if not m.get("server"):
            continue
        if m.get("cost_basis") == names.LIST_PRICE_BASIS:
            priced = (
                f"priced at its list price (${m['cost_per_1m_input_tokens']:g} / ${m['cost_per_1m_output_tokens']:g} "
                "per 1M input / output tokens)"
            )
        else:
            priced = f"priced on `{m.get('hardware')}`"
        said.append(
            f"`{name}` was measured through its server ({m['server']}): its latency includes the network, its warm "
            f"and cold latency cannot be told apart, and it is {priced}. "
        )
    return "".join(said)


def _cost_note(report: dict[str, Any]) -> str:
    """How serving cost was reached: machine time over measured throughput, save for systems priced by the token."""
    basis = report["systems"][names.STUDENT_TUNED].get("cost_basis", "the offline engine's batched throughput")
    listed = [f"`{name}`" for name, m in report["systems"].items() if m.get("cost_basis") == names.LIST_PRICE_BASIS]
    by_token = f", except {', '.join(listed)}, priced by the token at its list price" if listed else ""
    return f"Serving cost from each system's hardware $/hour and its measured throughput ({basis}){by_token}; "


def _twins_note(report: dict[str, Any]) -> str:
    """Systems measured once because they are another's model with its prompt (systems.twins)."""
    said = [
        f"`{name}` is `{m['measured_as']}`'s model with its prompt, so it was measured once: its row is "
        f"`{m['measured_as']}`'s. "
        for name, m in report["systems"].items()
        if m.get("measured_as")
    ]
    return "".join(said)


def _roofline_note(report: dict[str, Any]) -> str:
    tuned = report["systems"][names.STUDENT_TUNED]
    if "decode_roofline_share" not in tuned:
        return ""
    return (
        "The decode roofline share is a system's decode speed for one request ("
        + tuned["decode_basis"]
        + ") over its hardware's ceiling, memory bandwidth over the bytes of the weights one decode step reads "
        f"(the tuned student: {tuned['decode_tokens_per_s']:.1f} of {tuned['decode_ceiling_tokens_per_s']:,.0f} "
        f"tok/s, {tuned['weight_bytes'] / 1e6:,.0f} MB of {tuned['weight_dtype']} weights; the input embedding "
        "table is looked up, not read). "
    )


def _constraint_note(report: dict[str, Any]) -> str:
    choices = report.get("answer_choices")
    if not choices:
        return ""
    return (
        f" Every system's answers were constrained to the task's {len(choices)} labels (`benchmark.constrained`), "
        "so none can answer with an invalid label."
    )


def write_report(report: dict[str, Any], path: Path, rules: VerdictConfig | None = None) -> list[Path]:
    """Write report.md to `path` (the verdict by `rules`, default `benchmark.verdict`'s) and its plots beside it;
    return the paths written."""
    plots = _plots(report, path.parent)
    lines = [
        f"# Distillation report: {report['run_name']}",
        "",
        verdict(report, rules),
        "",
        f"Task `{report['task']}`, {report['test_examples']} held-out test examples, report schema "
        f"{report.get('schema_version', 1)}. "
        + _hardware_note(report)
        + _servers_note(report)
        + _twins_note(report)
        + _cost_note(report)
        + _latency_note(report.get("engine", "vllm"))
        + " The prompt's share of request time is time to first token over end-to-end "
        "time through the server at the lowest concurrency: the part of a request's serving time its prompt takes. "
        + _roofline_note(report)
        + _serving_note(report)
        + _constraint_note(report),
        "",
        *_table(report),
        "",
    ]
    lines += _judge_section(report.get("judge"))
    lines += _break_even_section(report.get("break_even")) + _forgetting_section(report.get("forgetting", {}))
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    write_text(path, "\n".join(lines) + "\n")
    return [path, *plots]


def _judge_section(judge: dict[str, Any] | None) -> list[str]:
    """The judge's grades and pairwise results per system, and how far the judge can be trusted."""
    if not judge:
        return []
    lines = [
        "## Judge",
        "",
        f"Every answer graded 1-10 by `{judge['model']}` ({judge['backend']}"
        + (", constrained to the grades" if judge.get("constrained") else "")
        + f') against the rubric: "{judge["rubric"]}". A grade of {judge["pass_threshold"]} or more passes, and '
        "a system's accuracy above is its pass rate. Against the teacher, each pair of answers was judged in both "
        "orders: a win or loss needs both orders to agree, a disagreement is a tie; an answer identical to the "
        "teacher's is a tie without asking (`identical`). The length-controlled win rate "
        "is a logistic regression of the outcome on the difference in words, read at equal length.",
        "",
        "| system | pass rate [95% CI] | mean grade | unreadable grades | vs teacher win / tie / loss "
        "| win + tie [95% CI] | win rate | length-controlled | mean words | ROUGE-L | chrF |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in judge["systems"].items():
        versus = m.get("vs_teacher")
        grade = f"{m['grade_mean']:.2f}" if m["grade_mean"] is not None else "-"
        if versus and versus["n"]:
            pairwise = (
                f"{versus['win']} / {versus['tie']} / {versus['loss']}"
                + (f" ({versus['unparsed']} unreadable)" if versus["unparsed"] else "")
                + (f" ({versus['identical']} identical)" if versus.get("identical") else "")
                + f" | {versus['win_or_tie_rate']:.2f}{_ci(versus['win_or_tie_ci95'])} | {versus['win_rate']:.2f} "
                f"| {versus['length_controlled_win_rate']:.2f}"
            )
        else:
            pairwise = "- | - | - | -"
        reference = m.get("reference")
        metrics = f"{reference['rouge_l']:.3f} | {reference['chrf']:.1f}" if reference else "- | -"
        lines.append(
            f"| {name} | {m['pass_rate']:.2f}{_ci(m['pass_rate_ci95'])} | {grade} | {m['grades_unparsed']} "
            f"| {pairwise} | {m['mean_words']:.1f} | {metrics} |"
        )
    return [*lines, "", judge_reliability_sentence(judge), ""]


def _one_off_said(even: dict[str, Any], walls: str) -> str:
    """Where the one-off cost came from: generate + train wall time on the pipeline's machine, or a hosted
    teacher's tokens at its list price plus training's time."""
    generate_usd = even.get("generate_usd_at_list_price")
    if generate_usd is None:
        return f"{walls} on {even['pipeline_hardware']}"
    train_s = even["one_off_wall_s"].get("train", 0.0)
    return (
        f"generate ${generate_usd:.4f}: the hosted teacher's tokens at its list price; "
        f"train {train_s:.0f} s on {even['pipeline_hardware']}"
    )


def _break_even_section(even: dict[str, Any] | None) -> list[str]:
    if not even:
        return []
    walls = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in even["one_off_wall_s"].items())
    lines = [
        "## Break-even",
        "",
        f"One-off cost ${even['one_off_usd']:.4f} ({_one_off_said(even, walls)}).",
        "",
        "| against | saving per 1k requests | break-even (requests) | break-even (days) |",
        "|---|---|---|---|",
    ]
    baselines = {names.TEACHER: even, names.STUDENT_PROMPTED: even.get("vs_prompted")}
    for name, row in baselines.items():
        if row:
            if row.get("skipped"):
                after = f"not computed: {row['skipped']} | - |"
            elif row["requests"] is None:
                after = "never (no saving) | - |"
            else:
                after = f"{row['requests']:,.0f} | {row['days']:.2f} |"
            lines.append(f"| {name} | ${row['saving_per_1k_requests_usd']:.4f} | {after}")
    return lines + ["", f"Days at {even['requests_per_day']:,.0f} requests/day (`benchmark.requests_per_day`).", ""]


def _forgetting_section(forgetting: dict[str, Any]) -> list[str]:
    if not forgetting:
        return []
    lines = [
        "## Base capabilities (forgetting probe)",
        "",
        "| system | probe accuracy | leakage rate | n |",
        "|---|---|---|---|",
    ]
    probed = {name: f for name, f in forgetting.items() if name not in ("change", "lm_eval")}
    for name, f in probed.items():
        lines.append(f"| {name} | {f['accuracy']:.3f} | {f['leakage_rate']:.3f} | {f['n']} |")
    base, tuned = probed.get(names.STUDENT_BASE, {}), probed.get(names.STUDENT_TUNED, {})
    if base.get("plain_chat_template") and base.get("shots"):
        tuned_asked = (
            "the tuned student bare, as it is served"
            if not tuned.get("shots")
            else f"the tuned student after {tuned['shots']}"
        )
        lines += [
            "",
            f"The untuned student is a base model (no chat template of its own), shown {base['shots']} worked "
            f"examples before each probe question (`benchmark.probe_shots`), as base models are evaluated, and "
            f"{tuned_asked}; each answer read up to the next turn it began itself. The change is general ability "
            "kept, the tuned student as asked against what the base model could do.",
        ]
    elif base.get("plain_chat_template"):
        lines += [
            "",
            "The untuned student is a base model (no chat template of its own), asked the probe's questions in the "
            "plain chat format it was never trained on without worked examples (`benchmark.probe_shots` 0): a change "
            "against it measures that format learned as well as general ability kept.",
        ]
    change = forgetting.get("change") or {}
    if "accuracy_test" in change:
        said = []
        for measure, what, how in (("accuracy", "accuracy", "right"), ("leakage_rate", "leakage", "leaking")):
            t = change[f"{measure}_test"]
            said.append(
                f"{what} {change[measure] * 100:+.1f} points (the tuned student {how} and the untuned not on "
                f"{t['tuned_only']} questions, the reverse on {t['base_only']}; p = {t['p_value']:.2g})"
            )
        lines += ["", "Tuned against untuned on the same questions (exact McNemar): " + "; ".join(said) + "."]
    trained = next((f["task_categories"] for f in probed.values() if f.get("task_categories")), [])
    if trained:
        lines += [
            "",
            f"Left out of these figures: the probe categories the task itself trains ({', '.join(trained)}; "
            "`benchmark.probe_task_categories`), marked * below.",
        ]
    lines += ["", *_probe_categories(probed, trained)]
    harness = forgetting.get("lm_eval")
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


def _probe_categories(probed: dict[str, dict[str, Any]], trained: list[str]) -> list[str]:
    """Probe accuracy per category and system, the tuned student's largest losses first: where general ability
    moved, and a category the task itself trains (arithmetic questions in an arithmetic task) rising; those
    named in `trained` are marked."""
    with_categories = {name: f["per_category"] for name, f in probed.items() if f.get("per_category")}
    if not with_categories:
        return []
    sizes = next((f["per_category_n"] for f in probed.values() if f.get("per_category_n")), {})
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


def _plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    paths = [_accuracy_vs_cost(report, out_dir), _offline_latency(report, out_dir)]
    if report.get("latency_cdf"):
        paths += [_latency_cdf(report, out_dir), _throughput_vs_concurrency(report, out_dir)]
    probe = _probe_changes(report.get("forgetting") or {}, out_dir)
    return paths + ([probe] if probe else [])


def _probe_changes(forgetting: dict[str, Any], out_dir: Path) -> Path | None:
    """The tuned student's probe accuracy change per category, in questions: where general ability moved
    (the categories the task itself trains drawn apart, as they are left out of the forgetting figures)."""
    import matplotlib.pyplot as plt

    base, tuned = forgetting.get(names.STUDENT_BASE, {}), forgetting.get(names.STUDENT_TUNED, {})
    sizes = tuned.get("per_category_n") or {}
    if not (base.get("per_category") and tuned.get("per_category") and sizes):
        return None
    trained = set(tuned.get("task_categories") or [])
    moved = {c: round((tuned["per_category"][c] - base["per_category"].get(c, 0)) * sizes[c]) for c in sizes}
    order = sorted(moved, key=lambda c: moved[c])
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(order) + 1.4))
    colors = ["0.6" if c in trained else ("tab:red" if moved[c] < 0 else "tab:green") for c in order]
    ax.barh(
        [f"{c} (n={sizes[c]})" + (" *" if c in trained else "") for c in order], [moved[c] for c in order], color=colors
    )
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("questions gained (+) or lost (-), tuned against untuned student")
    ax.set_title("General probe per category" + (" (* the task's own)" if trained else ""))
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out_dir / "probe_by_category.png")


def _accuracy_vs_cost(report: dict[str, Any], out_dir: Path) -> Path:
    import matplotlib.pyplot as plt

    systems = report["systems"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, m in systems.items():
        low, high = m.get("accuracy_ci95", [m["accuracy"], m["accuracy"]])
        error = [[m["accuracy"] - low], [high - m["accuracy"]]]
        ax.errorbar(cost(m), m["accuracy"], yerr=error, fmt="o", capsize=4, label=name)  # a legend: points may touch
    first = next(iter(systems.values()))
    ax.set_xlabel("$ per 1,000 requests" if "cost_per_1k_requests" in first else "$ per 1M output tokens")
    ax.set_ylabel("task accuracy (95% CI)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Accuracy against serving cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, out_dir / "accuracy_vs_cost.png")


def _offline_latency(report: dict[str, Any], out_dir: Path) -> Path:
    import matplotlib.pyplot as plt

    systems = report["systems"]
    system_names = list(systems)
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(system_names))
    ax.bar([i - 0.2 for i in x], [systems[n]["latency_p50_s"] for n in system_names], width=0.4, label="p50, warm")
    ax.bar(
        [i + 0.2 for i in x],
        [systems[n].get("latency_cold_p50_s", float("nan")) for n in system_names],
        width=0.4,
        label="p50, cold (no prefix cache)",
    )
    ax.set_xticks(list(x), system_names, rotation=15)
    ax.set_ylabel("seconds per request")
    ax.set_title("Offline engine latency (one request at a time)")
    ax.legend()
    return _save(fig, out_dir / "latency.png")


def _latency_cdf(report: dict[str, Any], out_dir: Path) -> Path:
    import matplotlib.pyplot as plt

    cdfs = report["latency_cdf"]
    levels = sorted({level for per_system in cdfs.values() for level in per_system}, key=int)
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3.8), sharey=True, squeeze=False)
    for ax, level in zip(axes[0], levels, strict=True):
        for name, per_system in cdfs.items():
            values = sorted(per_system.get(level, []))
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=name)
        ax.set_title(f"concurrency {level}")
        ax.set_xlabel("end-to-end latency (s)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of requests")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Latency CDF through vllm serve")
    return _save(fig, out_dir / "latency_cdf.png")


def _throughput_vs_concurrency(report: dict[str, Any], out_dir: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in report["systems"].items():
        load = m.get("load")
        if load:
            levels = sorted(load, key=int)
            ax.plot([int(c) for c in levels], [load[c]["output_tokens_per_s"] for c in levels], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Throughput against concurrency (vllm serve)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir / "throughput_vs_concurrency.png")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _failure_summary(metrics: dict[str, Any]) -> str:
    """`wrong_kb_article 65%, truncated 3%`: the failure modes a system showed, most frequent first."""
    rates = sorted(((rate, mode) for mode, rate in metrics.get("failure_rates", {}).items() if rate > 0), reverse=True)
    return ", ".join(f"{mode} {rate:.0%}" for rate, mode in rates) or "-"


def compare_runs(run_dirs: list[Path]) -> str:
    """A markdown table of finished runs side by side (`distill compare runs/a runs/b`): how each student was
    trained (objective, method, rank, learning rate, epochs, packing, replay fraction, the prompt it trained and
    serves with: the knobs the verdict names against forgetting), and what
    the benchmark measured for it against its teacher and untuned base, with an exact McNemar test of its test
    answers against the first run's where both kept records.jsonl (the same test examples, paired)."""
    header = (
        "| run | objective | method | LoRA r | lr | epochs | packing | replay | prompt | steps | train s | tuned acc "
        "| vs base "
        "| kept of teacher | p50 vs teacher | $/1M out | probe acc change | leakage change | $/1k req "
        "| p vs first run | tuned failure modes |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    labels = [run_dir.name for run_dir in run_dirs]
    if len(set(labels)) < len(labels):  # one run name from several runs folders: the folders as given
        labels = [str(run_dir) for run_dir in run_dirs]
    first: dict[str, bool] | None = None
    for index, (run_dir, label) in enumerate(zip(run_dirs, labels, strict=True)):
        layout = RunLayout(run_dir)
        for path in (layout.report_json, layout.manifest("train")):
            if not path.is_file():
                raise PipelineError(f"{path}: not found; compare takes run folders whose benchmark has run")
        report, train = json.loads(layout.report_json.read_text()), read_manifest(layout.stage_dir("train"))
        config, metrics = train["config"]["train"], train["metrics"]
        prompt = train["config"].get("student", {}).get("prompt_style") or "-"
        systems = report["systems"]
        teacher, base, tuned = systems[names.TEACHER], systems[names.STUDENT_BASE], systems[names.STUDENT_TUNED]
        change = report.get("forgetting", {}).get("change", {})
        kept = tuned["accuracy"] / teacher["accuracy"] if teacher["accuracy"] else float("nan")
        outcomes = _tuned_outcomes(layout.records)
        if index == 0:
            first, versus_first = outcomes, "-"
        else:
            versus_first = _paired_p(first, outcomes)
        per_request = tuned.get("cost_per_1k_requests")
        lines.append(
            f"| {label} | {config.get('objective', 'sft')} | {config.get('method', 'lora')} "
            f"| {config['lora']['r']} | {_number(config.get('learning_rate'))} "
            f"| {_number(config.get('num_train_epochs'))} | {config.get('packing', False)} "
            f"| {config.get('replay', {}).get('fraction', 0):g} | {prompt} | {metrics.get('steps')} "
            f"| {metrics.get('train_runtime_s', float('nan')):.0f} | {tuned['accuracy']:.3f}"
            f"{_ci(tuned.get('accuracy_ci95'))} "
            f"| {tuned['accuracy'] - base['accuracy']:+.3f} | {kept:.0%} "
            f"| {latency_p50(tuned) / latency_p50(teacher):.2f}x | {tuned['cost_per_1m_output_tokens']:.3f} "
            f"| {change.get('accuracy', float('nan')):+.3f} | {change.get('leakage_rate', float('nan')):+.3f} "
            f"| {f'{per_request:.4f}' if per_request is not None else '-'} | {versus_first} "
            f"| {_failure_summary(tuned)} |"
        )
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _tuned_outcomes(records: Path) -> dict[str, bool] | None:
    """The tuned student's right/wrong per test example id from a run's records.jsonl; None without one."""
    if not records.is_file():
        return None
    from pipeline.benchmark.evaluate import task_outcomes
    from pipeline.files import read_jsonl

    return task_outcomes(list(read_jsonl(records)), names.STUDENT_TUNED)


def _paired_p(first: dict[str, bool] | None, other: dict[str, bool] | None) -> str:
    """Exact McNemar p of two runs' tuned students on the test examples both answered; "-" without records."""
    if not first or not other:
        return "-"
    from pipeline.benchmark.stats import mcnemar

    shared = sorted(first.keys() & other.keys())
    if not shared:
        return "-"
    return f"{mcnemar([other[i] for i in shared], [first[i] for i in shared])['p_value']:.3g}"
