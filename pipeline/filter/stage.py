"""The filter stage: teacher outputs become JSONL chat examples; every dropped sample keeps its reason.

    distill filter --config configs/smollm2_support.yaml

The kept examples carry the *student's* prompt (context distillation: the teacher saw the full
prompt, the student learns to answer from the short one). Provenance (prompt id, teacher, sample
index, scores) sits beside `messages`, where TRL ignores it.

The stage streams: rows are screened on their own (screen.py, in worker processes for large inputs), then
judged against the rows kept before them and written, one at a time, so memory grows only with the dedup
hashes and MinHash signatures of kept rows. Outputs appear only when the stage succeeds.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm

from pipeline.config import ExperimentConfig, FilterConfig
from pipeline.console import PipelineError, log
from pipeline.files import atomic_path, json_line, malformed_line_message, write_json
from pipeline.filter.card import Tally, label_coverage, write_dataset_card
from pipeline.filter.filters import DatasetFilters, Sample
from pipeline.filter.judge import Judge, judge_identity
from pipeline.filter.replay import (
    ReplaySource,
    answerer_identity,
    answers_own_replay,
    replay_input,
    replay_shortfall,
    replay_source,
    replay_wanted,
    screened_replay,
)
from pipeline.filter.screen import (
    TEST_GUARD,
    Screened,
    Screening,
    numbered_lines,
    screened_chunks,
    token_counter,
    worker_count,
)
from pipeline.judging import rubric_for
from pipeline.layout import RunLayout
from pipeline.pruning import student_model
from pipeline.runs import Stage
from pipeline.tasks import Example, Task, task_for


def filter_stage(config: ExperimentConfig, task: Task) -> Stage:
    replay = replay_source(config)
    # The filter reads the student's prompt style and tokenizer; how it is pruned only where it answers replay.
    pruned_elsewhere = config.student.prune is not None and not answers_own_replay(config)
    student = config.student.model_dump(exclude={"prune"} if pruned_elsewhere else set())
    sections = {
        "seed": config.seed,
        "task": config.task.model_dump(),
        "filter": config.filter.model_dump(),
        "student": student,
        "probe": config.benchmark.probe,
        "judge": judge_identity(config.teacher) if "judge" in config.filter.active() else None,
        "replay": config.train.replay.model_dump() | {"answerer": answerer_identity(replay)},
    }
    replay_file = [replay_input(replay)] if config.train.replay.fraction > 0 else []
    inputs = [config.layout.teacher_outputs, *task.data_files(), *(path for path in replay_file if path.is_file())]
    return Stage(config, "filter", sections, inputs=inputs)


def run_filter(config: ExperimentConfig, force: bool = False) -> Path:
    task = task_for(config)
    layout = config.layout
    with filter_stage(config, task) as stage:
        if stage.skip(force):
            return stage.dir
        source = layout.teacher_outputs
        if not source.is_file():
            raise PipelineError(f"input file not found: {source} (run generate first)")
        if config.student.prune and answers_own_replay(config):
            student_model(config)  # the pruned student answers replay prompts as it is served ("self")
        settings = config.filter
        active = settings.active()
        if "length" in active:
            token_counter(config.student.model)  # a missing tokenizer fails here, with its own message, not in a worker
        with source.open("rb") as fh:
            total_lines = sum(1 for _ in fh)
        workers = worker_count(settings.workers, total_lines)
        tally = Tally([TEST_GUARD, *active])
        screening = Screening(
            task=task,
            settings=settings,
            student_prompt_style=config.student.prompt_style,
            teacher_prompt_style=config.teacher.prompt_style,
            student_model=config.student.model,
            protect_probe=settings.decontaminate.probe and config.benchmark.probe,
        )
        judge = None
        if "judge" in active:
            rubric = rubric_for(settings.judge.rubric, task.rubric())
            judge = Judge(config.teacher, config.seed, rubric, stage.dir)

        with DatasetWriter(settings, layout, config.seed, tally, judge) as writer:
            progress = tqdm(total=total_lines, desc="filter", unit="row", mininterval=1.0)
            for chunk in screened_chunks(screening, numbered_lines(source), workers):
                for item in chunk:
                    if isinstance(item, Screened):
                        writer.add(item)
                    else:
                        writer.malformed(source, *item)
                progress.update(len(chunk))
            progress.close()
            writer.flush_judge()
            check_enough_kept(settings.min_train_examples, tally, task)
            if config.train.replay.fraction > 0:  # after the guard: it counts the task's examples only
                writer.add_replay(replay_source(config), task, stage.dir)
            if tally.samples_in != tally.train + tally.val + sum(tally.dropped.values()):
                raise PipelineError("filter: internal error, the drop counts do not add up to the input")

        report = tally.report("tokens" if "length" in active else "words", task.labels()) | {"workers": workers}
        write_json(layout.filter_report, report)
        counts = {k: v for k, v in report.items() if isinstance(v, int)}
        card = write_dataset_card(
            report,
            tally,
            layout,
            run_name=config.run_name,
            teacher=config.teacher.model,
            task_name=config.task.name,
            prompt_style=config.student.prompt_style,
        )
        stage.finish(
            [*writer.paths, layout.filter_report, *card],
            counts,
            summary=counts | {f"dropped/{k}": v for k, v in tally.dropped.items()},
            tables=[("filters", ["filter", "in", "dropped", "out"], [list(r.values()) for r in report["filters"]])],
        )
    log(
        f"filter: {report['samples_kept']}/{tally.samples_in} samples kept ({tally.train} train, {tally.val} val); "
        f"dropped {report['dropped']}" + (f"; {tally.replay['kept']} replay rows added" if tally.replay else "")
    )
    if report["labels_without_examples"]:
        log(f"filter: {label_coverage(report)}")
    return stage.dir


def in_val(prompt_id: str, seed: int, fraction: float) -> bool:
    """Deterministic split by prompt id, so every sample of one prompt lands on the same side."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# A teacher verified on at most this share of its samples "rarely" gets it right: its answers, or how they are read.
