"""Latency under load through a real OpenAI-compatible server: `vllm serve` started on a model
(pipeline/engines/vllm_serve.py), then streamed chat requests at each concurrency level.

Per request: time to first token (TTFT), time per output token after the first (TPOT), end-to-end latency,
prompt and output tokens (the server's own usage counts). Per level: p50/p95/p99 of each, requests/s and
output tokens/s over the level's wall time. The benchmark keeps every request as a record, so each number
can be recomputed.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from pipeline.benchmark.evaluate import task_sampling
from pipeline.benchmark.results import LoadLevel
from pipeline.benchmark.stats import percentile
from pipeline.benchmark.systems import copy_rows, engine_key, twins
from pipeline.config import BenchmarkConfig, LoadTestConfig, SamplingConfig
from pipeline.console import log
from pipeline.engines import Conversation
from pipeline.engines.openai_engine import chat_request_options
from pipeline.engines.vllm_serve import vllm_server
from pipeline.runs import FinishedUnits

if TYPE_CHECKING:
    from pipeline.benchmark.systems import System
    from pipeline.tasks import Example, Task


async def _one_request(client: Any, model: str, conversation: Conversation, sampling: SamplingConfig) -> dict:
    started = time.perf_counter()
    first = None
    usage = None
    stream = await client.chat.completions.create(
        model=model,
        messages=conversation,
        stream=True,
        stream_options={"include_usage": True},
        **chat_request_options(sampling),
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    ended = time.perf_counter()
    output_tokens = usage.completion_tokens if usage else 0
    ttft = (first or ended) - started
    return {
        "ttft_s": ttft,
        "e2e_s": ended - started,
        # After the first token: the decode speed a reader of a streamed answer sees.
        "tpot_s": (ended - started - ttft) / (output_tokens - 1) if output_tokens > 1 else None,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "output_tokens": output_tokens,
        "started_s": started,
        "ended_s": ended,
    }


async def _level(
    base_url: str, model: str, conversations: list[Conversation], sampling, concurrency: int, api_key: str
):
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600) as client:
        gate = asyncio.Semaphore(concurrency)

        async def gated(conversation: Conversation) -> dict:
            async with gate:
                return await _one_request(client, model, conversation, sampling)

        return await asyncio.gather(*(gated(c) for c in conversations))


MIN_WAVES = 2
"""Each level runs at least two waves of its concurrency: one wave's throughput is its slowest request's, 20% apart
between two runs of the same teacher (docs/measurements.md, "The load test and the verdict's noise band")."""


def requests_at(level: int, config: LoadTestConfig) -> int:
    """Timed requests at one concurrency level: `requests`, and at least MIN_WAVES waves of the level."""
    return max(config.requests, MIN_WAVES * level)


def load_test(
    base_url: str,
    model: str,
    conversations: list[Conversation],
    sampling: SamplingConfig,
    config: LoadTestConfig,
    system: str,
    api_key: str = "unused",
) -> list[dict[str, Any]]:
    """Per-request records for every concurrency level (after an untimed warm-up); `model` is the name the server
    knows the weights by, `system` the benchmark's name for them with this prompt (the progress lines')."""
    if not conversations:
        return []

    def cycle(count: int) -> list[Conversation]:
        return [conversations[i % len(conversations)] for i in range(count)]

    if config.warmup:
        asyncio.run(_level(base_url, model, cycle(config.warmup), sampling, config.warmup, api_key))
    records = []
    for level in config.concurrency:
        rows = asyncio.run(_level(base_url, model, cycle(requests_at(level, config)), sampling, level, api_key))
        log(f"benchmark: {system} at concurrency {level}: {len(rows)} requests")
        records += [{"concurrency": level, **row} for row in rows]
    return records


def summarize_level(rows: list[dict[str, Any]]) -> LoadLevel:
    """Percentiles and throughput of one level's request records (what the report shows)."""
    wall = max(r["ended_s"] for r in rows) - min(r["started_s"] for r in rows)
    ttft, tpot, e2e = ([r[key] for r in rows if r[key] is not None] for key in ("ttft_s", "tpot_s", "e2e_s"))

    def at(values: list[float], q: int) -> float | None:
        return percentile(values, q) if values else None

    timed = [r for r in rows if r["ttft_s"] is not None]
    return LoadLevel(
        requests=len(rows),
        wall_s=wall,
        ttft_p50_s=at(ttft, 50),
        ttft_p95_s=at(ttft, 95),
        ttft_p99_s=at(ttft, 99),
        tpot_p50_s=at(tpot, 50),
        tpot_p95_s=at(tpot, 95),
        tpot_p99_s=at(tpot, 99),
        e2e_p50_s=at(e2e, 50),
        e2e_p95_s=at(e2e, 95),
        e2e_p99_s=at(e2e, 99),
        requests_per_s=len(rows) / wall,
        output_tokens_per_s=sum(r["output_tokens"] for r in rows) / wall,
        prompt_tokens_per_s=sum(r["prompt_tokens"] or 0 for r in rows) / wall,
        mean_prompt_tokens=sum(r["prompt_tokens"] or 0 for r in rows) / len(rows),
        prompt_time_share=sum(r["ttft_s"] for r in timed) / sum(r["e2e_s"] for r in timed) if timed else None,
    )


