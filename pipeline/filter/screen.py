"""The per-row half of the filter stage: each teacher row screened on its own, in this process or in a pool
of worker processes, chunk by chunk, in input order.

Screening decodes the row, measures its samples' lengths, applies the test-split guard, the sample filters
and the agreement vote, and prepares what the dataset filters compare. Rows are independent here; what
needs other rows (dedup against earlier ones, the judge, writing) stays in the stage, in one process.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from pipeline.config import FilterConfig
from pipeline.files import parse_json_object
from pipeline.filter.filters import DatasetFilters, Sample, SampleFilters, vote, words
from pipeline.models import resolve_model
from pipeline.probe_questions import load_probe
from pipeline.tasks import Example, Task

TEST_GUARD = "test_split_guard"  # always on: a benchmark test prompt never reaches training
ROWS_PER_CHUNK = 512  # lines screened together: one tokenizer batch, one task for a worker process
MIN_LINES_FOR_WORKERS = 4 * ROWS_PER_CHUNK  # below this, starting worker processes (~1 s) costs more than it saves
MAX_AUTO_WORKERS = 8


def token_counter(student_model: str) -> Callable[[list[str]], list[int]]:
    """Response lengths in the student's tokens (what training will see), many texts per call.

    The Rust tokenizer's batch encode is far faster than one `tokenizer(text)` call per text, and loading
    `tokenizer.json` with `tokenizers` alone skips the import of transformers (docs/measurements.md, "The filter's
    speed")."""
    model = resolve_model(student_model)
    tokenizer_file = Path(model) / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(tokenizer_file))
    else:  # a hub id, or a slow-only tokenizer: let transformers find or convert it
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(model).backend_tokenizer
    backend.no_truncation()
    return lambda texts: [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]


def protected_prompts(task: Task, probe: bool) -> list[tuple[str, str]]:
    """(source, text) of every prompt training must not see: the benchmark test split, and with `probe` the
    probe's questions (`filter.decontaminate.probe` with the probe on; always for replay, whose general chats
    are where probe-like questions live)."""
    protected = [(ex.id, ex.user) for ex in task.split("test")]
    if probe:
        protected += [(f"probe:{q.id}", q.question) for q in load_probe()]
    return protected


@dataclass(frozen=True)
class Screening:
    """What screening a row takes, from the stage's config: worker processes build their `Screener` from it."""

    task: Task
    settings: FilterConfig
    student_prompt_style: str  # the prompt a kept example carries
    teacher_prompt_style: str  # the prompt the teacher answered, for rows that did not record it
    student_model: str  # whose tokenizer measures a response for the length filter
    protect_probe: bool  # the probe's questions are protected prompts too


@dataclass
class Screened:
    """One teacher row after everything that needs no other row."""

    example: Example
    samples: list[Sample]
    dropped: list[tuple[Sample, str, str]]  # (sample, filter, detail)
    survivors: list[Sample]  # features prepared: the dataset filters decide
    student_messages: list[dict[str, str]]
    teacher: str | None
    error: str | None = None  # the teacher could not answer this prompt (no samples)
    verified: int = 0  # samples the task's scorer passes, whatever the filters did with them


