"""Inference engines behind one small interface (base.py): chat conversations in, completions out.

- `vllm` (vllm_engine.py): the offline engine `vllm.LLM`, its processes cared for in vllm_process.py;
- `openai` (openai_engine.py): any OpenAI-compatible server, `vllm serve` (vllm_serve.py starts one) or a hosted API;
- `transformers` (transformers_engine.py): batched `generate`, where neither vLLM build installs.

Which chat template each engine prompts a model with comes from `pipeline.chat_templates`, below them all.
"""

from __future__ import annotations

from pipeline.config import EngineConfig
from pipeline.console import PipelineError
from pipeline.engines.base import (
    Completion,
    Conversation,
    Engine,
    Generation,
    prompted_in_plain_chat,
    stops_for,
    timed_single_requests,
)
from pipeline.engines.openai_engine import OpenAIEngine
from pipeline.engines.transformers_engine import TransformersEngine
from pipeline.engines.vllm_engine import VLLMEngine
from pipeline.models import resolve_model

__all__ = [
    "Completion",
    "Conversation",
    "Engine",
    "Generation",
    "OpenAIEngine",
    "TransformersEngine",
    "VLLMEngine",
    "load_engine",
    "model_for",
    "prompted_in_plain_chat",
    "stops_for",
    "timed_single_requests",
]


def model_for(name: str, config: EngineConfig) -> str:
    """What `load_engine` takes: the served name for a server, else a local folder (a bundled model
    materialized, an HF id checked); raises ModelError naming `name` when there is no such model."""
    if config.backend == "openai":
        return config.server.model or name
    return resolve_model(name)


def load_engine(model: str, config: EngineConfig, seed: int, adapter: str | None = None) -> Engine:
    """`adapter`: a PEFT LoRA folder served on top of `model` without merging (vLLM `enable_lora`)."""
    if config.backend == "vllm":
        return VLLMEngine(model, config, seed, adapter)
    if config.backend == "openai":
        if adapter:
            raise PipelineError("engine.backend: openai serves what the server loaded; start it with the adapter")
        return OpenAIEngine(config.server.model or model, config, seed)
    return TransformersEngine(model, config, seed, adapter)
