"""Stage 2, filter: teacher outputs become JSONL chat examples; every dropped sample keeps its reason.

    distill filter --config configs/smollm2_support.yaml

The kept examples carry the *student's* prompt (context distillation: the teacher saw the full
prompt, the student learns to answer from the short one). Provenance (prompt id, teacher, sample
index, scores) sits beside `messages`, where TRL ignores it.

The stage streams: rows are read, judged and written one at a time, so memory grows only with the
dedup hashes and MinHash signatures of kept rows. Outputs appear only when the stage succeeds.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.config import ExperimentConfig, SamplingConfig
from pipeline.filter.card import write_dataset_card
from pipeline.filter.filters import DatasetFilters, Sample, SampleFilters, judge_prompt, parse_judge_score, vote, words
from pipeline.generate.stage import OUTPUT as TEACHER_OUTPUTS
from pipeline.runs import (
    PipelineError,
    Stage,
    atomic_path,
    json_line,
    log,
    malformed_line_message,
    parse_json_object,
    write_json,
)
from pipeline.tasks import Example, Task, build_task, task_files
from pipeline.tracking import start_tracking

TEST_GUARD = "test_split_guard"  # always on: a benchmark test prompt never reaches training
MAX_DROP_EXAMPLES = 3  # per reason, in DATASET.md
ROWS_PER_CHUNK = 512  # lines screened together: one tokenizer batch, one task for a worker process
MIN_LINES_FOR_WORKERS = 4 * ROWS_PER_CHUNK  # below this, starting worker processes (~1 s) costs more than it saves
MAX_AUTO_WORKERS = 8


def filter_stage(config: ExperimentConfig) -> Stage:
    sections = {
        "seed": config.seed,
        "task": config.task.model_dump(),
        "filter": config.filter.model_dump(),
        "student": config.student.model_dump(),
        "probe": config.benchmark.probe,
        "teacher": config.teacher.model if "judge" in config.filter.active() else None,
    }
    return Stage(
        config, "filter", sections, inputs=[config.run_dir / "generate" / TEACHER_OUTPUTS, *task_files(config)]
    )


def _in_val(prompt_id: str, seed: int, fraction: float) -> bool:
    """Deterministic split by prompt id, so every sample of one prompt lands on the same side."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _token_counter(config: ExperimentConfig) -> Callable[[list[str]], list[int]]:
    """Response lengths in the student's tokens (what training will see), many texts per call.

    The Rust tokenizer's batch encode is ~10x faster than one `tokenizer(text)` call per text, and
    loading `tokenizer.json` with `tokenizers` alone skips the ~5 s import of transformers.
    """
    from pipeline.models import resolve_model

    model = resolve_model(config.student.model)
    tokenizer_file = Path(model) / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(tokenizer_file))
    else:  # a hub id, or a slow-only tokenizer: let transformers find or convert it
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(model).backend_tokenizer
    backend.no_truncation()
    return lambda texts: [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]


def protected_prompts(config: ExperimentConfig, task: Task) -> list[tuple[str, str]]:
    """(source, text) of every prompt training must not see: the benchmark test split and the probe."""
    protected = [(ex.id, ex.user) for ex in task.split("test")]
    if config.filter.decontaminate.probe and config.benchmark.probe:
        from pipeline.benchmark.probe import load_probe

        protected += [(f"probe:{q.id}", q.question) for q in load_probe()]
    return protected


class Tally:
    """Counts in and out per filter, category balance, lengths, and a few dropped examples per reason."""

    def __init__(self, flow: list[str]) -> None:
        self.flow = flow
        self.samples_in = 0
        self.prompts_in = 0
        self.dropped: Counter[str] = Counter()
        self.categories_in: Counter[str] = Counter()
        self.categories_kept: Counter[str] = Counter()
        self.lengths_in: Counter[int] = Counter()
        self.lengths_kept: Counter[int] = Counter()
        self.drop_examples: dict[str, list[dict[str, Any]]] = {}
        self.malformed: list[int] = []
        self.prompt_errors = 0  # prompts the teacher could not answer (recorded by generate)
        self.train = self.val = 0

    def add(self, row: Screened) -> None:
        self.prompts_in += 1
        self.samples_in += len(row.samples)
        self.categories_in[row.example.category] += 1
        self.prompt_errors += row.error is not None
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

    def report(self, length_unit: str) -> dict[str, Any]:
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
            "length_unit": length_unit,
            "response_length_in": _summary(self.lengths_in),
            "response_length_kept": _summary(self.lengths_kept),
        }


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