class Screener:
    """The per-row half of the stage: decode, measure lengths, the test-split guard, the sample filters,
    the vote and the dataset filters' features. Rows are independent here, so chunks of lines can be
    screened in worker processes; the stateful half (dedup against kept rows, writing) stays in one."""

    def __init__(self, screening: Screening) -> None:
        self.screening = screening
        self.task = screening.task
        settings = screening.settings
        self.active = frozenset(settings.active())
        self.count_tokens = token_counter(screening.student_model) if "length" in self.active else None
        self.sample_filters = SampleFilters(settings, self.task)
        self.dataset_filters = DatasetFilters(settings, protected_prompts(self.task, screening.protect_probe))

    def measure(self, texts: list[str]) -> list[int]:
        return self.count_tokens(texts) if self.count_tokens else [len(words(t)) for t in texts]

    def screen(self, lines: list[tuple[int, bytes]]) -> list[Screened | tuple[int, str]]:
        """Screened rows, and (line number, problem) for each malformed line, in input order."""
        parsed: list[dict[str, Any] | tuple[int, str]] = []
        for number, line in lines:
            try:
                row = parse_json_object(line)
                missing = next((key for key in ("prompt_id", "user") if key not in row), None)
                if missing is not None:
                    raise ValueError(f"no {missing!r} key")
                parsed.append(row)
            except ValueError as exc:
                parsed.append((number, str(exc)))
        rows = [row for row in parsed if isinstance(row, dict)]
        lengths = iter(self.measure([c.get("text") or "" for row in rows for c in row.get("completions") or []]))
        return [self._screen_row(row, lengths) if isinstance(row, dict) else row for row in parsed]

    def _screen_row(self, row: dict[str, Any], lengths: Iterator[int]) -> Screened:
        task, screening = self.task, self.screening
        example = Example(row["prompt_id"], row["user"], row.get("reference", {}), row.get("category", ""))
        samples = [
            Sample(example.id, i, c.get("text") or "", c.get("finish_reason"), c.get("output_tokens"), next(lengths))
            for i, c in enumerate(row.get("completions") or [])
        ]
        screened = Screened(
            example,
            samples,
            [],
            [],
            task.messages(example, screening.student_prompt_style),
            row.get("teacher"),
            row.get("error"),
        )
        guard = self.dataset_filters.guard(example)
        if guard is not None:
            screened.dropped = [(sample, TEST_GUARD, guard) for sample in samples]
            return screened
        teacher_messages = row.get("messages") or task.messages(example, screening.teacher_prompt_style)
        passing = []
        for sample in samples:
            failed = self.sample_filters.check(sample, example, teacher_messages)
            if failed:
                screened.dropped.append((sample, *failed))
            else:
                passing.append(sample)
        # The teacher's verified rate: every sample scored, truncated ones too (the correctness filter's
        # result is reused where it ran).
        screened.verified = sum(all(self._rules(sample, example).values()) for sample in samples)
        if "agreement" in self.active:
            passing, losers = vote(task, screening.settings, passing, len(samples))
            screened.dropped += [(sample, "agreement", detail) for sample, detail in losers]
        for sample in passing:
            self.dataset_filters.prepare(example, sample)
        screened.survivors = passing
        return screened

    def _rules(self, sample: Sample, example: Example) -> dict[str, bool]:
        rules = sample.scores.get("rules")
        return rules if rules is not None else self.task.score(sample.text, example)


_worker_screener: Screener | None = None


def _start_worker(screening: Screening) -> None:
    global _worker_screener
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    _worker_screener = Screener(screening)


def _screen_in_worker(lines: list[tuple[int, bytes]]) -> list[Screened | tuple[int, str]]:
    return _worker_screener.screen(lines)


def worker_count(setting: int | None, lines: int) -> int:
    """`filter.workers`, or by default one per core once the input is large enough to repay starting them."""
    if setting is not None:
        return setting
    return min(os.cpu_count() or 1, MAX_AUTO_WORKERS) if lines >= MIN_LINES_FOR_WORKERS else 0


def screened_chunks(
    screening: Screening, lines: Iterable[tuple[int, bytes]], workers: int
) -> Iterator[list[Screened | tuple[int, str]]]:
    """Chunks of screened rows in input order: in this process (workers=0) or in a pool of processes,
    with a bounded number of chunks in flight so memory does not grow with the input."""
    chunks = iter(lambda: list(islice(lines, ROWS_PER_CHUNK)), [])
    if workers == 0:
        screener = Screener(screening)
        yield from map(screener.screen, chunks)
        return
    context = multiprocessing.get_context("spawn")  # safe after torch or vLLM ran in this process
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(screening,)) as pool:
        in_flight: deque[Future] = deque()
        for chunk in chunks:
            in_flight.append(pool.submit(_screen_in_worker, chunk))
            if len(in_flight) > 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                yield number, line
