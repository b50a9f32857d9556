"""The report's plots, drawn from a `Report` beside report.md: accuracy against cost, offline latency, latency CDFs
and throughput under load, and the probe's change per category."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from msgspec import UNSET

from pipeline import names
from pipeline.benchmark.results import Forgetting, Report, present_or
from pipeline.benchmark.verdict import cost


def draw_plots(report: Report, out_dir: Path) -> list[Path]:
    """Every plot the report has the figures for, as PNG files in `out_dir`; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    paths = [_accuracy_vs_cost(report, out_dir), _offline_latency(report, out_dir)]
    if report.latency_cdf:
        paths += [_latency_cdf(report, out_dir), _throughput_vs_concurrency(report, out_dir)]
    probe = _probe_changes(report.forgetting, out_dir)
    paths += [probe] if probe else []
    if report.pruned:
        paths.append(_layer_importance(report, out_dir))
    return paths


def _layer_importance(report: Report, out_dir: Path) -> Path:
    """Each teacher layer's block influence on the task's prompts, the layers the pruned student dropped in red."""
    import matplotlib.pyplot as plt

    pruned = report.pruned
    dropped = set(pruned.layers_dropped)
    layers = range(len(pruned.importance))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.22 * len(pruned.importance) + 1.5), 3.4))
    colors = ["tab:red" if layer in dropped else "tab:blue" for layer in layers]
    ax.bar(list(layers), pruned.importance, color=colors)
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("block influence (1 - cos)")
    ax.set_title(f"Layers kept: {pruned.layers_kept} of {pruned.layers_total} (dropped in red)")
    return _save(fig, out_dir / "layer_importance.png")


def _probe_changes(forgetting: Forgetting, out_dir: Path) -> Path | None:
    """The tuned student's probe accuracy change per category, in questions: where general ability moved
    (the categories the task itself trains drawn apart, as they are left out of the forgetting figures)."""
    import matplotlib.pyplot as plt

    base, tuned = forgetting.systems.get(names.STUDENT_BASE), forgetting.systems.get(names.STUDENT_TUNED)
    sizes = (tuned.per_category_n if tuned else None) or {}
    if not (base and tuned and base.per_category and tuned.per_category and sizes):
        return None
    trained = set(tuned.task_categories or [])
    moved = {c: round((tuned.per_category[c] - base.per_category.get(c, 0)) * sizes[c]) for c in sizes}
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


def _accuracy_vs_cost(report: Report, out_dir: Path) -> Path:
    import matplotlib.pyplot as plt

    systems = report.systems
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, m in systems.items():
        low, high = present_or(m.accuracy_ci95, [m.accuracy, m.accuracy])
        error = [[m.accuracy - low], [high - m.accuracy]]
        ax.errorbar(cost(m), m.accuracy, yerr=error, fmt="o", capsize=4, label=name)  # a legend: points may touch
    first = next(iter(systems.values()))
    ax.set_xlabel("$ per 1,000 requests" if first.cost_per_1k_requests is not UNSET else "$ per 1M output tokens")
    ax.set_ylabel("task accuracy (95% CI)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Accuracy against serving cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, out_dir / "accuracy_vs_cost.png")


def cold_label(engine: str) -> str:
    """The cold bar's legend: what "cold" means on the engine that ran (only vLLM's prefix cache is cleared here)."""
    if engine == "vllm":
        return "p50, cold (prefix cache cleared)"
    if engine == "transformers":
        return "p50, cold (no prefix cache: as warm)"
    return "p50, cold (through a server: not told apart)"


def _offline_latency(report: Report, out_dir: Path) -> Path:
    import matplotlib.pyplot as plt

    systems = report.systems
    system_names = list(systems)
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(system_names))
    ax.bar([i - 0.2 for i in x], [systems[n].latency_p50_s for n in system_names], width=0.4, label="p50, warm")
    ax.bar(
        [i + 0.2 for i in x],
        [present_or(systems[n].latency_cold_p50_s, float("nan")) for n in system_names],
        width=0.4,
        label=cold_label(report.engine),
    )
    ax.set_xticks(list(x), system_names, rotation=15)
    ax.set_ylabel("seconds per request")
    ax.set_title("Offline engine latency (one request at a time)")
    ax.legend()
    return _save(fig, out_dir / "latency.png")


def _latency_cdf(report: Report, out_dir: Path) -> Path:
    import matplotlib.pyplot as plt

    cdfs = report.latency_cdf
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


def _throughput_vs_concurrency(report: Report, out_dir: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in report.systems.items():
        if m.load:
            levels = sorted(m.load, key=int)
            ax.plot([int(c) for c in levels], [m.load[c].output_tokens_per_s for c in levels], "o-", label=name)
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
