"""What the filter stage made of the teacher's outputs: the tally of every filter (filter_report.json) and
the dataset card (DATASET.md with a response-length histogram), for a person to read."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.files import atomic_path, write_text
from pipeline.layout import RunLayout

if TYPE_CHECKING:
    from pipeline.filter.screen import Screened

MAX_DROP_EXAMPLES = 3  # per reason, in DATASET.md
MAX_LABELS_NAMED = 5  # of the labels without a training example, in DATASET.md and the log


class Tally:
    """Counts in and out per filter, category balance, lengths, and a few dropped examples per reason."""

    def __init__(self, flow: list[str]) -> None:
        self.flow = flow
        self.samples_in = 0
        self.prompts_in = 0
        self.dropped: Counter[str] = Counter()
        self.categories_in: Counter[str] = Counter()
        self.categories_kept: Counter[str] = Counter()
        self.categories_train: Counter[str] = Counter()  # of those kept, the ones in train.jsonl
        self.samples_by_category: Counter[str] = Counter()
        self.verified_by_category: Counter[str] = Counter()  # samples the task's scorer passes
        self.lengths_in: Counter[int] = Counter()
        self.lengths_kept: Counter[int] = Counter()
        self.drop_examples: dict[str, list[dict[str, Any]]] = {}
        self.malformed: list[int] = []
        self.prompt_errors = 0  # prompts the teacher could not answer (recorded by generate)
        self.train = self.val = 0  # task examples kept
        self.replay: dict[str, Any] | None = None  # replay rows added to train.jsonl (filter/replay.py)

    def add(self, row: Screened) -> None:
        self.prompts_in += 1
        self.samples_in += len(row.samples)
        self.categories_in[row.example.category] += 1
        self.prompt_errors += row.error is not None
        self.samples_by_category[row.example.category] += len(row.samples)
        self.verified_by_category[row.example.category] += row.verified
        for sample in row.samples:
            self.lengths_in[sample.length] += 1

    def drop(self, record: dict[str, Any]) -> None:
        self.dropped[record["filter"]] += 1
        examples = self.drop_examples.setdefault(record["filter"], [])
        if len(examples) < MAX_DROP_EXAMPLES:
            examples.append(record)

    def per_filter(self) -> list[dict[str, Any]]:
        rows, remaining = [], self.samples_in
        for name in self.flow:
            dropped = self.dropped.get(name, 0)
            rows.append({"filter": name, "in": remaining, "dropped": dropped, "out": remaining - dropped})
            remaining -= dropped
        return rows

    def verified_rates(self) -> dict[str, float | None]:
        """Per category, the share of the teacher's samples that pass the task's scorer (None: no samples)."""
        return {
            category: (self.verified_by_category[category] / n if n else None)
            for category, n in sorted(self.samples_by_category.items())
        }

    @property
    def verified(self) -> int:
        return sum(self.verified_by_category.values())

    def report(self, length_unit: str, labels: list[str] | None) -> dict[str, Any]:
        """`labels`: the task's (Task.labels), each an example's category; None where it has none."""
        return {
            "prompts_in": self.prompts_in,
            "samples_in": self.samples_in,
            "samples_kept": self.train + self.val,
            "train": self.train,
            "val": self.val,
            "malformed_lines": self.malformed,
            "prompt_errors": self.prompt_errors,
            "filters": self.per_filter(),
            "dropped": {name: self.dropped[name] for name in self.flow if self.dropped.get(name)},
            "categories_in": dict(sorted(self.categories_in.items())),
            "categories_kept": dict(sorted(self.categories_kept.items())),
            "labels": None if labels is None else len(labels),
            # Labels with no example in train.jsonl: one kept for validation only teaches the student nothing.
            "labels_without_examples": None if labels is None else [x for x in labels if not self.categories_train[x]],
            # The teacher's accuracy on the training prompts, by the task's own scorer, before any filter.
            "teacher_verified": self.verified,
            "teacher_verified_rate": self.verified / self.samples_in if self.samples_in else None,
            "teacher_verified_rate_by_category": self.verified_rates(),
            "length_unit": length_unit,
            "response_length_in": _summary(self.lengths_in),
            "response_length_kept": _summary(self.lengths_kept),
            "replay": self.replay,
        }


def label_coverage(report: dict[str, Any]) -> str | None:
    """How many labels have no training example, naming a few, in a sentence for DATASET.md and the log; None for a
    task without labels."""
    missing = report["labels_without_examples"]
    if missing is None:
        return None
    if not missing:
        return f"Each of the {report['labels']} labels has at least one training example"
    named = ", ".join(missing[:MAX_LABELS_NAMED])
    more = f" and {len(missing) - MAX_LABELS_NAMED} more" if len(missing) > MAX_LABELS_NAMED else ""
    return (
        f"{len(missing)} of the {report['labels']} labels have no training example, so the student is never shown "
        f"them: {named}{more} (filter_report.json: labels_without_examples)"
    )


def _replay_source(replay: dict[str, Any]) -> str:
    if replay["source"] == "dataset":
        return f"from `{replay['dataset']}`"
    who = "the untuned student itself" if replay["source"] == "self" else "the teacher"
    return f"general prompts answered by {who}"


def _summary(lengths: Counter[int]) -> dict[str, float]:
    total = sum(lengths.values())
    if not total:
        return {}
    ordered = sorted(lengths.items())
    seen, median = 0, ordered[-1][0]
    for value, count in ordered:
        seen += count
        if seen * 2 >= total:
            median = value
            break
    return {
        "count": total,
        "mean": round(sum(v * c for v, c in ordered) / total, 2),
        "p50": median,
        "max": ordered[-1][0],
    }


def write_dataset_card(
    report: dict[str, Any],
    tally: Tally,
    layout: RunLayout,
    *,
    run_name: str,
    teacher: str,
    task_name: str,
    prompt_style: str,
) -> list[Path]:
    """DATASET.md and its length histogram, from the filter report and the tally: what `teacher` answered of the
    task, what was kept, and the prompt (`prompt_style`) the student learns from. Returns the files written."""
    card, histogram = layout.dataset_card, layout.length_histogram
    _plot_lengths(histogram, tally.lengths_in, tally.lengths_kept, report["length_unit"])
    lines = [
        f"# Dataset card: {run_name}",
        "",
        f"Teacher `{teacher}` answered {report['prompts_in']} prompts of task `{task_name}` "
        f"({report['samples_in']} samples). The filters kept {report['samples_kept']} samples: "
        f"{report['train']} for training and {report['val']} for validation. The student sees the "
        f"`{prompt_style}` prompt.",
        "",
    ]
    coverage = label_coverage(report)
    if coverage:
        lines += [f"{coverage}.", ""]
    replay = report.get("replay")
    if replay:
        drops = ", ".join(f"{k} {v}" for k, v in replay["dropped"].items()) or "none"
        lines += [
            f"Replay against forgetting: {replay['kept']} general chats ({_replay_source(replay)}) added to the "
            f"training examples (fraction {replay['fraction']}: {replay['wanted']} wanted, {replay['available']} "
            f"available; dropped: {drops}). They are counted apart from the task's examples above and below.",
            "",
        ]
    if report["malformed_lines"]:
        lines += [f"Malformed input lines skipped: {', '.join(map(str, report['malformed_lines']))}.", ""]
    lines += ["## Filters, in the order they ran", "", "| filter | in | dropped | out |", "|---|---:|---:|---:|"]
    lines += [f"| {r['filter']} | {r['in']} | {r['dropped']} | {r['out']} |" for r in report["filters"]]
    rate = report["teacher_verified_rate"]
    overall = ""
    if rate is not None:
        overall = f" ({report['teacher_verified']} of {report['samples_in']}, {rate:.1%} overall)"
    lines += [
        "",
        "## Balance by category, and the teacher's verified rate",
        "",
        f"Verified: the share of the teacher's samples that pass the task's own scorer, before any filter{overall}.",
        "",
        "| category | prompts in | samples kept | teacher verified |",
        "|---|---:|---:|---:|",
    ]
    rates = report["teacher_verified_rate_by_category"]
    for category in sorted(set(report["categories_in"]) | set(report["categories_kept"])):
        kept = report["categories_kept"].get(category, 0)
        verified = "-" if rates.get(category) is None else f"{rates[category]:.1%}"
        lines.append(f"| {category or '(none)'} | {report['categories_in'].get(category, 0)} | {kept} | {verified} |")
    unit = report["length_unit"]
    lines += ["", f"## Response length ({unit})", "", f"![response lengths]({histogram.name})", ""]
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
