"""The training examples as TRL reads them: each chat split into a prompt and the completion the loss falls on,
and what `train.max_length` cuts of them.

Each chat example becomes a conversational prompt/completion pair: the prompt is every message
before the last assistant turn, the completion is that turn. TRL then puts the loss on completion
tokens only, end-of-turn/EOS token included, whatever the student's chat template (no
`{% generation %}` markers needed), and padding is masked by position, so pad == EOS is harmless.
"""

from __future__ import annotations

from typing import Any

from pipeline.console import PipelineError
from pipeline.files import read_jsonl
from pipeline.layout import RunLayout
from pipeline.train.kd import KD_COLUMNS, attach_teacher_logprobs


def to_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """Split a `{"messages": [...]}` row at its last assistant turn (teacher logprobs for KD kept)."""
    messages = row.get("messages")
    if not messages or messages[-1].get("role") != "assistant":
        raise PipelineError(f"training row {row.get('prompt_id', '?')}: messages must end with an assistant turn")
    return {"prompt": messages[:-1], "completion": messages[-1:], **{k: row[k] for k in KD_COLUMNS if k in row}}


def load_splits(layout: RunLayout, objective: str) -> tuple[list[dict], list[dict]]:
    """train.jsonl and val.jsonl as prompt/completion rows; for KD (`objective`), with the teacher's logprobs
    attached (one pass over the teacher outputs for both splits)."""
    train, val = list(read_jsonl(layout.train_data)), list(read_jsonl(layout.val_data))
    if objective == "kd" and train + val:
        attach_teacher_logprobs(train + val, layout.teacher_outputs)  # in place
    return [to_prompt_completion(row) for row in train], [to_prompt_completion(row) for row in val]


def max_length_overflow(tokenizer: Any, rows: list[dict[str, Any]], max_length: int) -> dict[str, int]:
    """What `train.max_length` does to the examples, which TRL does without a word: `over_max_length` examples are
    cut at it (their answer loses its end, end-of-turn token included, so the student is taught not to stop),
    `without_answer_token` of them keep no answer token at all (TRL drops them unpacked; packed, they train on
    nothing). Token counts as TRL makes them: the chat template of the prompt, and of prompt + completion."""
    if not rows:
        return {"over_max_length": 0, "without_answer_token": 0, "longest_tokens": 0}

    def lengths(conversations: list[list[dict[str, Any]]], **kwargs: Any) -> list[int]:
        texts = tokenizer.apply_chat_template(conversations, tokenize=False, **kwargs)
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    full = lengths([row["prompt"] + row["completion"] for row in rows])
    prompt = lengths([row["prompt"] for row in rows], add_generation_prompt=True)
    return {
        "over_max_length": sum(n > max_length for n in full),
        "without_answer_token": sum(n >= max_length for n in prompt),
        "longest_tokens": max(full),
    }
