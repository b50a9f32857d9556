"""report.md and PNG plots from report.json: numbers first, then a verdict computed from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.runs import write_text


def lowest_load_level(metrics: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The load test's lowest concurrency and its summary (what one user sees, no queueing); None without one."""
    load = metrics.get("load")
    if not load:
        return None
    level = min(load, key=int)
    return level, load[level]


def latency_p50(metrics: dict[str, Any]) -> float:
    """End-to-end p50 through the server at its lowest concurrency, else the offline one-at-a-time p50."""
    lowest = lowest_load_level(metrics)
    return lowest[1]["e2e_p50_s"] if lowest else metrics["latency_p50_s"]


def _cost(metrics: dict[str, Any]) -> float:
    """$ per 1k requests where measured (schema 2), else $ per 1M output tokens (schema 1 reports)."""
    return metrics.get("cost_per_1k_requests", metrics["cost_per_1m_output_tokens"])


def _interval(values: list[float] | None) -> str:
    return f" (95% CI {values[0]:.0%}-{values[1]:.0%})" if values and all(v == v for v in values) else ""


def _payback(even: dict[str, Any], requests_per_day: float | None = None) -> str:
    rate = f" at {requests_per_day:,.0f} requests/day" if requests_per_day else ""
    return f"{even['requests']:,.0f} requests ({even['days']:.1f} days{rate})"


def _against_prompted(tuned: dict[str, Any], prompted: dict[str, Any], p_value: float | None) -> str:
    """'better', 'worse' or 'tie': the tuned student against the prompted one, by the paired test where there is one."""
    differs = p_value is None or p_value < 0.05
    if differs and prompted["accuracy"] > tuned["accuracy"]:
        return "worse"
    if differs and tuned["accuracy"] > prompted["accuracy"]:
        return "better"
    return "tie"


