"""Engines on a tiny random model: the real vLLM offline engine and the transformers fallback."""

from __future__ import annotations

import json

import pytest

from pipeline.config import EngineConfig, SamplingConfig
from pipeline.console import PipelineError
from pipeline.engines import load_engine, prompted_in_plain_chat, timed_single_requests
from tests.conftest import ping

CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": f"Count to {i}."}]
    for i in range(5)
]


# Labels where one is a prefix of another and one spans several tokens: a constraint must allow both.
LABELS = ["pos", "positive", "very negative indeed"]


def assert_every_answer_is_a_label(generations) -> None:
    """Constrained decoding on a random model: whatever the weights say, each answer is exactly a label."""
    texts = [c.text.strip() for g in generations for c in g.completions]
    assert len(texts) == 3 * len(CONVERSATIONS) and set(texts) <= set(LABELS), texts
    assert all(c.finish_reason == "stop" for g in generations for c in g.completions)


@pytest.mark.integration
def test_vllm_engine_generates_n_samples_with_token_counts(tiny_model, capsys):
    import psutil

    from pipeline.engines.vllm_process import WATCHER

    def children() -> set[int]:  # but the watcher that stops them if this process dies
        return {child.pid for child in psutil.Process().children(recursive=True) if WATCHER not in child.cmdline()}

    children_before = children()
    engine = load_engine(str(tiny_model), EngineConfig(backend="vllm", max_model_len=512, kv_cache_gb=0.25), seed=0)
    try:
        # On a CPU the engine runs in this process (no engine-core or worker children), with the KV cache asked for.
        assert children() <= children_before
        assert engine.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == 2**28
        greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=8)
        first = engine.generate(CONVERSATIONS, greedy, progress=False)
        capsys.readouterr()
        again = engine.generate(CONVERSATIONS, greedy, progress="judge")  # the bar says what is generating
        bar = capsys.readouterr().err
        sampled = engine.generate(CONVERSATIONS[:2], SamplingConfig(n=3, temperature=1.0, max_tokens=8, seed=1))
        timed = timed_single_requests(engine, CONVERSATIONS[:2], greedy)
        cold = timed_single_requests(engine, CONVERSATIONS[:2], greedy, cold=True)  # prefix cache cleared each time
        with_logprobs = engine.generate(CONVERSATIONS[:1], SamplingConfig(max_tokens=6, logprobs=3), progress=False)
        schema = {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}
        structured = engine.generate(
            CONVERSATIONS[:3], SamplingConfig(max_tokens=48, json_schema=schema, extra={"top_k": 5}), progress=False
        )
        too_long = [{"role": "user", "content": "word " * 2000}]
        mixed = engine.generate([CONVERSATIONS[0], too_long, CONVERSATIONS[1]], greedy, progress=False)
        labelled = engine.generate(CONVERSATIONS, SamplingConfig(n=3, temperature=1.0, choices=LABELS), progress=False)
    finally:
        engine.close()
    assert len(first) == len(CONVERSATIONS)
    assert [g.completions[0].text for g in first] == [g.completions[0].text for g in again]  # greedy is repeatable
    assert "judge: 100%" in bar and "Processed prompts" not in bar, bar
    for gen in first:
        assert gen.prompt_tokens > 10
        (completion,) = gen.completions
        assert 1 <= completion.output_tokens <= 8
        assert completion.finish_reason in ("stop", "length")
    assert all(len(g.completions) == 3 for g in sampled)
    assert all(g.latency_s is not None and g.latency_s > 0 for g in timed + cold)
    assert [g.completions[0].text for g in cold] == [g.completions[0].text for g in first[:2]]
    (scored,) = with_logprobs[0].completions
    assert len(scored.token_ids) == len(scored.top_logprobs) == scored.output_tokens
    for token, step in zip(scored.token_ids, scored.top_logprobs, strict=True):
        assert 3 <= len(step) <= 4 and token in {t for t, _ in step}  # top 3, plus the sampled token
        assert [lp for _, lp in step] == sorted((lp for _, lp in step), reverse=True)
    for gen in structured:  # constrained decoding: whatever the random weights say, it is the schema's JSON
        completion = gen.completions[0]
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text)["id"], int)
        else:
            assert completion.text.lstrip().startswith("{")
    assert_every_answer_is_a_label(labelled)
    # A prompt that cannot fit is reported on its own; the others in its batch are still answered.
    assert mixed[1].error and "does not fit max_model_len 512" in mixed[1].error and not mixed[1].completions
    assert [g.completions[0].text for g in (mixed[0], mixed[2])] == [g.completions[0].text for g in first[:2]]


MULTIPROCESS_ENGINE = """
import json, os, stat, sys
from pathlib import Path
if __name__ == "__main__":
    from pipeline.config import EngineConfig, SamplingConfig
    from pipeline.engines import load_engine
    from pipeline.engines.vllm_process import RPC_BASE_ENV
    base = Path(os.environ[RPC_BASE_ENV])
    engine = load_engine(sys.argv[1], EngineConfig(max_model_len=256, kv_cache_gb=0.25), seed=0)
    up = [p for p in base.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode)]
    engine.generate([[{"role": "user", "content": "Hi"}]], SamplingConfig(n=1, max_tokens=2), progress=False)
    engine.close()
    print(json.dumps({"sockets_up": len(up), "in_own_folder": all(p.parent.parent == base for p in up),
                      "base_restored": os.environ[RPC_BASE_ENV] == str(base)}))
"""