RARELY = 0.1

# What to change when a filter drops most of the teacher's samples.
DROP_FIXES = {
    "truncated": "answers were cut at the token limit: raise teacher.sampling.max_tokens or set teacher.sampling.stop",
    "empty": "the teacher answered nothing: check teacher.sampling.stop and the chat template",
    "correctness": "the teacher's answers fail the task's checks: the teacher does not do this task with this "
    "prompt (a stronger teacher.model, a better prompt, or n samples with filter.agreement.min_agreement)",
    "agreement": "the teacher's samples disagree: a stronger teacher.model, or a lower filter.agreement.min_agreement",
}


def check_enough_kept(need: int, tally: Tally, task: Task) -> None:
    """The guard after filtering: fewer kept training examples than `need` (`filter.min_train_examples`) stop the
    run, in one line that says why: the count, the teacher's verified rate, the filter that dropped the most and
    the key that fixes it; when the teacher's answers rarely pass the task's scorer, how they are read is named as
    a suspect beside it."""
    if tally.train >= max(need, 1):
        return
    top = tally.dropped.most_common(1)
    cause = "nothing was dropped"
    if top:
        name, count = top[0]
        cause = f"{name} dropped the most ({count}): {DROP_FIXES.get(name, f'see filter.{name}')}"
    verified = f"the teacher's answers pass the task's scorer in {tally.verified} of {tally.samples_in}"
    reading = task.answer_reading()
    if reading and tally.verified <= RARELY * tally.samples_in:
        example = next(iter(tally.drop_examples.get("correctness", [])), None)
        seen = f", e.g. {example['prompt_id']}: {example['detail']}" if example else ""
        verified += f" (or the extraction is wrong: {reading}{seen})"
    if not tally.train:
        raise PipelineError(f"filter: no teacher sample survived of {tally.samples_in}; {cause}; {verified}")
    raise PipelineError(
        f"filter: kept {tally.train} training examples of {tally.samples_in} teacher samples, under "
        f"filter.min_train_examples={need}; {cause}; {verified}; filter.min_train_examples=0 trains on them anyway"
    )


