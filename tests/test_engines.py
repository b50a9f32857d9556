"""Engines on a tiny random model: the real vLLM offline engine and the transformers fallback."""

from __future__ import annotations

import pytest

from pipeline.config import EngineConfig, SamplingConfig
from pipeline.engines import load_engine, timed_single_requests

CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": f"Count to {i}."}]
    for i in range(5)
]


@pytest.mark.integration
def test_vllm_engine_generates_n_samples_with_token_counts(tiny_model):
    engine = load_engine(str(tiny_model), EngineConfig(backend="vllm", max_model_len=512), seed=0)
    try:
        greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=8)
        first = engine.generate(CONVERSATIONS, greedy, progress=False)
        again = engine.generate(CONVERSATIONS, greedy, progress=False)
        sampled = engine.generate(CONVERSATIONS[:2], SamplingConfig(n=3, temperature=1.0, max_tokens=8, seed=1))
        timed = timed_single_requests(engine, CONVERSATIONS[:2], greedy)
    finally:
        engine.close()
    assert len(first) == len(CONVERSATIONS)
    assert [g.completions[0].text for g in first] == [g.completions[0].text for g in again]  # greedy is repeatable
    for gen in first:
        assert gen.prompt_tokens > 10
        (completion,) = gen.completions
        assert 1 <= completion.output_tokens <= 8
        assert completion.finish_reason in ("stop", "length")
    assert all(len(g.completions) == 3 for g in sampled)
    assert all(g.latency_s is not None and g.latency_s > 0 for g in timed)


def test_transformers_engine_matches_shapes_and_stops_at_max_tokens(tiny_model):
    engine = load_engine(str(tiny_model), EngineConfig(backend="transformers", batch_size=2), seed=0)
    out = engine.generate(CONVERSATIONS, SamplingConfig(n=2, temperature=1.0, max_tokens=6, seed=3), progress=False)
    assert len(out) == len(CONVERSATIONS)
    for gen in out:
        assert len(gen.completions) == 2
        for c in gen.completions:
            assert c.output_tokens <= 6
            assert c.finish_reason == "length" or c.output_tokens < 6 + 1
    # Left padding: the same conversation gives the same greedy answer alone or in a batch.
    greedy = SamplingConfig(max_tokens=6)
    batched = engine.generate(CONVERSATIONS, greedy, progress=False)[3].completions[0].text
    alone = engine.generate([CONVERSATIONS[3]], greedy, progress=False)[0].completions[0].text
    assert batched == alone