@pytest.mark.integration
def test_a_closed_multiprocess_vllm_engine_leaves_no_socket_files(tiny_model, rpc_base):
    """vLLM's multiprocess engine (the GPU default; set here by VLLM_ENABLE_V1_MULTIPROCESSING=1, in a fresh
    process, since vLLM caches its settings once an in-process engine has run) left 7 ZMQ socket files in
    VLLM_RPC_BASE_PATH per engine; the engine now gives them a folder that close() removes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.engines.vllm_process import MULTIPROCESSING_ENV, RPC_BASE_ENV

    done = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS_ENGINE, str(tiny_model)],
        env=os.environ | {MULTIPROCESSING_ENV: "1", RPC_BASE_ENV: str(rpc_base)},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["sockets_up"] > 0 and seen["in_own_folder"] and seen["base_restored"]
    assert list(rpc_base.iterdir()) == []


def test_what_a_process_killed_with_sigkill_started_is_stopped_and_what_it_released_is_not(tmp_path):
    """vLLM's multiprocess engine core and worker, and `vllm serve` (in a session of its own), outlived a stage
    killed by SIGKILL (seen: all still up a minute later), holding the memory a resumed stage needs. Started inside
    `stopped_if_this_process_dies`, a stand-in is stopped when its starter is killed, and its socket folder
    removed: a server (`sleep`, in a session of its own as `vllm serve` is) started a moment before the kill,
    too soon for the watcher's twice-a-second look (its environment's marker tells), and a process started with an
    environment of its own that ignores SIGTERM (killed after 10 s), in nested blocks whose outer watcher must not
    stop the inner one before it has removed its folder. One started in a block its starter left is its
    starter's, and runs on, its folder kept."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    folders = {name: tmp_path / name for name in ("kept", "outer", "sockets")}
    for folder in folders.values():
        folder.mkdir()
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, signal, subprocess, sys, time\n"
            "from pipeline.engines.vllm_process import stopped_if_this_process_dies as watched\n"
            f"with watched(leftovers=[{str(folders['kept'])!r}]):\n"
            "    kept = subprocess.Popen(['/bin/sleep', '600'])\n"
            f"with watched(leftovers=[{str(folders['outer'])!r}]), watched(leftovers=[{str(folders['sockets'])!r}]):\n"
            f"    stubborn = subprocess.Popen([sys.executable, '-c', {stubborn!r}], env={{}})\n"
            "    time.sleep(1.5)  # the watchers look twice a second: both have noted it, the outer one the inner\n"
            "    server = subprocess.Popen(['/bin/sleep', '600'], start_new_session=True)\n"
            "    print(kept.pid, stubborn.pid, server.pid, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    kept, stubborn, server = (psutil.Process(int(pid)) for pid in starter.stdout.readline().split())
    try:
        starter.wait()

        def gone(process: psutil.Process) -> bool:
            return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE

        deadline = time.time() + 30  # the stubborn one is killed 10 s after it ignored SIGTERM, then folders go
        while time.time() < deadline and (not gone(server) or folders["outer"].exists() or folders["sockets"].exists()):
            time.sleep(0.1)
        assert gone(server) and gone(stubborn) and not gone(kept)
        assert not folders["outer"].exists() and not folders["sockets"].exists() and folders["kept"].exists()
    finally:
        for process in (kept, stubborn, server):
            if process.is_running():
                process.kill()


def test_transformers_engine_matches_shapes_and_stops_at_max_tokens(tiny_model, capsys):
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
    capsys.readouterr()
    batched = engine.generate(CONVERSATIONS, greedy, progress="benchmark teacher")[3].completions[0].text
    assert "benchmark teacher: 100%" in capsys.readouterr().err
    alone = engine.generate([CONVERSATIONS[3]], greedy, progress=False)[0].completions[0].text
    assert batched == alone


def test_transformers_engine_constrains_answers_to_the_choices(tiny_model):
    engine = load_engine(str(tiny_model), EngineConfig(backend="transformers", batch_size=2), seed=0)
    sampled = engine.generate(CONVERSATIONS, SamplingConfig(n=3, temperature=1.0, seed=1, choices=LABELS), False)
    assert_every_answer_is_a_label(sampled)
    free = engine.generate(CONVERSATIONS, SamplingConfig(n=3, temperature=1.0, seed=1, max_tokens=8), False)
    assert not {c.text.strip() for g in free for c in g.completions} <= set(LABELS)  # the constraint did it


def test_more_gpus_than_present_is_a_one_line_error():
    config = EngineConfig(backend="vllm", tensor_parallel_size=2, pipeline_parallel_size=2)
    with pytest.raises(PipelineError, match=r"engine.tensor_parallel_size: 2 x pipeline_parallel_size 2 needs 4 GPUs"):
        load_engine("any-model", config, seed=0)


