"""report.md and PNG plots from report.json: numbers first, then a verdict computed from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.runs import write_text


def verdict(report: dict[str, Any]) -> str:
    """One paragraph answering 'was fine-tuning worth it here?', computed from the numbers."""
    systems = report["systems"]
    teacher, base, tuned = systems["teacher"], systems["student_base"], systems["student_tuned"]
    gain = tuned["accuracy"] - base["accuracy"]
    kept = tuned["accuracy"] / teacher["accuracy"] if teacher["accuracy"] > 0 else float("nan")
    cost_ratio = tuned["cost_per_1m_output_tokens"] / teacher["cost_per_1m_output_tokens"]
    latency_ratio = tuned["latency_p50_s"] / teacher["latency_p50_s"]
    cold = ""
    if "latency_cold_p50_s" in tuned and "latency_cold_p50_s" in teacher:
        cold_ratio = tuned["latency_cold_p50_s"] / teacher["latency_cold_p50_s"]
        cold = f" ({cold_ratio:.2f}x without: the teacher's long prompt computed in full)"
    parts = [
        f"Fine-tuning moved the student's accuracy from {base['accuracy']:.1%} to {tuned['accuracy']:.1%} "
        f"({gain:+.1%}); the teacher scores {teacher['accuracy']:.1%}, so the tuned student keeps {kept:.0%} of it.",
        f"Its p50 latency is {latency_ratio:.2f}x the teacher's with prompt prefixes cached{cold} "
        f"and its cost per 1M output tokens {cost_ratio:.2f}x.",
    ]
    change = report.get("forgetting", {}).get("change")
    if change:
        parts.append(
            f"On the general probe, accuracy changed by {change['accuracy']:+.1%} and the leakage rate "
            f"by {change['leakage_rate']:+.1%}."
        )
    worth = gain > 0 and kept >= 0.9 and latency_ratio < 1 and (not change or change["accuracy"] > -0.05)
    if worth:
        parts.append(
            "Verdict: worth it — the tuned student does the task near the teacher's level, faster and cheaper."
        )
    elif gain <= 0:
        parts.append("Verdict: not worth it — fine-tuning did not beat the untuned student.")
    elif change and (change["accuracy"] < -0.05 or change["leakage_rate"] > 0.10):
        parts.append(
            "Verdict: not worth it as trained — the task gain came with a regression on base capabilities "
            "(probe accuracy down more than 5 points or leakage up more than 10); train gentler (lower learning "
            "rate, fewer epochs, smaller rank) or mix general data in."
        )
    else:
        parts.append("Verdict: mixed — fine-tuning helped, but see the numbers above before shipping it.")
    return " ".join(parts)


def _table(report: dict[str, Any]) -> list[str]:
    lines = [
        "| system | prompt | accuracy | latency p50 (s) | latency p95 (s) | cold p50 (s) | cold p95 (s) "
        "| output tok/s | $ / 1M output tok | mean prompt tok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["systems"].items():
        lines.append(
            f"| {name} | {m['prompt_style']} | {m['accuracy']:.3f} | {m['latency_p50_s']:.2f} "
            f"| {m['latency_p95_s']:.2f} | {m.get('latency_cold_p50_s', float('nan')):.2f} "
            f"| {m.get('latency_cold_p95_s', float('nan')):.2f} "
            f"| {m['output_tokens_per_s']:.1f} | {m['cost_per_1m_output_tokens']:.3f} | {m['mean_prompt_tokens']:.0f} |"
        )
    rules = sorted({rule for m in report["systems"].values() for rule in m["rule_accuracy"]})
    lines += ["", "| system | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    for name, m in report["systems"].items():
        lines.append(
            f"| {name} | " + " | ".join(f"{m['rule_accuracy'].get(r, float('nan')):.3f}" for r in rules) + " |"
        )
    return lines


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
    lines = [
        f"# Distillation report: {report['run_name']}",
        "",
        verdict(report),
        "",
        f"Task `{report['task']}`, {report['test_examples']} held-out test examples. Cost from "
        f"{report['hardware']['name']} at ${report['hardware']['usd_per_hour']}/hour and the measured batched "
        "throughput; latency from requests run one at a time, warm (shared prompt prefixes served from vLLM's "
        "prefix cache, as on a busy server) and cold (cache cleared before each request). " + _serving_note(report),
        "",
        *_table(report),
        "",
    ]
    forgetting = report.get("forgetting", {})
    if forgetting:
        lines += [
            "## Base capabilities (forgetting probe)",
            "",
            "| system | probe accuracy | leakage rate | n |",
            "|---|---|---|---|",
        ]
        for name in ("student_base", "student_tuned"):
            if name in forgetting:
                f = forgetting[name]
                lines.append(f"| {name} | {f['accuracy']:.3f} | {f['leakage_rate']:.3f} | {f['n']} |")
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

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        m = systems[name]
        ax.scatter(m["cost_per_1m_output_tokens"], m["accuracy"], s=60)
        ax.annotate(name, (m["cost_per_1m_output_tokens"], m["accuracy"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("$ per 1M output tokens")
    ax.set_ylabel("task accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Accuracy against serving cost")
    ax.grid(alpha=0.3)
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
    ax.set_xticks(list(x), names)
    ax.set_ylabel("seconds per request")
    ax.set_title("Latency (one request at a time)")
    ax.legend()
    paths.append(_save(fig, out_dir / "latency.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def compare_runs(run_dirs: list[Path]) -> str:
    """A markdown table of finished runs side by side (`distill compare runs/a runs/b`): how each student was
    trained, and what the benchmark measured for it against its teacher and untuned base."""
    import json

    from pipeline.runs import PipelineError

    header = (
        "| run | objective | method | LoRA r | packing | steps | train s | tuned acc | vs base | kept of teacher "
        "| p50 vs teacher | $/1M out | probe acc change | leakage change |"
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
            f"| {tuned['latency_p50_s'] / teacher['latency_p50_s']:.2f}x | {tuned['cost_per_1m_output_tokens']:.3f} "
            f"| {change.get('accuracy', float('nan')):+.3f} | {change.get('leakage_rate', float('nan')):+.3f} |"
        )
    return "\n".join(lines)