def verdict(report: dict[str, Any]) -> str:
    """One paragraph answering 'was fine-tuning worth it here?', computed from the numbers.

    Fine-tuning has to beat the untuned student measurably, and then earn its keep against the cheapest
    alternative: prompting the untuned student. Where prompting matches it, only a lower serving cost can
    justify fine-tuning, and the break-even against prompting says how soon that pays."""
    systems = report["systems"]
    teacher, base, tuned = systems["teacher"], systems["student_base"], systems["student_tuned"]
    tests = report.get("comparisons", {}).get("student_tuned_vs", {})
    gain = tuned["accuracy"] - base["accuracy"]
    p_base = tests.get("student_base", {}).get("p_value")
    kept = tuned["accuracy"] / teacher["accuracy"] if teacher["accuracy"] > 0 else float("nan")
    kept_ci = report.get("comparisons", {}).get("kept_of_teacher", {}).get("ci95")
    cost_ratio = _cost(tuned) / _cost(teacher)
    latency_ratio = latency_p50(tuned) / latency_p50(teacher)
    unit = "per 1k requests" if "cost_per_1k_requests" in tuned else "per 1M output tokens"
    even = report.get("break_even")
    significance = f", paired McNemar p = {p_base:.3g}" if p_base is not None else ""
    keeps = f"so the tuned student keeps {kept:.0%} of it{_interval(kept_ci)}" if kept == kept else "none to keep"
    parts = [
        f"Fine-tuning moved the student's accuracy from {base['accuracy']:.1%} to {tuned['accuracy']:.1%} "
        f"({gain:+.1%}{significance}); the teacher scores {teacher['accuracy']:.1%}, {keeps}."
    ]
    prompted = systems.get("student_prompted")
    versus_prompted, prompted_cost_ratio = None, float("nan")
    if prompted:
        p_prompted = tests.get("student_prompted", {}).get("p_value")
        versus_prompted = _against_prompted(tuned, prompted, p_prompted)
        prompted_cost_ratio = _cost(tuned) / _cost(prompted)
        parts.append(
            f"Prompting the untuned student with the teacher's full prompt instead scores {prompted['accuracy']:.1%}"
            + (f" (p = {p_prompted:.3g} against the tuned student)" if p_prompted is not None else "")
            + f" and costs ${_cost(prompted):.4f} {unit}, so the tuned student serves at {prompted_cost_ratio:.2f}x "
            "the cost of prompting."
        )
    parts.append(
        f"Serving it costs {cost_ratio:.2f}x the teacher (${_cost(tuned):.4f} vs ${_cost(teacher):.4f} {unit}) "
        f"and its p50 latency is {latency_ratio:.2f}x the teacher's."
    )
    failing = _where_it_fails(report)
    if failing:
        parts.append(failing)
    parts += _tuned_variants(report, unit)
    change = report.get("forgetting", {}).get("change")
    if change:
        parts.append(
            f"On the general probe, accuracy changed by {change['accuracy']:+.1%} and the leakage rate "
            f"by {change['leakage_rate']:+.1%}."
        )
    vs_prompted = (even or {}).get("vs_prompted")
    if even:
        spent = f"Distilling cost ${even['one_off_usd']:.2f} (generate + train on {even['pipeline_hardware']})"
        if even["requests"] is None:
            spent += " and never pays back against the teacher: the tuned student is not cheaper per request"
        else:
            spent += f", paid back against the teacher after {_payback(even, even['requests_per_day'])}"
        if vs_prompted and vs_prompted["requests"] is not None:
            spent += f" and against prompting after {_payback(vs_prompted)}"
        elif vs_prompted:
            spent += "; against prompting it never pays back"
        parts.append(spent + ".")
    significant = gain > 0 and (p_base is None or p_base < 0.05)
    forgot = bool(change) and (change["accuracy"] < -0.05 or change["leakage_rate"] > 0.10)
    cheaper_than_prompting = prompted_cost_ratio < 1
    if not significant:
        parts.append("Verdict: not worth it — fine-tuning did not measurably beat the untuned student.")
    elif versus_prompted == "worse":
        parts.append(
            "Verdict: not worth it — prompting the untuned student did better"
            + (", though at a higher cost per request." if cheaper_than_prompting else ", for no more cost.")
            + (" The tuned student also regressed on base capabilities." if forgot else "")
        )
    elif versus_prompted == "tie" and not cheaper_than_prompting:
        parts.append(
            "Verdict: not worth it — prompting the untuned student did as well for no more cost per request; "
            "fine-tuning bought nothing."
            + (" The tuned student also regressed on base capabilities." if forgot else "")
        )
    elif forgot:
        parts.append(
            "Verdict: not worth it as trained — the task gain came with a regression on base capabilities "
            "(probe accuracy down more than 5 points or leakage up more than 10); train gentler (lower learning "
            "rate, fewer epochs, smaller rank) or mix general data in."
        )
    elif versus_prompted == "tie":
        parts.append(
            f"Verdict: worth it for cost only — prompting the untuned student did as well, but the tuned student "
            f"serves at {prompted_cost_ratio:.2f}x its cost per request"
            + (
                f", paid back after {vs_prompted['requests']:,.0f} requests."
                if vs_prompted and vs_prompted["requests"]
                else "."
            )
        )
    elif kept >= 0.9 and latency_ratio < 1 and cost_ratio < 1:
        parts.append(
            "Verdict: worth it — the tuned student does the task near the teacher's level, faster and cheaper."
        )
    else:
        parts.append("Verdict: mixed — fine-tuning helped, but see the numbers above before shipping it.")
    return " ".join(parts)


def _ci(values: list[float] | None) -> str:
    return f" [{values[0]:.2f}, {values[1]:.2f}]" if values else ""


