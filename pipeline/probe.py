"""General-capability probe: closed questions outside any task, to measure forgetting and leakage.

Probe accuracy on the untuned vs the tuned student shows lost base capability (catastrophic forgetting);
the leakage rate counts general answers that drift into the task's behaviour (the task's `leaks`).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROBE_PATH = Path(__file__).parent / "data" / "general_probe.jsonl"
PROBE_SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class ProbeQuestion:
    id: str
    category: str
    question: str
    answers: tuple[str, ...]


def load_probe(path: Path | None = None) -> list[ProbeQuestion]:
    rows = [json.loads(line) for line in (path or PROBE_PATH).read_text().splitlines() if line.strip()]
    return [ProbeQuestion(r["id"], r["category"], r["question"], tuple(r["answers"])) for r in rows]


def probe_messages(question: ProbeQuestion) -> list[dict[str, str]]:
    return [{"role": "system", "content": PROBE_SYSTEM}, {"role": "user", "content": question.question}]


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def probe_correct(completion: str, question: ProbeQuestion) -> bool:
    """An accepted answer appears as whole words in the completion (numbers compare as numbers)."""
    words = _words(completion)
    numbers = {float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", completion.replace(",", ""))}
    for answer in question.answers:
        if re.fullmatch(r"-?\d+(?:\.\d+)?", answer):
            if float(answer) in numbers:
                return True
        elif _words(answer) in words:
            return True
    return False


def summarize_probe(
    completions: list[str], questions: list[ProbeQuestion], leaks: Callable[[str], bool]
) -> dict[str, Any]:
    correct = [probe_correct(c, q) for c, q in zip(completions, questions, strict=True)]
    by_category: dict[str, list[bool]] = defaultdict(list)
    for ok, q in zip(correct, questions, strict=True):
        by_category[q.category].append(ok)
    n = len(questions)
    return {
        "n": n,
        "accuracy": sum(correct) / n if n else float("nan"),
        "leakage_rate": sum(leaks(c) for c in completions) / n if n else float("nan"),
        "per_category": {cat: sum(v) / len(v) for cat, v in sorted(by_category.items())},
    }
