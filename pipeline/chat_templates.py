"""Chat templates: which one a model is prompted, trained and served with, and where its answers end.

A model without a template of its own (a base model) gets the plain one shipped in `pipeline/data/`; every engine,
the trainer and `vllm serve` take theirs from `chat_template_for`, so a student is asked in the format it learned.
The end-of-turn token a template closes an answer with is a stop token for every engine and for a saved student.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.console import PipelineError, log


def read_chat_template(value: str | None) -> str | None:
    """The template itself, read from a file when `value` names one."""
    if value is not None and "{" not in value:
        path = Path(value)
        if not path.is_file():
            raise PipelineError(f"engine.chat_template: {value!r} is neither a Jinja template nor a file")
        return path.read_text()
    return value


PLAIN_CHAT_TEMPLATE = Path(__file__).parent / "data" / "plain_chat.jinja"


def chat_template_for(tokenizer: Any, configured: str | None, model: str) -> str | None:
    """The chat template `model` is prompted and trained with in place of its own: `configured` (engine.chat_template,
    a template or a file); else, for a model without one (a base model, which otherwise fails at its first chat
    message), the plain template shipped in `pipeline/data/`, said once, led by the BOS token where the tokenizer
    adds one to plain text (Gemma, Llama, Mistral: every engine and TRL tokenize a rendered chat without special
    tokens, and such a model prompted without its BOS answers poorly). None: the model's own."""
    if configured is not None:
        return read_chat_template(configured)
    if tokenizer.chat_template is not None:
        return None
    _say_plain_template(model)
    return ("{{- bos_token }}" if adds_bos(tokenizer) else "") + PLAIN_CHAT_TEMPLATE.read_text()


def is_plain_template(template: str | None) -> bool:
    """Whether a template `chat_template_for` returned is the plain one: a model with no chat format of its own."""
    return template is not None and template.endswith(PLAIN_CHAT_TEMPLATE.read_text())


# Where the plain template opens the next turn: the end of an answer that a model not closing it with EOS (a base
# model, untuned) goes on past, writing the next question itself.
PLAIN_NEXT_TURN = "\n\nUser:"


def worked_example_turns(examples: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """(question, answer) pairs as earlier user and assistant turns: how a base model, which has no chat format of
    its own, is shown the format of an answer (the probe, replay answers)."""
    return [
        turn
        for asked, answer in examples
        for turn in ({"role": "user", "content": asked}, {"role": "assistant", "content": answer})
    ]


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts plain text with its BOS token, as the model saw its pre-training text."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def end_of_turn_id(tokenizer: Any, template: str | None = None) -> int | None:
    """The special token a chat template (`template`, else the tokenizer's) closes an assistant turn with
    (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, or EOS itself): what a model tuned on it emits when its answer
    is done. None where the template closes a turn with no special token, or cannot render a plain exchange."""
    from jinja2 import TemplateError

    mark = "@@answer@@"
    exchange = [{"role": "user", "content": "question"}, {"role": "assistant", "content": mark}]
    try:
        text = tokenizer.apply_chat_template(exchange, tokenize=False, chat_template=template)
    except (TemplateError, ValueError):
        return None
    if mark not in text:
        return None
    after = tokenizer(text[text.rindex(mark) + len(mark) :], add_special_tokens=False)["input_ids"]
    added = tokenizer.added_tokens_decoder
    return after[0] if after and after[0] in added and added[after[0]].special else None


def eos_ids_with(eos_token_id: int | list[int] | None, *more: int | None) -> list[int]:
    """A generation config's `eos_token_id` (one id, a list or None) as a list, with `more` ids not in it yet."""
    ids = list(eos_token_id) if isinstance(eos_token_id, list) else [eos_token_id]
    for extra in more:
        if extra not in ids:
            ids.append(extra)
    return [i for i in ids if i is not None]


def add_end_of_turn_stop(generation_config: Any, tokenizer: Any, template: str | None = None) -> bool:
    """Add the chat template's end-of-turn token to a generation config's `eos_token_id` (the stop tokens a saved
    model is served with) where it is not there yet; True when it was added. Without it, a model whose EOS is not
    that token (Qwen2.5 base) and that learned to close its turns with it, served from its folder, never stops."""
    end = end_of_turn_id(tokenizer, template)
    if end is None or end in eos_ids_with(generation_config.eos_token_id):
        return False
    generation_config.eos_token_id = eos_ids_with(generation_config.eos_token_id, end)
    return True


def stop_token_ids(tokenizer: Any, template: str | None) -> list[int]:
    """Where the template's end-of-turn token is not the EOS token every engine stops at (Qwen2.5 base:
    `<|im_end|>` against `<|endoftext|>`), that token too: every engine stops there, for every model alike."""
    end = end_of_turn_id(tokenizer, template)
    return [end] if end is not None and end != tokenizer.eos_token_id else []


@cache
def _say_plain_template(model: str) -> None:
    log(
        f"{model} has no chat template (a base model): it is prompted, trained and served with the plain one in "
        f"{PLAIN_CHAT_TEMPLATE.relative_to(PLAIN_CHAT_TEMPLATE.parents[2])} (engine.chat_template sets another)"
    )