def test_transformers_engine_cuts_at_stop_strings_and_refuses_logprobs(tiny_model):
    engine = load_engine(str(tiny_model), EngineConfig(backend="transformers"), seed=0)
    greedy = SamplingConfig(max_tokens=12)
    (free,) = engine.generate(CONVERSATIONS[:1], greedy, progress=False)
    text = free.completions[0].text
    stop = text[len(text) // 2 :][:3]  # a piece of what it will say anyway
    assert stop.strip(), text
    (stopped,) = engine.generate(CONVERSATIONS[:1], greedy.model_copy(update={"stop": [stop]}), progress=False)
    assert stopped.completions[0].text == text[: text.find(stop)]
    assert stopped.completions[0].finish_reason == "stop"
    with pytest.raises(PipelineError, match="sampling.logprobs: not supported by the transformers backend"):
        engine.generate(CONVERSATIONS[:1], SamplingConfig(logprobs=2), progress=False)


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["vllm", "transformers"])
@pytest.mark.parametrize("student", ["ping_pong_base_student", "ping_pong_qwen_like_student"])
def test_unmerged_adapter_serves_what_the_merged_weights_serve(request, backend, student):
    """Base + unmerged LoRA adapter (vLLM `enable_lora`) answers as the merged weights do, and unlike the base:
    the adapter is really applied. The base's own answer is read once, on the transformers engine (a third vLLM
    engine would add a minute on this CPU to learn what the weights, not the engine, decide). Students tuned from
    a base model without a chat template (the engines prompt it with the one it trained on), and from one whose
    EOS is not its template's end of turn (Qwen2.5 base): served on the base's own files, whose stop tokens lack
    `<|im_end|>`, it stops there all the same (chat_templates.stop_token_ids). All three prompt a student tuned from a
    base model in the plain chat format, so the probe shows both students the same worked examples."""
    base, adapter, merged = request.getfixturevalue(student)
    prompts = [ping(3), ping(11)]
    greedy = SamplingConfig(max_tokens=12)
    served = EngineConfig(backend=backend, max_model_len=512)
    answers, plain = {}, {}
    for name, model, lora, engine_config in (
        ("merged", merged, None, served),
        ("lora", base, adapter, served),
        ("base", base, None, EngineConfig(backend="transformers")),
    ):
        engine = load_engine(str(model), engine_config, seed=0, adapter=str(lora) if lora else None)
        try:
            answers[name] = [g.completions[0].text for g in engine.generate(prompts, greedy, progress=False)]
            plain[name] = prompted_in_plain_chat(engine)
        finally:
            engine.close()
    assert answers["lora"] == answers["merged"] == ["Pong.", "Pong."]
    assert answers["base"] != answers["merged"]
    assert set(plain.values()) == {student == "ping_pong_base_student"}


@pytest.mark.integration
def test_a_base_model_is_prompted_behind_the_bos_its_tokenizer_adds(tmp_path, base_tokenizer, bos_base_tokenizer):
    """The plain chat template of a base model leads with BOS where its tokenizer adds one to plain text (Gemma,
    Llama, Mistral): both engines tokenize the rendered chat without special tokens, so without it the model is
    prompted without the BOS it was pre-trained behind. One token more than the same chat for a tokenizer that adds
    none, on vLLM as on transformers (a BOS added twice would be two more)."""
    from tests.conftest import build_tiny_model

    greedy = SamplingConfig(max_tokens=2)
    prompt_tokens = {}
    for name, tokenizer, backend in (
        ("plain", base_tokenizer, "transformers"),
        ("bos", bos_base_tokenizer, "transformers"),
        ("bos", bos_base_tokenizer, "vllm"),
    ):
        model = build_tiny_model(tmp_path / name, tokenizer)
        engine = load_engine(str(model), EngineConfig(backend=backend, max_model_len=512, kv_cache_gb=0.25), seed=0)
        try:
            prompt_tokens[name, backend] = [g.prompt_tokens for g in engine.generate(CONVERSATIONS, greedy, False)]
        finally:
            engine.close()
    with_bos = [n + 1 for n in prompt_tokens["plain", "transformers"]]
    assert prompt_tokens["bos", "transformers"] == prompt_tokens["bos", "vllm"] == with_bos, prompt_tokens


def test_transformers_engine_generates_without_cudnn_attention_on_cuda(monkeypatch, tiny_model):
    """cuDNN attention plans every new key length, so a generated request paid it at each decode step (H200: 1.8-3.3
    s against 0.55 s). No GPU here: the context is told the device is CUDA; its flags are global, in CPU torch too."""
    import torch

    from pipeline import hardware
    from pipeline.engines import transformers_engine

    monkeypatch.setattr(
        transformers_engine, "attention_without_cudnn", lambda _device: hardware.attention_without_cudnn("cuda")
    )
    engine = load_engine(str(tiny_model), EngineConfig(backend="transformers"), seed=0)
    seen = []
    engine.lm.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    engine.generate(CONVERSATIONS[:2], SamplingConfig(max_tokens=4), progress=False)
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after
