"""Replay against forgetting: general chat examples mixed into the training data (`train.replay`).

The rows are general prompts answered by the untuned student itself or by the teacher (only as many as the wanted
rows need, each answer cached in the filter's folder under a key of what shapes it), or chats read with `datasets`
(a local JSONL/JSON file or a Hugging Face id). Each is screened like a teacher answer: dropped when its user turn
is a benchmark test prompt or a probe question or shares an n-gram with one (always on for replay: general chats
are where probe-like questions live; a test prompt or probe question is not even answered), when its answer is
empty, was cut at max_tokens or copies a worked answer it was shown, or when it repeats an earlier replay row.
Enough are kept, in a seeded order, for replay to be `fraction` of the training mix.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.chat_templates import worked_example_turns
from pipeline.config import EngineConfig, ExperimentConfig, FilterConfig, ReplayConfig, SamplingConfig, engine_identity
from pipeline.console import PipelineError, log
from pipeline.engines import stops_for
from pipeline.files import atomic_path, json_line, read_jsonl
from pipeline.filter.filters import DatasetFilters, NgramIndex, Sample
from pipeline.filter.screen import TEST_GUARD, protected_prompts
from pipeline.pruning import student_identity, student_model_name
from pipeline.tasks import Example, Task

REPLAY_FILTERS = ("exact_dedup", "decontaminate")
COPIES_WORKED_ANSWER = "copies_worked_answer"  # the drop reason of a generated answer that repeats a worked one
GENERAL_PROMPTS = Path(__file__).parent / "data" / "general_prompts.jsonl"  # written for the project
# Worked answers shown first to an answerer with no chat format of its own (a base model), also written for the
# project; a test keeps them clear of the general prompts, the probe and the test split.
WORKED_EXAMPLES = Path(__file__).parent / "data" / "replay_shots.jsonl"
ANSWERS = "replay_answers.jsonl"  # the cache of generated answers, in the filter's folder

Chat = list[dict[str, str]]


def replay_wanted(fraction: float, task_examples: int) -> int:
    """Replay rows that make `fraction` of a mix with `task_examples` task rows."""
    return round(task_examples * fraction / (1 - fraction)) if fraction > 0 else 0


@dataclass(frozen=True)
class ReplaySource:
    """Where replay rows come from, as `replay_source` resolves it from the config: the `train.replay` settings,
    the folder relative paths start from, the model that answers general prompts on its engine, and the seed."""

    settings: ReplayConfig
    base_dir: Path
    model: str  # the untuned student ("self") or the teacher; unused for a dataset of chats
    engine: EngineConfig
    seed: int
    identity: str  # what `model` is, alike in every run that makes it alike (a pruned student's folder is per run)


def answers_own_replay(config: ExperimentConfig) -> bool:
    """Whether the untuned student answers the replay prompts itself (`train.replay.source: self`)."""
    return config.train.replay.fraction > 0 and config.train.replay.source == "self"


def replay_source(config: ExperimentConfig) -> ReplaySource:
    """Replay's source for this experiment: the untuned student answers on the benchmark's engine ("self", as it
    is served), or the teacher on its own."""
    replay = config.train.replay
    if replay.source == "self":
        model, engine, identity = student_model_name(config), config.benchmark.engine, student_identity(config)
    else:
        model, engine, identity = config.teacher.model, config.teacher.engine, config.teacher.model
    return ReplaySource(replay, config.base_dir, model, engine, config.seed, identity)


def read_replay_chats(source: ReplaySource) -> list[tuple[Chat, str | None]]:
    """The replay dataset's conversations; a missing file or column, or a row that is not a chat ending in an
    answer, is a one-line error naming the key."""
    replay = source.settings
    dataset = replay.dataset or ""
    path = source.base_dir / dataset
    try:
        import datasets

        datasets.disable_progress_bars()
        if path.is_file():
            rows = datasets.load_dataset("json", data_files=str(path), split="train")
        else:
            rows = datasets.load_dataset(dataset, split=replay.split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; the user needs the key and the reason
        reason = str(exc).splitlines()[0][:200]
        raise PipelineError(f"train.replay.dataset: cannot read {dataset!r}: {reason}") from None
    if replay.messages_column not in rows.column_names:
        raise PipelineError(
            f"train.replay.messages_column: {dataset!r} has no column {replay.messages_column!r} "
            f"(columns: {', '.join(rows.column_names)})"
        )
    chats = []
    for number, messages in enumerate(rows[replay.messages_column], 1):
        roles = [m.get("role") for m in messages or []] if isinstance(messages, list) else []
        if "user" not in roles or roles[-1] != "assistant":
            raise PipelineError(
                f"train.replay.dataset: row {number} of {dataset!r} is not a chat with a user turn that ends in an "
                "assistant answer"
            )
        chats.append(([{"role": m["role"], "content": m["content"]} for m in messages], None))
    return chats


def replay_input(source: ReplaySource) -> Path:
    """The file replay rows come from (part of the filter's fingerprint): the prompts, or the dataset's file."""
    replay = source.settings
    if replay.source == "dataset":
        return source.base_dir / (replay.dataset or "")
    return source.base_dir / replay.prompts if replay.prompts else GENERAL_PROMPTS


ANSWER_MARGIN = 1.5
"""Prompts answered per missing replay row in a round (the next round at least doubles what was answered): screening
keeps about three in four, and answering every shipped prompt for the few rows a run needs cost the filter stage
minutes (docs/measurements.md, "Replay's answer rounds")."""


def general_prompts(source: ReplaySource) -> list[str]:
    """The prompts replay answers (`train.replay.prompts`, default the shipped general set)."""
    prompts_file = replay_input(source)
    if not prompts_file.is_file():
        raise PipelineError(f"train.replay.prompts: file not found: {source.settings.prompts}")
    return [row["prompt"] for row in read_jsonl(prompts_file)]


def worked_examples() -> list[tuple[str, str]]:
    """The (prompt, answer) pairs a base answerer is shown before each general prompt."""
    return [(row["prompt"], row["answer"]) for row in read_jsonl(WORKED_EXAMPLES)]


def answerer_identity(source: ReplaySource) -> dict[str, Any] | None:
    """What decides the replay answers besides their prompts (the filter's fingerprint holds it); None when
    replay is off or brings its own answers."""
    replay = source.settings
    if replay.fraction == 0 or replay.source == "dataset":
        return None
    return {
        "model": source.identity,
        "engine": engine_identity(source.engine.model_dump()),
        "max_tokens": replay.max_tokens,
        "worked_examples": hashlib.sha256(WORKED_EXAMPLES.read_bytes()).hexdigest()[:16],  # what a base model sees
    }


class ReplayAnswers:
    """General prompts answered by the untuned student ("self") or the teacher, greedy, one engine for every
    round (loaded at the first prompt not yet answered, closed on exit: a 7B teacher loads once, not per round).
    Answers are cached per prompt in the filter's folder under a key of what shapes them (`answerer_identity`, the
    seed): only the prompts without one are generated, and a rerun generates none.

    An answerer with no chat format of its own (a base model, in the plain template) is shown worked answers
    first and read up to the next turn it writes itself, as the probe asks it: asked bare, a base model repeats
    each prompt until `max_tokens` (docs/measurements.md, "A base student answering its own replay prompts")."""

    def __init__(self, source: ReplaySource, folder: Path) -> None:
        self.source = source
        self.cache = folder / ANSWERS
        identity = [answerer_identity(source), source.seed]
        self.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        cached = read_jsonl(self.cache) if self.cache.is_file() else []
        self.rows = {row["prompt"]: row for row in cached if row.get("key") == self.key}
        self.engine: Any = None
        self.first_turns: list[dict[str, str]] = []

    def __enter__(self) -> ReplayAnswers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def _load(self) -> Any:
        from pipeline.engines import load_engine, model_for, prompted_in_plain_chat  # at use: tests stand one in

        model, engine_config = self.source.model, self.source.engine
        self.engine = load_engine(model_for(model, engine_config), engine_config, self.source.seed)
        shown = worked_examples() if prompted_in_plain_chat(self.engine) else []
        if shown:
            log(
                f"filter: replay: {model} has no chat format of its own: each prompt after {len(shown)} worked "
                "answers, its own answer read up to the next turn"
            )
        self.first_turns = worked_example_turns(shown)
        return self.engine

    def __call__(self, prompts: list[str]) -> list[tuple[Chat, str | None]]:
        """`prompts` with their answers and finish reasons, the missing ones generated and cached."""
        replay = self.source.settings
        missing = list(dict.fromkeys(p for p in prompts if p not in self.rows))
        if missing:
            log(f"filter: replay: {self.source.model} answers {len(missing)} general prompts ({replay.source})")
            engine = self.engine or self._load()
            conversations = [[*self.first_turns, {"role": "user", "content": prompt}] for prompt in missing]
            stop = stops_for(engine, [])
            sampling = SamplingConfig(temperature=0.0, max_tokens=replay.max_tokens, seed=self.source.seed, stop=stop)
            generations = engine.generate(conversations, sampling, progress="replay answers")
            for prompt, g in zip(missing, generations, strict=True):
                self.rows[prompt] = {
                    "key": self.key,
                    "prompt": prompt,
                    "answer": g.completions[0].text if g.completions else "",
                    "finish_reason": g.completions[0].finish_reason if g.completions else "error",
                    "worked_examples": len(self.first_turns) // 2,
                }
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.cache) as partial:
                partial.write_text("".join(json_line(row) for row in self.rows.values()))
        return [
            (
                [{"role": "user", "content": p}, {"role": "assistant", "content": self.rows[p]["answer"]}],
                self.rows[p]["finish_reason"],
            )
            for p in prompts
        ]


def replay_shortfall(replay: ReplayConfig, dropped: dict[str, int]) -> str:
    """Why replay fell short of the rows wanted, most drops first, and the key that fixes the commonest cause."""
    if not dropped:
        return "filter: replay: none dropped, the rows ran out; a larger train.replay.prompts file or dataset has more"
    reasons = sorted(dropped.items(), key=lambda item: -item[1])
    said = f"filter: replay dropped {', '.join(f'{n} {reason}' for reason, n in reasons)}"
    if reasons[0][0] == "truncated":
        said += (
            f"; answers ran past train.replay.max_tokens ({replay.max_tokens}): raise it, or, for an answerer "
            "that repeats itself until cut (a weak base student answering itself), set train.replay.source to "
            "teacher or dataset"
        )
    return said


def _failure(sample: Sample, example: Example, filters: DatasetFilters, shown: NgramIndex) -> tuple[str, str] | None:
    """Why a replay answer is dropped (filter, detail), or None to keep it."""
    if not sample.text.strip():
        return "empty", "no answer"
    if sample.finish_reason == "length":
        return "truncated", "cut at train.replay.max_tokens"
    if shown.match(sample.text) is not None:
        return COPIES_WORKED_ANSWER, "repeats a worked answer shown before the prompt"
    return filters.check(example, sample)


def screened_replay(
    source: ReplaySource, settings: FilterConfig, task: Task, wanted: int, folder: Path
) -> tuple[list[dict[str, Any]], dict, int]:
    """Up to `wanted` replay rows in a seeded order, as training rows; the drops by filter (`settings`' dedup and
    decontamination, always on for replay); rows available. Generated answers are made in rounds, only as many as
    the rows still missing need (`ANSWER_MARGIN`), and cached in `folder` (the filter stage's); a protected prompt
    is dropped before it is answered."""
    if wanted == 0:
        return [], {}, 0
    filters = DatasetFilters(
        settings.model_copy(
            update={
                "order": list(REPLAY_FILTERS),
                "exact_dedup": settings.exact_dedup.model_copy(update={"enabled": True}),
                "decontaminate": settings.decontaminate.model_copy(update={"enabled": True, "probe": True}),
            }
        ),
        protected_prompts(task, probe=True),
    )
    kind = source.settings.source
    if kind == "dataset":
        chats = read_replay_chats(source)
        users = [next(m["content"] for m in reversed(chat) if m["role"] == "user") for chat, _ in chats]
    else:
        users = general_prompts(source)
    # A base answerer may hand back a worked answer it was shown as its own: an answer to another question (Gemma 3
    # 270M did, for a prompt that nearly repeated a worked one). An n-gram as long as decontamination's marks it.
    shown = NgramIndex(
        [] if kind == "dataset" else [("a worked answer", answer) for _, answer in worked_examples()],
        settings.decontaminate.ngram,
    )
    order = list(range(len(users)))
    random.Random(source.seed).shuffle(order)
    kept: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}

    def drop(reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1

    position = 0
    with ReplayAnswers(source, folder) as answered:
        while len(kept) < wanted and position < len(order):
            size = max(math.ceil((wanted - len(kept)) * ANSWER_MARGIN), position)
            batch = order[position : position + size]
            position += len(batch)
            examples = {i: Example(f"replay-{i}", users[i], {}, "replay") for i in batch}
            allowed = [i for i in batch if filters.guard(examples[i]) is None]
            for _ in range(len(batch) - len(allowed)):
                drop(TEST_GUARD)
            batch_chats = [chats[i] for i in allowed] if kind == "dataset" else answered([users[i] for i in allowed])
            for index, (messages, finish) in zip(allowed, batch_chats, strict=True):
                if len(kept) >= wanted:
                    break
                sample = Sample(examples[index].id, 0, messages[-1]["content"], finish)
                failed = _failure(sample, examples[index], filters, shown)
                if failed is not None:
                    drop(failed[0])
                    continue
                kept.append(
                    {
                        "messages": [*messages[:-1], {**messages[-1], "content": sample.text.strip()}],
                        "prompt_id": examples[index].id,
                        "category": "replay",
                        "sample_index": 0,
                        "replay": True,
                        "replay_source": kind,
                    }
                )
    return kept, dropped, len(users)
