"""`vllm serve` started on a model with the options the offline engine gets (dtype, KV cache, chat template, stop
tokens), for the benchmark's load test and for anything else that needs a real OpenAI-compatible server here."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.chat_templates import add_end_of_turn_stop, chat_template_for
from pipeline.config import EngineConfig
from pipeline.console import PipelineError
from pipeline.engines.vllm_process import (
    RPC_BASE_ENV,
    adapter_rank,
    has_cuda,
    prepare_vllm_cpu_env,
    serve_env,
    stopped_if_this_process_dies,
    vllm_dtype_and_eager,
    vllm_kv_cache_bytes,
    vllm_rpc_folder,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def vllm_server(
    model: str,
    engine: EngineConfig,
    seed: int,
    adapters: dict[str, str] | None = None,
    timeout_s: float = 600,
    served_name: str = "base",
    api_key: str | None = None,
) -> Iterator[str]:
    """Serve `model` (as `served_name`) and any LoRA `adapters` ({served name: folder}) with `vllm serve`;
    yields the base URL and stops the server (its whole process group) on exit.

    Started as `python -m vllm.entrypoints.openai.api_server`: the `vllm` CLI wrapper fails under vllm-cpu.
    Its ZMQ socket files go in a folder removed with it (`vllm_rpc_folder`); its log is removed after a clean
    stop and kept (the error names it) when anything failed.
    """
    on_gpu = has_cuda()
    if not on_gpu:
        prepare_vllm_cpu_env()
    port = _free_port()
    server_log = tempfile.NamedTemporaryFile("w+", prefix="vllm-serve-", suffix=".log", delete=False)
    stopped_cleanly = False
    # The server runs in a session of its own, out of reach of this process's group: the watcher stops it.
    with vllm_rpc_folder() as rpc_folder, stopped_if_this_process_dies(leftovers=[rpc_folder]):
        command = _serve_command(model, engine, seed, port, adapters, served_name, api_key, on_gpu)
        command += _as_the_engines_serve_it(model, engine, Path(rpc_folder))
        process = subprocess.Popen(
            command,
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=serve_env(on_gpu) | {RPC_BASE_ENV: rpc_folder},
        )
        try:
            _wait_until_healthy(process, port, timeout_s, server_log.name)
            yield f"http://127.0.0.1:{port}/v1"
            stopped_cleanly = True
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            server_log.close()
            if stopped_cleanly:
                Path(server_log.name).unlink(missing_ok=True)


def _wait_until_healthy(process: subprocess.Popen, port: int, timeout_s: float, log_name: str) -> None:
    deadline = time.time() + timeout_s
    while True:
        if process.poll() is not None:
            tail = Path(log_name).read_text()[-1500:]
            raise PipelineError(f"benchmark.load_test: vllm serve exited ({log_name}):\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise PipelineError(f"benchmark.load_test: vllm serve not healthy after {timeout_s:.0f} s (see {log_name})")
        time.sleep(1)


def _as_the_engines_serve_it(model: str, engine: EngineConfig, folder: Path) -> list[str]:
    """`vllm serve` flags, with their files written into `folder`, for what the offline engines give `model` and
    its own files do not: a chat template (a base model's plain one, or engine.chat_template) and a stop at the
    template's end-of-turn token where its stop tokens lack it (chat_templates.add_end_of_turn_stop; the model's
    generation config with that token added, which is where vLLM reads the tokens it stops at)."""
    from transformers import AutoTokenizer, GenerationConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError):  # no model there: the server fails to start, and its log says so
        return []
    flags = []
    template = chat_template_for(tokenizer, engine.chat_template, model)
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
        flags += ["--chat-template", str(folder / "chat_template.jinja")]
    try:
        generation = GenerationConfig.from_pretrained(model)
    except OSError:  # the model has none
        generation = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    if add_end_of_turn_stop(generation, tokenizer, template):
        generation.save_pretrained(folder / "generation")
        flags += ["--generation-config", str(folder / "generation")]
    return flags


def _serve_command(
    model: str,
    engine: EngineConfig,
    seed: int,
    port: int,
    adapters: dict[str, str] | None,
    served_name: str,
    api_key: str | None,
    on_gpu: bool,
) -> list[str]:
    """`vllm serve`'s command line, with the engine options the offline engine gets."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    command += ["--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), "--seed", str(seed)]
    if api_key:
        command += ["--api-key", api_key]
    command += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    command += ["--tensor-parallel-size", str(engine.tensor_parallel_size)]
    if engine.max_model_len:
        command += ["--max-model-len", str(engine.max_model_len)]
    dtype, eager = vllm_dtype_and_eager(engine, on_gpu)
    command += ["--dtype", dtype]
    if eager:
        command += ["--enforce-eager"]
    kv_cache_bytes = vllm_kv_cache_bytes(engine, on_gpu)
    if kv_cache_bytes is not None:
        command += ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
    if not engine.enable_prefix_caching:
        command += ["--no-enable-prefix-caching"]
    if adapters:
        rank = max(adapter_rank(path) for path in adapters.values())
        command += ["--enable-lora", "--max-lora-rank", str(max(8, rank)), "--lora-modules"]
        command += [f"{name}={path}" for name, path in adapters.items()]
    return command