class Judge:
    """The teacher grades kept examples in batches; loaded on first use."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.engine = None

    def grade(self, items: list[tuple[list[dict[str, str]], str]]) -> list[tuple[int | None, str]]:
        from pipeline.engines import load_engine, model_for

        if self.engine is None:
            teacher = self.config.teacher
            self.engine = load_engine(model_for(teacher.model, teacher.engine), teacher.engine, self.config.seed)
        rubric = self.config.filter.judge.rubric
        conversations = [judge_prompt(rubric, messages, response) for messages, response in items]
        sampling = SamplingConfig(temperature=0.0, max_tokens=8, seed=self.config.seed)
        generations = self.engine.generate(conversations, sampling, progress=False)
        return [(parse_judge_score(g.completions[0].text), g.completions[0].text) for g in generations]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


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


class Screener:
    """The per-row half of the stage: decode, measure lengths, the test-split guard, the sample filters,
    the vote and the dataset filters' features. Rows are independent here, so chunks of lines can be
    screened in worker processes; the stateful half (dedup against kept rows, writing) stays in one."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.task = build_task(config.task.name, config.task.params, config.seed, config.base_dir)
        settings = config.filter
        self.active = frozenset(settings.active())
        self.count_tokens = _token_counter(config) if "length" in self.active else None
        self.sample_filters = SampleFilters(settings, self.task)
        self.dataset_filters = DatasetFilters(settings, protected_prompts(config, self.task))

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
        task, config = self.task, self.config
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
            task.messages(example, config.student.prompt_style),
            row.get("teacher"),
            row.get("error"),
        )
        guard = self.dataset_filters.guard(example)
        if guard is not None:
            screened.dropped = [(sample, TEST_GUARD, guard) for sample in samples]
            return screened
        teacher_messages = row.get("messages") or task.messages(example, config.teacher.prompt_style)
        passing = []
        for sample in samples:
            failed = self.sample_filters.check(sample, example, teacher_messages)
            if failed:
                screened.dropped.append((sample, *failed))
            else:
                passing.append(sample)
        if "agreement" in self.active:
            passing, losers = vote(task, config.filter, passing, len(samples))
            screened.dropped += [(sample, "agreement", detail) for sample, detail in losers]
        for sample in passing:
            self.dataset_filters.prepare(example, sample)
        screened.survivors = passing
        return screened


_worker_screener: Screener | None = None


def _start_worker(config: ExperimentConfig) -> None:
    global _worker_screener
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    _worker_screener = Screener(config)


def _screen_in_worker(lines: list[tuple[int, bytes]]) -> list[Screened | tuple[int, str]]:
    return _worker_screener.screen(lines)


def worker_count(setting: int | None, lines: int) -> int:
    """`filter.workers`, or by default one per core once the input is large enough to repay starting them."""
    if setting is not None:
        return setting
    return min(os.cpu_count() or 1, MAX_AUTO_WORKERS) if lines >= MIN_LINES_FOR_WORKERS else 0


def screened_chunks(
    config: ExperimentConfig, lines: Iterable[tuple[int, bytes]], workers: int
) -> Iterator[list[Screened | tuple[int, str]]]:
    """Chunks of screened rows in input order: in this process (workers=0) or in a pool of processes,
    with a bounded number of chunks in flight so memory does not grow with the input."""
    chunks = iter(lambda: list(islice(lines, ROWS_PER_CHUNK)), [])
    if workers == 0:
        screener = Screener(config)
        yield from map(screener.screen, chunks)
        return
    context = multiprocessing.get_context("spawn")  # safe after torch or vLLM ran in this process
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(config,)) as pool:
        in_flight: deque[Future] = deque()
        for chunk in chunks:
            in_flight.append(pool.submit(_screen_in_worker, chunk))
            if len(in_flight) > 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                yield number, line


