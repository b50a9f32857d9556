"""The engine interface: chat conversations in, `Generation`s out, whichever engine answers."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.chat_templates import PLAIN_NEXT_TURN, is_plain_template
from pipeline.config import SamplingConfig

Conversation = list[dict[str, str]]


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length" (hit max_tokens)
    output_tokens: int | None  # None where a server reports only the total of n samples (Generation.output_tokens)
    # With sampling.logprobs=k: the sampled token ids, and per output token the top-k (token, logprob) pairs
    # best first, for logit distillation. Tokens are ids from vLLM offline, strings from a server.
    token_ids: list[int] | None = None
    top_logprobs: list[list[tuple[int | str, float]]] | None = None


@dataclass
class Generation:
    completions: list[Completion]
    prompt_tokens: int
    latency_s: float | None = None  # set when the request ran alone
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # this prompt could not be answered (e.g. longer than the context): no completions

    @property
    def output_tokens(self) -> int:
        reported = self.extra.get("usage", {}).get("completion_tokens")
        return reported if reported is not None else sum(c.output_tokens or 0 for c in self.completions)


def progress_label(progress: bool | str, default: str) -> str:
    """A progress bar's label: the caller's text, else the engine's own."""
    return progress if isinstance(progress, str) else default


def labelled_tqdm(label: str) -> Callable[..., Any]:
    """A tqdm factory for vLLM's `use_tqdm` that shows `label` instead of its "Processed prompts"."""
    from tqdm.auto import tqdm

    return lambda *args, **kwargs: tqdm(*args, **{**kwargs, "desc": label})


class Engine(ABC):
    """Generates completions for chat conversations."""

    model: str

    @abstractmethod
    def generate(
        self, conversations: list[Conversation], sampling: SamplingConfig, progress: bool | str = True
    ) -> list[Generation]:
        """One Generation per conversation, in order, each with `sampling.n` completions. `progress`: a bar
        labelled by the engine (True), by the given text (e.g. "judge"), or none (False)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the engine's memory and worker processes."""

    def clear_prefix_cache(self) -> None:  # noqa: B027 - optional hook
        """Forget cached prompt prefixes, so the next request pays for its whole prompt."""


def timed_single_requests(
    engine: Engine, conversations: list[Conversation], sampling: SamplingConfig, cold: bool = False
) -> list[Generation]:
    """Run requests one at a time (concurrency 1) and record each one's end-to-end latency.

    Warm (default): a prompt prefix seen before (a shared system prompt) may come from the prefix cache,
    as on a busy server. Cold: the cache is cleared before each request, so every prompt token is
    computed, as after an eviction or on a server without prefix caching."""
    results = []
    for conv in conversations:
        if cold:
            engine.clear_prefix_cache()
        start = time.perf_counter()
        (gen,) = engine.generate([conv], sampling, progress=False)
        gen.latency_s = time.perf_counter() - start
        results.append(gen)
    return results


def prompted_in_plain_chat(engine: Engine) -> bool:
    """Whether `engine` prompts its model with the plain template: a base model, untuned (given the template here)
    or tuned with it (its saved tokenizer carries it). False for a server: its template is its own."""
    own = getattr(getattr(engine, "tokenizer", None), "chat_template", None)
    return is_plain_template(getattr(engine, "chat_template", None) or own)


def stops_for(engine: Engine, stop: Sequence[str]) -> list[str]:
    """`stop`, and the plain template's next turn where `engine` prompts in it: where a base model's answer ends."""
    return [*stop, PLAIN_NEXT_TURN] if prompted_in_plain_chat(engine) else list(stop)