def _table(report: dict[str, Any]) -> list[str]:
    lines = [
        "| system | prompt | accuracy [95% CI] | mean prompt tok | prompt share of request time "
        "| offline p50 warm / cold (s) | offline output tok/s "
        "| hardware | $ / 1M input tok | $ / 1M output tok | $ / 1k requests |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["systems"].items():
        lines.append(
            f"| {name} | {m['prompt_style']} | {m['accuracy']:.3f}{_ci(m.get('accuracy_ci95'))} "
            f"| {m['mean_prompt_tokens']:.0f} | {_prompt_share(m)} "
            f"| {m['latency_p50_s']:.2f} / {m.get('latency_cold_p50_s', float('nan')):.2f} "
            f"| {m['output_tokens_per_s']:.1f} | {m.get('hardware', '')} "
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
            "Under load through `vllm serve` (streamed requests; TTFT = time to first token, TPOT = time per "
            "output token after it):",
            "",
            "| system | concurrency | TTFT p50 / p95 / p99 (s) | TPOT p50 / p95 / p99 (ms) | e2e p50 / p95 / p99 (s) "
            "| requests/s | output tok/s |",
            "|---|---|---|---|---|---|---|",
        ]

        def trio(level: dict[str, Any], key: str, scale: float = 1.0, digits: int = 2) -> str:
            values = [level.get(f"{key}_p{q}_s") for q in (50, 95, 99)]
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
        "failure mode (`truncated`: cut off at max_tokens, never stopped).",
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


def _tuned_variants(report: dict[str, Any], unit: str) -> list[str]:
    """A sentence per other system serving the tuned student (e.g. given retrieved context, the background
    note's test of "fine-tuning learns style, not facts"): its accuracy and cost, against the tuned student."""
    systems, tests = report["systems"], report.get("comparisons", {}).get("student_tuned_vs", {})
    teacher, tuned = systems["teacher"], systems["student_tuned"]
    sentences = []
    for name, m in systems.items():
        same_student = "model" in m and (m["model"], m.get("serving")) == (tuned.get("model"), tuned.get("serving"))
        if name == "student_tuned" or not same_student:
            continue
        p_value = tests.get(name, {}).get("p_value")
        sentences.append(
            f"The tuned student with the `{m['prompt_style']}` prompt ({name}) scores {m['accuracy']:.1%}"
            + (f" (p = {p_value:.3g} against the tuned student)" if p_value is not None else "")
            + f" at ${_cost(m):.4f} {unit}, {_cost(m) / _cost(teacher):.2f}x the teacher."
        )
    return sentences


def _where_it_fails(report: dict[str, Any]) -> str:
    """The verdict's sentence on the named failure modes: the tuned student's largest category gap to the
    teacher (a distribution cliff) and the failure modes it shows more often than the teacher."""
    teacher, tuned = report["systems"]["teacher"], report["systems"]["student_tuned"]
    if "category_accuracy" not in tuned or "category_accuracy" not in teacher:
        return ""
    parts = []
    gaps = {c: teacher["category_accuracy"][c] - a for c, a in tuned["category_accuracy"].items()}
    worst = max(gaps, key=gaps.get) if len(gaps) > 1 else None
    if worst is not None and gaps[worst] > 0:
        parts.append(
            f"its largest gap to the teacher is on `{worst}` examples ({tuned['category_accuracy'][worst]:.0%} vs "
            f"{teacher['category_accuracy'][worst]:.0%})"
        )
    worse = [
        f"{mode} in {rate:.0%} of answers (teacher {teacher['failure_rates'].get(mode, 0.0):.0%})"
        for mode, rate in tuned["failure_rates"].items()
        if rate > teacher["failure_rates"].get(mode, 0.0)
    ]
    if worse:
        parts.append("it shows " + ", ".join(worse))
    return ("Where it fails: " + "; ".join(parts) + ".") if parts else ""


def _prompt_share(metrics: dict[str, Any]) -> str:
    """Time to first token over end-to-end time through the server at the lowest concurrency (no queueing)."""
    lowest = lowest_load_level(metrics)
    share = lowest[1].get("prompt_time_share") if lowest else None
    return "-" if share is None else f"{share:.0%}"


def _serving_note(report: dict[str, Any]) -> str:
    serving = report["systems"]["student_tuned"].get("serving", "weights")
    if serving == "weights":
        return "The tuned student was served as merged weights (the adapter folded in)."
    return (
        "The tuned student was served as the base model plus its unmerged LoRA adapter (vLLM `enable_lora`): "
        "slower than merged weights, measured as such."
    )


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write report.md and its plots; return the paths written."""
    plots = _plots(report, out_dir)
    tuned = report["systems"]["student_tuned"]
    basis = tuned.get("cost_basis", "the offline engine's batched throughput")
    lines = [
        f"# Distillation report: {report['run_name']}",
        "",
        verdict(report),
        "",
        f"Task `{report['task']}`, {report['test_examples']} held-out test examples, report schema "
        f"{report.get('schema_version', 1)}. Serving cost from each system's hardware $/hour and its measured "
        f"throughput ({basis}); offline latency from requests run one at a time on the offline engine, warm "
        "(shared prompt prefixes served from vLLM's prefix cache, as on a busy server) and cold (cache cleared "
        "before each request). The prompt's share of request time is time to first token over end-to-end "
        "time through the server at the lowest concurrency: the part of a request's serving time its prompt takes. "
        + _serving_note(report),
        "",
        *_table(report),
        "",
    ]
    even = report.get("break_even")
    if even:
        walls = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in even["one_off_wall_s"].items())
        lines += [
            "## Break-even",
            "",
            f"One-off cost ${even['one_off_usd']:.4f} ({walls} on {even['pipeline_hardware']}).",
            "",
            "| against | saving per 1k requests | break-even (requests) | break-even (days) |",
            "|---|---|---|---|",
        ]
        baselines = {"teacher": even, "student_prompted": even.get("vs_prompted")}
        for name, row in baselines.items():
            if row:
                never = row["requests"] is None
                lines.append(
                    f"| {name} | ${row['saving_per_1k_requests_usd']:.4f} | "
                    + ("never (no saving) | - |" if never else f"{row['requests']:,.0f} | {row['days']:.2f} |")
                )
        lines += ["", f"Days at {even['requests_per_day']:,.0f} requests/day (`benchmark.requests_per_day`).", ""]
    forgetting = report.get("forgetting", {})
    if forgetting:
        lines += [
            "## Base capabilities (forgetting probe)",
            "",
            "| system | probe accuracy | leakage rate | n |",
            "|---|---|---|---|",
        ]
        for name, f in forgetting.items():
            if name not in ("change", "lm_eval"):
                lines.append(f"| {name} | {f['accuracy']:.3f} | {f['leakage_rate']:.3f} | {f['n']} |")
        lines.append("")
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
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    path = out_dir / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return [path, *plots]


def _plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = report["systems"]
    names = list(systems)
    paths = []

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in names:
        m = systems[name]
        low, high = m.get("accuracy_ci95", [m["accuracy"], m["accuracy"]])
        error = [[m["accuracy"] - low], [high - m["accuracy"]]]
        ax.errorbar(_cost(m), m["accuracy"], yerr=error, fmt="o", capsize=4, label=name)  # a legend: points may touch
    ax.set_xlabel("$ per 1,000 requests" if "cost_per_1k_requests" in systems[names[0]] else "$ per 1M output tokens")
    ax.set_ylabel("task accuracy (95% CI)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Accuracy against serving cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    paths.append(_save(fig, out_dir / "accuracy_vs_cost.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [systems[n]["latency_p50_s"] for n in names], width=0.4, label="p50, warm")
    ax.bar(
        [i + 0.2 for i in x],
        [systems[n].get("latency_cold_p50_s", float("nan")) for n in names],
        width=0.4,
        label="p50, cold (no prefix cache)",
    )
    ax.set_xticks(list(x), names, rotation=15)
    ax.set_ylabel("seconds per request")
    ax.set_title("Offline engine latency (one request at a time)")
    ax.legend()
    paths.append(_save(fig, out_dir / "latency.png"))

    cdfs = report.get("latency_cdf")
    if cdfs:
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
        paths.append(_save(fig, out_dir / "latency_cdf.png"))

        fig, ax = plt.subplots(figsize=(6, 4))
        for name in names:
            load = systems[name].get("load")
            if load:
                levels_of = sorted(load, key=int)
                ax.plot(
                    [int(c) for c in levels_of], [load[c]["output_tokens_per_s"] for c in levels_of], "o-", label=name
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens / s")
        ax.set_title("Throughput against concurrency (vllm serve)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir / "throughput_vs_concurrency.png"))
    return paths


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
    trained, and what the benchmark measured for it against its teacher and untuned base."""
    import json

    from pipeline.runs import PipelineError

    header = (
        "| run | objective | method | LoRA r | packing | steps | train s | tuned acc | vs base | kept of teacher "
        "| p50 vs teacher | $/1M out | probe acc change | leakage change | tuned failure modes |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for run_dir in run_dirs:
        report_path, train_path = run_dir / "benchmark" / "report.json", run_dir / "train" / "manifest.json"
        for path in (report_path, train_path):
            if not path.is_file():
                raise PipelineError(f"{path}: not found; compare takes run folders whose benchmark has run")
        report, train = json.loads(report_path.read_text()), json.loads(train_path.read_text())
        config, metrics = train["config"]["train"], train["metrics"]
        systems = report["systems"]
        teacher, base, tuned = systems["teacher"], systems["student_base"], systems["student_tuned"]
        change = report.get("forgetting", {}).get("change", {})
        kept = tuned["accuracy"] / teacher["accuracy"] if teacher["accuracy"] else float("nan")
        lines.append(
            f"| {run_dir.name} | {config.get('objective', 'sft')} | {config.get('method', 'lora')} "
            f"| {config['lora']['r']} | {config.get('packing', False)} | {metrics.get('steps')} "
            f"| {metrics.get('train_runtime_s', float('nan')):.0f} | {tuned['accuracy']:.3f} "
            f"| {tuned['accuracy'] - base['accuracy']:+.3f} | {kept:.0%} "
            f"| {latency_p50(tuned) / latency_p50(teacher):.2f}x | {tuned['cost_per_1m_output_tokens']:.3f} "
            f"| {change.get('accuracy', float('nan')):+.3f} | {change.get('leakage_rate', float('nan')):+.3f} "
            f"| {_failure_summary(tuned)} |"
        )
    return "\n".join(lines)