def run_filter(config: ExperimentConfig, force: bool = False) -> Path:
    stage = filter_stage(config)
    out_dir = stage.dir
    if not force and stage.is_fresh():
        log(f"filter: skipped, inputs and config unchanged ({out_dir})")
        return out_dir
    task = build_task(config.task.name, config.task.params, config.seed, config.base_dir)
    if config.student.prompt_style not in task.prompt_styles:
        raise PipelineError(f"student.prompt_style: {config.student.prompt_style!r} not in {task.prompt_styles}")
    settings = config.filter
    active = settings.active()
    source = config.run_dir / "generate" / TEACHER_OUTPUTS
    if not source.is_file():
        raise PipelineError(f"input file not found: {source} (run generate first)")
    if "length" in active:
        _token_counter(config)  # a missing tokenizer fails here, with its own message, not in a worker
    dataset_filters = DatasetFilters(settings, protected=[])  # rows arrive with their features prepared
    tally = Tally([TEST_GUARD, *active])
    judge = Judge(config) if "judge" in active else None
    pending: list[tuple[Example, Sample, list[dict[str, str]], str | None]] = []

    outputs = [out_dir / name for name in ("train.jsonl", "val.jsonl", "drops.jsonl", "filter_report.json")]
    with source.open("rb") as fh:
        total_lines = sum(1 for _ in fh)
    workers = worker_count(settings.workers, total_lines)
    with ExitStack() as stack:
        train_fh, val_fh, drops_fh = (stack.enter_context(atomic_path(p)).open("w") for p in outputs[:3])
        for fh in (train_fh, val_fh, drops_fh):
            stack.callback(fh.close)

        def drop(example: Example, sample: Sample, name: str, detail: str) -> None:
            record = {
                "prompt_id": example.id,
                "sample_index": sample.index,
                "filter": name,
                "detail": detail,
                "category": example.category,
                "text": sample.text,
            }
            drops_fh.write(json_line(record))
            tally.drop(record)

        def keep(example: Example, sample: Sample, messages: list[dict[str, str]], teacher: str | None) -> None:
            record = {
                "messages": [*messages, {"role": "assistant", "content": sample.text.strip()}],
                "prompt_id": example.id,
                "category": example.category,
                "sample_index": sample.index,
                "teacher": teacher,
                "scores": sample.scores,
            }
            in_val = _in_val(example.id, config.seed, settings.val_fraction)
            (val_fh if in_val else train_fh).write(json_line(record))
            tally.val += in_val
            tally.train += not in_val
            tally.categories_kept[example.category] += 1
            tally.lengths_kept[sample.length] += 1

        def flush_judge() -> None:
            if not pending:
                return
            grades = judge.grade([(messages, sample.text) for _, sample, messages, _ in pending])
            for (example, sample, messages, teacher), (score, raw) in zip(pending, grades, strict=True):
                sample.scores["judge"] = score
                if score is None:
                    drop(example, sample, "judge", f"unparseable grade {raw.strip()[:40]!r}")
                elif score < settings.judge.threshold:
                    drop(example, sample, "judge", f"score {score} < {settings.judge.threshold}")
                else:
                    keep(example, sample, messages, teacher)
            pending.clear()

        try:
            progress = tqdm(total=total_lines, desc="filter", unit="row", mininterval=1.0)
            for chunk in screened_chunks(config, _numbered_lines(source), workers):
                for item in chunk:
                    if isinstance(item, tuple):
                        number, problem = item
                        message = malformed_line_message(source, number, problem)
                        if settings.on_malformed_line == "fail":
                            raise PipelineError(f"{message}; set filter.on_malformed_line=skip to skip bad lines")
                        tally.malformed.append(number)
                        log(f"filter: {message}, skipped")
                        continue
                    tally.add(item)
                    for sample, name, detail in item.dropped:
                        drop(item.example, sample, name, detail)
                    for sample in item.survivors:
                        failed = dataset_filters.check(item.example, sample)
                        if failed:
                            drop(item.example, sample, *failed)
                        elif judge:
                            pending.append((item.example, sample, item.student_messages, item.teacher))
                        else:
                            keep(item.example, sample, item.student_messages, item.teacher)
                    if judge and len(pending) >= settings.judge.batch_size:
                        flush_judge()
                progress.update(len(chunk))
            progress.close()
            if judge:
                flush_judge()
        finally:
            if judge:
                judge.close()
        if not tally.train:
            raise PipelineError(f"filter: no teacher sample survived ({dict(tally.dropped)})")
        if tally.samples_in != tally.train + tally.val + sum(tally.dropped.values()):
            raise PipelineError("filter: internal error, the drop counts do not add up to the input")

    report = tally.report("tokens" if "length" in active else "words") | {"workers": workers}
    write_json(outputs[3], report)
    card_files = write_dataset_card(out_dir, config, report, tally)
    stage.finish([*outputs, *card_files], {k: v for k, v in report.items() if isinstance(v, int)})
    tracker = start_tracking(config, "filter")
    tracker.summary(
        {k: v for k, v in report.items() if isinstance(v, int)} | {f"dropped/{k}": v for k, v in tally.dropped.items()}
    )
    tracker.table("filters", ["filter", "in", "dropped", "out"], [list(r.values()) for r in report["filters"]])
    tracker.artifact(config, "filter", stage.fingerprint, [*outputs, *card_files])
    tracker.finish()
    log(
        f"filter: {report['samples_kept']}/{tally.samples_in} samples kept ({tally.train} train, {tally.val} val); "
        f"dropped {report['dropped']}"
    )
    return out_dir