class DatasetWriter:
    """Where screened rows end, in input order: the dataset filters (against every row kept before), the judge
    in batches, then train.jsonl or val.jsonl, or drops.jsonl with the filter and its reason. The three files
    are written to temporary siblings and appear only if the `with` block succeeds."""

    def __init__(self, settings: FilterConfig, layout: RunLayout, seed: int, tally: Tally, judge: Judge | None) -> None:
        self.settings = settings
        self.seed = seed  # splits train from val by prompt id
        self.tally = tally
        self.dataset_filters = DatasetFilters(settings, protected=[])  # rows arrive with features prepared
        self.judge = judge
        self.pending: list[tuple[Example, Sample, list[dict[str, str]], str | None]] = []  # awaiting the judge
        self.paths = [layout.train_data, layout.val_data, layout.drops]
        self._files = ExitStack()

    def __enter__(self) -> DatasetWriter:
        self.train, self.val, self.drops = (self._files.enter_context(atomic_path(p)).open("w") for p in self.paths)
        for fh in (self.train, self.val, self.drops):
            self._files.callback(fh.close)  # closed before the temporary files are renamed
        if self.judge:
            self._files.callback(self.judge.close)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._files.__exit__(*exc_info)

    def add(self, row: Screened) -> None:
        self.tally.add(row)
        for sample, name, detail in row.dropped:
            self.drop(row.example, sample, name, detail)
        for sample in row.survivors:
            failed = self.dataset_filters.check(row.example, sample)
            if failed:
                self.drop(row.example, sample, *failed)
            elif self.judge:
                self.pending.append((row.example, sample, row.student_messages, row.teacher))
            else:
                self.keep(row.example, sample, row.student_messages, row.teacher)
        if self.judge and len(self.pending) >= self.settings.judge.batch_size:
            self.flush_judge()

    def add_replay(self, source: ReplaySource, task: Task, folder: Path) -> None:
        """Append replay rows to train.jsonl, `train.replay.fraction` of the training mix (never to val.jsonl:
        validation measures the task); generated answers are cached in `folder`."""
        replay = source.settings
        wanted = replay_wanted(replay.fraction, self.tally.train)
        rows, dropped, available = screened_replay(source, self.settings, task, wanted, folder)
        for row in rows:
            self.train.write(json_line(row))
        self.tally.replay = {
            "source": replay.source,
            "dataset": replay.dataset,
            "fraction": replay.fraction,
            "wanted": wanted,
            "available": available,
            "kept": len(rows),
            "dropped": dropped,
        }
        if len(rows) < wanted:
            log(f"filter: replay kept {len(rows)} of the {wanted} wanted, of {available} available ({replay.source})")
            log(replay_shortfall(replay, dropped))

    def malformed(self, source: Path, number: int, problem: str) -> None:
        message = malformed_line_message(source, number, problem)
        if self.settings.on_malformed_line == "fail":
            raise PipelineError(f"{message}; set filter.on_malformed_line=skip to skip bad lines")
        self.tally.malformed.append(number)
        log(f"filter: {message}, skipped")

    def drop(self, example: Example, sample: Sample, name: str, detail: str) -> None:
        record = {
            "prompt_id": example.id,
            "sample_index": sample.index,
            "filter": name,
            "detail": detail,
            "category": example.category,
            "text": sample.text,
        }
        self.drops.write(json_line(record))
        self.tally.drop(record)

    def keep(self, example: Example, sample: Sample, messages: list[dict[str, str]], teacher: str | None) -> None:
        record = {
            "messages": [*messages, {"role": "assistant", "content": sample.text.strip()}],
            "prompt_id": example.id,
            "category": example.category,
            "sample_index": sample.index,
            "teacher": teacher,
            "scores": sample.scores,
        }
        validation = in_val(example.id, self.seed, self.settings.val_fraction)
        (self.val if validation else self.train).write(json_line(record))
        self.tally.val += validation
        self.tally.train += not validation
        self.tally.categories_kept[example.category] += 1
        self.tally.categories_train[example.category] += not validation
        self.tally.lengths_kept[sample.length] += 1

    def flush_judge(self) -> None:
        """Grade the examples waiting for the judge; keep those at or above the threshold."""
        if not self.pending:
            return
        threshold = self.settings.judge.threshold
        grades = self.judge.grade([(messages, sample.text) for _, sample, messages, _ in self.pending])
        for (example, sample, messages, teacher), (score, raw) in zip(self.pending, grades, strict=True):
            sample.scores["judge"] = score
            if score is None:
                self.drop(example, sample, "judge", f"unparseable grade {raw.strip()[:40]!r}")
            elif score < threshold:
                self.drop(example, sample, "judge", f"score {score} < {threshold}")
            else:
                self.keep(example, sample, messages, teacher)
        self.pending.clear()
