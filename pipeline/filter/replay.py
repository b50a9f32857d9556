"""Replay against forgetting: general chat examples mixed into the training data (`train.replay`).

The rows come from a dataset of chats read with `datasets` (a local JSONL/JSON file or a Hugging Face id).
Each is screened like a teacher answer: dropped when its answer is empty, when it repeats an earlier replay row,
or when its user turn is a benchmark test prompt or a probe question or shares an n-gram with one (always on for
replay: general chats are where probe-like questions live). Enough are kept, in a seeded order, for replay to be
`fraction` of the training mix.
"""

from __future__ import annotations

import random
from typing import Any

from pipeline.config import ExperimentConfig
from pipeline.filter.filters import DatasetFilters, Sample
from pipeline.filter.screen import TEST_GUARD
from pipeline.runs import PipelineError
from pipeline.tasks import Example, Task

REPLAY_FILTERS = ("exact_dedup", "decontaminate")


def replay_wanted(fraction: float, task_examples: int) -> int:
    """Replay rows that make `fraction` of a mix with `task_examples` task rows."""
    return round(task_examples * fraction / (1 - fraction)) if fraction > 0 else 0


def read_replay_chats(config: ExperimentConfig) -> list[list[dict[str, str]]]:
    """The replay dataset's conversations; a missing file or column, or a row that is not a chat ending in an
    answer, is a one-line error naming the key."""
    replay = config.train.replay
    source = replay.dataset or ""
    path = config.base_dir / source
    try:
        import datasets

        datasets.disable_progress_bars()
        if path.is_file():
            rows = datasets.load_dataset("json", data_files=str(path), split="train")
        else:
            rows = datasets.load_dataset(source, split=replay.split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; the user needs the key and the reason
        raise PipelineError(f"train.replay.dataset: cannot read {source!r}: {str(exc).splitlines()[0][:200]}") from None
    if replay.messages_column not in rows.column_names:
        raise PipelineError(
            f"train.replay.messages_column: {source!r} has no column {replay.messages_column!r} "
            f"(columns: {', '.join(rows.column_names)})"
        )
    chats = []
    for number, messages in enumerate(rows[replay.messages_column], 1):
        roles = [m.get("role") for m in messages or []] if isinstance(messages, list) else []
        if "user" not in roles or roles[-1] != "assistant":
            raise PipelineError(
                f"train.replay.dataset: row {number} of {source!r} is not a chat with a user turn that ends in an "
                "assistant answer"
            )
        chats.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return chats


def protected_for_replay(config: ExperimentConfig, task: Task) -> list[tuple[str, str]]:
    """What no replay question may be: the benchmark's test prompts and the probe's questions."""
    from pipeline.benchmark.probe import load_probe

    return [(ex.id, ex.user) for ex in task.split("test")] + [(f"probe:{q.id}", q.question) for q in load_probe()]


def screened_replay(config: ExperimentConfig, task: Task, wanted: int) -> tuple[list[dict[str, Any]], dict, int]:
    """Up to `wanted` replay rows in a seeded order, as training rows; the drops by filter; rows available."""
    settings = config.filter
    filters = DatasetFilters(
        settings.model_copy(
            update={
                "order": list(REPLAY_FILTERS),
                "exact_dedup": settings.exact_dedup.model_copy(update={"enabled": True}),
                "decontaminate": settings.decontaminate.model_copy(update={"enabled": True, "probe": True}),
            }
        ),
        protected_for_replay(config, task),
    )
    chats = read_replay_chats(config)
    order = list(range(len(chats)))
    random.Random(config.seed).shuffle(order)
    kept: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}
    for index in order:
        if len(kept) >= wanted:
            break
        messages = chats[index]
        user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        example = Example(f"replay-{index}", user, {}, "replay")
        sample = Sample(example.id, 0, messages[-1]["content"])
        failed = ("empty", "no answer") if not sample.text.strip() else None
        if failed is None and filters.guard(example) is not None:
            failed = (TEST_GUARD, "a protected prompt")
        failed = failed or filters.check(example, sample)
        if failed is not None:
            dropped[failed[0]] = dropped.get(failed[0], 0) + 1
            continue
        kept.append(
            {
                "messages": [*messages[:-1], {**messages[-1], "content": sample.text.strip()}],
                "prompt_id": example.id,
                "category": "replay",
                "sample_index": 0,
                "replay": True,
            }
        )
    return kept, dropped, len(chats)
