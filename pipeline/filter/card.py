"""DATASET.md: what the filter stage made of the teacher's outputs, for a person to read."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig
from pipeline.runs import atomic_path, write_text

CARD = "DATASET.md"
HISTOGRAM = "response_lengths.png"


def write_dataset_card(out_dir: Path, config: ExperimentConfig, report: dict[str, Any], tally: Any) -> list[Path]:
    histogram = out_dir / HISTOGRAM
    _plot_lengths(histogram, tally.lengths_in, tally.lengths_kept, report["length_unit"])
    lines = [
        f"# Dataset card: {config.run_name}",
        "",
        f"Teacher `{config.teacher.model}` answered {report['prompts_in']} prompts of task `{config.task.name}` "
        f"({report['samples_in']} samples). The filters kept {report['samples_kept']} samples: "
        f"{report['train']} for training and {report['val']} for validation. The student sees the "
        f"`{config.student.prompt_style}` prompt.",
        "",
    ]
    if report["malformed_lines"]:
        lines += [f"Malformed input lines skipped: {', '.join(map(str, report['malformed_lines']))}.", ""]
    lines += ["## Filters, in the order they ran", "", "| filter | in | dropped | out |", "|---|---:|---:|---:|"]
    lines += [f"| {r['filter']} | {r['in']} | {r['dropped']} | {r['out']} |" for r in report["filters"]]
    lines += [
        "",
        "## Balance by category (prompts in, samples kept)",
        "",
        "| category | in | kept |",
        "|---|---:|---:|",
    ]
    for category in sorted(set(report["categories_in"]) | set(report["categories_kept"])):
        kept = report["categories_kept"].get(category, 0)
        lines.append(f"| {category or '(none)'} | {report['categories_in'].get(category, 0)} | {kept} |")
    unit = report["length_unit"]
    lines += ["", f"## Response length ({unit})", "", f"![response lengths]({HISTOGRAM})", ""]
    for label, key in (("all samples", "response_length_in"), ("kept", "response_length_kept")):
        stats = report[key]
        if stats:
            lines.append(f"- {label}: mean {stats['mean']}, median {stats['p50']}, max {stats['max']}")
    lines += ["", "## Examples of dropped samples", ""]
    for name, examples in tally.drop_examples.items():
        lines += [f"### {name} ({report['dropped'].get(name, 0)} dropped)", ""]
        for record in examples:
            text = " ".join(record["text"].split())
            text = text if len(text) <= 200 else text[:200] + "..."
            lines.append(f'- `{record["prompt_id"]}` #{record["sample_index"]}: {record["detail"]}: "{text}"')
        lines.append("")
    card = out_dir / CARD
    write_text(card, "\n".join(lines).rstrip() + "\n")
    return [card, histogram]


def _plot_lengths(path: Path, lengths_in: Counter[int], lengths_kept: Counter[int], unit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    top = max([*lengths_in, *lengths_kept, 1])
    bins = list(range(0, top + 2, max(1, (top + 1) // 40)))
    for counts, label in ((lengths_in, "teacher samples"), (lengths_kept, "kept")):
        if counts:
            ax.hist(list(counts), bins=bins, weights=list(counts.values()), alpha=0.6, label=label)
    ax.set_xlabel(f"response length ({unit})")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
