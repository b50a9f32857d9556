"""How close each system comes to what its hardware can do (the roofline).

A decoder answering one request at a time reads every weight once per output token, so its ceiling is the
memory bandwidth over the bytes of its weights (Qwen2.5-0.5B in bf16 on an H100 at 3.35 TB/s: ~3,400 tok/s).
`decode_roofline_share` is the measured per-request decode speed over that ceiling. A batched run is bound by
compute instead: `batched_compute_share` is its achieved forward FLOP/s (2 per parameter per token, prompt and
output; output only where vLLM's prefix cache may serve the prompt) over the profile's peak. Neither counts the
input embedding table (one row looked up per token) unless the head shares it, and prompt tokens skip the head
(logits for the last prompt position only): for a 49k-vocabulary toy model the table is most of the weights.
Limits are those of the machine that measured (its profile in `benchmark.hardware_profiles`, or measured on a
CPU), never those of a profile a system is only priced on; the weights come from the safetensors headers.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.benchmark.costs import Hardware
from pipeline.benchmark.results import SystemResult
from pipeline.benchmark.systems import System
from pipeline.config import BenchmarkConfig, EngineConfig
from pipeline.engines.vllm_process import vllm_dtype_and_eager

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def model_folder(model: str) -> Path | None:
    """The local folder of a model path or a cached HF id; None when there is none here."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


# The input embedding table (looked up one row per token, neither read whole nor multiplied) and the output head.
EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
HEAD_NAMES = ("lm_head.weight", "embed_out.weight")


def weight_counts(folder: Path) -> tuple[int, int, int] | None:
    """(all parameters, those a token's decode step reads and multiplies, those a prompt token multiplies), from
    the safetensors headers. A decode step skips the input embedding table (one row looked up) unless the head
    shares it; a prompt token also skips the head, since engines compute logits for the last prompt position
    only. Without a recognised embedding, every parameter counts for both."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = embedding = head = 0
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                count = 1
                for dim in weights.get_slice(key).get_shape():
                    count *= dim
                total += count
                if key.endswith(EMBEDDING_NAMES):
                    embedding += count
                elif key.endswith(HEAD_NAMES):
                    head += count
    if not embedding:
        return total, total, total
    body = total - embedding - head
    return total, body + (head or embedding), body  # no head stored: tied, the embedding table is the head


def serving_dtype(engine: EngineConfig, folder: Path, on_gpu: bool) -> str | None:
    """The dtype the benchmark engine holds the weights in: its setting, else the engine's default here (fp32
    on a CPU), else the checkpoint's own."""
    if engine.backend == "vllm":
        dtype = vllm_dtype_and_eager(engine, on_gpu)[0]
    elif engine.backend == "transformers" and not on_gpu and engine.dtype in ("auto", "float32"):
        dtype = "float32"
    else:
        dtype = engine.dtype
    if dtype == "auto":
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    return str(dtype).removeprefix("torch.")


def add_roofline_shares(
    hardware: Hardware, bench: BenchmarkConfig, systems: list[System], results: dict[str, SystemResult]
) -> None:
    """Each system's decode speed against its bandwidth ceiling, and its batched run against the compute peak,
    where the machine that measured it has the limit and the weights are readable here. The limits are always
    the detected machine's, whatever profile a system is priced on: a CPU's speed over an A10G's bandwidth would
    be a share of nothing. A machine without known limits (an unknown GPU) gets no shares."""
    profile = hardware.measuring
    if profile is None:
        return
    for system in systems:
        result = results[system.name]
        folder = None if system.on_server else model_folder(system.model)  # a served model's weights are not here
        counts = weight_counts(folder) if folder else None
        if not counts or not counts[0]:
            continue
        parameters, per_output_token, per_prompt_token = counts
        dtype = serving_dtype(bench.engine, folder, hardware.machine.gpu)
        weight_bytes = per_output_token * DTYPE_BYTES.get(dtype or "", 0)  # read once per decode step
        result.parameters = parameters
        result.parameters_per_output_token = per_output_token
        result.weight_dtype = dtype
        result.weight_bytes = weight_bytes
        lowest = (result.load or {}).get("1")
        tpot = lowest.tpot_p50_s if lowest is not None else None
        if tpot:
            decode, basis = 1 / tpot, "vllm serve at concurrency 1, time per output token"
        else:
            decode, basis = result.single_request_output_tokens_per_s, "offline, one request at a time"
        if profile.memory_gbps and weight_bytes:
            ceiling = profile.memory_gbps * 1e9 / weight_bytes
            result.decode_tokens_per_s = decode
            result.decode_basis = basis
            result.decode_ceiling_tokens_per_s = ceiling
            result.decode_roofline_share = decode / ceiling
        if profile.peak_tflops:
            offline = result.offline
            # Prompt tokens found in vLLM's prefix cache are not computed again (a shared few-shot prefix: most
            # of the prompt), so with the cache on only output tokens count: a lower bound, never above the peak.
            cached = bench.engine.backend == "vllm" and bench.engine.enable_prefix_caching
            flops_per_s = 2 * per_output_token * offline.output_tokens_per_s
            if not cached:
                flops_per_s += 2 * per_prompt_token * offline.prompt_tokens_per_s
            result.batched_compute_share = flops_per_s / (profile.peak_tflops * 1e12)
            result.batched_compute_basis = "output tokens (prefix cache on)" if cached else "prompt + output tokens"
