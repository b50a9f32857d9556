"""The general probe's questions and the worked examples shown before them: closed questions outside any task,
shipped in `pipeline/data/`. The benchmark asks them to measure forgetting (pipeline/benchmark/probe.py); the
filter and replay keep them out of training; the config checks its probe settings against them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.files import read_jsonl

PROBE_PATH = Path(__file__).parent / "data" / "general_probe.jsonl"
SHOTS_PATH = Path(__file__).parent / "data" / "probe_shots.jsonl"  # none of them a probe question (a test)


@dataclass(frozen=True)
class ProbeQuestion:
    """One closed question; `answers` are the accepted answers (aliases), the first one canonical."""

    id: str
    category: str
    question: str
    answers: tuple[str, ...]


def load_probe(path: Path | None = None) -> list[ProbeQuestion]:
    """Questions of a probe JSONL file (default: the packaged general probe)."""
    source = path or PROBE_PATH
    questions = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("answers"):
            raise ValueError(f"{source}:{number}: probe question without answers")
        questions.append(ProbeQuestion(row["id"], row["category"], row["question"], tuple(row["answers"])))
    return questions


def probe_categories() -> set[str]:
    """The categories of the packaged probe (`benchmark.probe_task_categories` names some of them)."""
    return {q.category for q in load_probe()}


def load_probe_shots() -> list[tuple[str, str]]:
    """The worked examples (question, answer) a base student is shown before each probe question."""
    return [(row["question"], row["answer"]) for row in read_jsonl(SHOTS_PATH)]