def load_unit(system: str) -> str:
    """The finished-unit key of a system's load-test rows (runs.FinishedUnits)."""
    return f"load:{system}"


def run_load_tests(
    bench: BenchmarkConfig,
    seed: int,
    systems: list[System],
    task: Task,
    examples: list[Example],
    units: FinishedUnits,
) -> tuple[dict[str, dict[str, LoadLevel]], list[dict[str, Any]]]:
    """Every system through an OpenAI-compatible server at each concurrency level: `vllm serve` started here,
    one per base model with its systems' adapters beside it, or the system's own server (`engine.server`).
    Returns per-system level summaries and the per-request records. Each system's rows are saved as one unit
    as it finishes: a rerun after a kill starts no server for a group already done."""
    copied_from = twins(systems)
    todo = [s for s in systems if load_unit(s.name) not in units and s.name not in copied_from]

    def measure(system: System, base_url: str, served_name: str, api_key: str = "unused") -> None:
        conversations = [task.messages(ex, system.prompt_style) for ex in examples]
        sampling = task_sampling(bench, task, system.constrained)
        rows = load_test(base_url, served_name, conversations, sampling, bench.load_test, system.name, api_key)
        units.save(load_unit(system.name), [{"system": system.name, "kind": "load", **row} for row in rows])

    for system in todo:
        if system.on_server:  # measured where it is served (a hosted API: latency over the network, its price)
            assert system.engine is not None
            measure(system, system.engine.server.base_url, system.model, system.engine.server.api_key())
    by_model: dict[tuple[str, str], list[System]] = {}
    for system in systems:
        if not system.on_server:
            by_model.setdefault((system.model, engine_key(system.engine)), []).append(system)
    for (model, _), group in by_model.items():
        started = [system for system in group if system in todo]
        if not started:
            continue
        served = {s.name: f"adapter-{i}" if s.adapter else "base" for i, s in enumerate(group)}
        adapters = {served[s.name]: s.adapter for s in group if s.adapter}
        engine = group[0].engine or bench.engine  # a system on the teacher's model: its chat template (system_engine)
        log(f"benchmark: vllm serve {model} for {', '.join(s.name for s in started)}")
        with vllm_server(model, engine, seed, adapters, bench.load_test.startup_timeout_s) as url:
            for system in started:
                measure(system, url, served[system.name])
    summaries: dict[str, dict[str, LoadLevel]] = {}
    records: list[dict[str, Any]] = []
    for system in systems:
        source = copied_from.get(system.name)  # the same model and prompt as a system measured: its rows
        if source and load_unit(system.name) not in units:
            units.save(load_unit(system.name), copy_rows(units.get(load_unit(source)), source, system.name, ("load",)))
        rows = units.get(load_unit(system.name))
        records += rows
        levels = sorted({row["concurrency"] for row in rows})
        summaries[system.name] = {
            str(level): summarize_level([r for r in rows if r["concurrency"] == level]) for level in levels
        }
    return summaries, records
