"""The trainer's options as the device and the config decide them: precision, attention kernel, quantisation,
Liger kernels, TRL's fused LM head, compiled layers; and the modeling code Liger patches, put back after training.
Each default's measurements: docs/measurements.md, "Each default, as it was measured"."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from pipeline.config import TrainConfig
from pipeline.console import PipelineError
from pipeline.train.attention import register as register_varlen


def device_defaults(train: TrainConfig) -> dict[str, Any]:
    """Precision and memory options chosen by device unless the config sets them: TRL's GPU-minded defaults (bf16,
    gradient checkpointing) make a CPU step ~15x slower, and checkpointing costs a GPU ~40% of its speed."""
    import torch

    cuda = torch.cuda.is_available() and train.device != "cpu"
    if train.device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device: cuda requested but no CUDA device is visible")
    bf16 = train.bf16 if train.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    options = {"use_cpu": not cuda, "bf16": bf16, "gradient_checkpointing": train.gradient_checkpointing}
    if cuda:  # batches copied from pinned memory without waiting for the GPU (see TokenCounter)
        options["accelerator_config"] = {"non_blocking": True}
    return options


def attention_implementation(train: TrainConfig) -> str:
    """The attention kernel: `train.attn_implementation`, else varlen for packed rows and sdpa otherwise; a
    missing package or a packed row through a dense mask is a one-line error."""
    name = train.attn_implementation or ("varlen" if train.packing else "sdpa")
    needs = "flash_attn" if name.startswith("flash_attention") else "kernels" if "/" in name else None
    if needs:
        require(needs, f"train.attn_implementation: {name}")
    if train.packing and name in ("sdpa", "eager"):
        raise PipelineError(
            f"train.packing: attn_implementation {name} would attend through one mask over the whole packed row "
            "(batch x max_length squared; 13.8 GiB for 16k tokens); leave train.attn_implementation unset (varlen)"
        )
    if name == "varlen":
        register_varlen()
    return name


def model_init_kwargs(train: TrainConfig, device: dict[str, Any] | None = None) -> dict[str, Any]:
    """Loading options for the student: the attention kernel; the frozen base in bf16 for a bf16 LoRA run (the
    adapter stays fp32: PEFT upcasts it); 4-bit NF4 weights for QLoRA (bitsandbytes, CUDA only)."""
    import torch

    kwargs: dict[str, Any] = {"attn_implementation": attention_implementation(train)}
    if train.method == "lora" and device and device["bf16"]:
        kwargs["dtype"] = torch.bfloat16
    if train.method != "qlora":
        return kwargs
    if train.device == "cpu" or not torch.cuda.is_available():
        raise PipelineError("train.method: qlora needs a CUDA GPU (bitsandbytes 4-bit); use lora on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PipelineError("train.method: qlora needs bitsandbytes (pip install bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,  # FSDP shards the 4-bit weights only when storage matches compute
    )
    return {**kwargs, "quantization_config": quantization, "dtype": compute}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str, what: str) -> None:
    """A one-line error naming the key (`what`) when an optional package is not installed."""
    if not installed(module):
        package = module.replace("_", "-")
        raise PipelineError(f"{what} needs the {package} package (pip install {package})")


def fast_path_options(train: TrainConfig, device: dict[str, Any]) -> dict[str, Any]:
    """Liger kernels (`train.use_liger_kernel`); a missing package is a one-line error. Unset: on where it was
    measured to pay and is installed: LoRA or full SFT on CUDA, packed. Packed steps are bound by the GPU, where its
    fused kernels gain; unpacked steps of short examples are bound by the host launching kernels, where they did
    not (docs/measurements.md, "Each default, as it was measured")."""
    liger = train.use_liger_kernel
    if liger:
        require("liger_kernel", "train.use_liger_kernel:")
    elif liger is None:
        liger = (
            not device["use_cpu"]
            and train.packing
            and train.method != "qlora"
            and train.objective == "sft"
            and installed("liger_kernel")
        )
    return {"use_liger_kernel": liger}


def liger_replaces_the_head(args: Any) -> bool:
    """Whether Liger's fused linear cross-entropy replaces the model's forward (and so the LM head) in this run.
    TRL 1.16 applies only Liger's layer kernels (RMSNorm, RoPE, SwiGLU): it sets the config's
    `fused_linear_cross_entropy` to False to keep its own fused head, which must then stay on: without either, a
    run with Liger materialises the (tokens x vocabulary) logits."""
    config = args.liger_kernel_config or {}
    return bool(args.use_liger_kernel) and bool(config.get("fused_linear_cross_entropy", True))


# Bytes a full batch's logits take in the model's own loss: bf16 logits, their fp32 copy for the cross-entropy and
# its fp32 gradient (an estimate under the peak measured: docs/measurements.md, "The trainer's defaults").
LOGIT_BYTES = 10


# The fused head goes on when those logits would take more than this share of the GPU's memory.
FUSED_HEAD_MEMORY_SHARE = 1 / 8


def fused_head_wanted(train: TrainConfig, vocab_size: int, gpu_memory_bytes: int) -> bool:
    """Whether a CUDA run scores its tokens through TRL's fused LM head: `train.fused_lm_head`, or unset, when the
    logits of a full batch (per_device_train_batch_size x max_length x vocabulary) would take more than an eighth of
    the GPU's memory. The head's gain is memory; its cost is two host-device syncs a step, which stall the CPU's
    launches where a step's GPU time is close to its CPU time (docs/measurements.md, "Each default, as it was
    measured")."""
    if train.fused_lm_head is not None:
        return train.fused_lm_head
    logits = train.per_device_train_batch_size * train.max_length * vocab_size * LOGIT_BYTES
    return logits > gpu_memory_bytes * FUSED_HEAD_MEMORY_SHARE


def compile_repeated_blocks(model: Any) -> int:
    """`train.torch_compile`: each block of the model's repeated stack (its decoder layers) compiled in place, one
    compilation serving them all (regional compilation; torchtune compiles per layer too). Transformers' own option
    compiles the whole model, its first steps several times slower to compile; Accelerate's regional option
    compiles a copy of the model, which TRL's patched forward never calls (docs/measurements.md,
    "`train.torch_compile`"). Returns how many modules were compiled."""
    import torch

    stacks = [
        module
        for module in model.modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(b) for b in module}) == 1
    ]
    inside = {id(m) for stack in stacks for block in stack for m in block.modules()}
    blocks = [block for stack in stacks if id(stack) not in inside for block in stack]  # not an MoE's experts too
    targets = blocks or [model]  # a model without a repeated stack is compiled whole
    for target in targets:
        target.compile()
    return len(targets)


@contextmanager
def module_restored(module: ModuleType | None) -> Iterator[None]:
    """The module's attributes as they were on entry, put back on exit (None: nothing to restore)."""
    before = dict(vars(module)) if module is not None else {}
    try:
        yield
    finally:
        for name, value in before.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)


def model_family_module(model_path: str) -> ModuleType | None:
    """The transformers module that defines the model's causal-LM class (`modeling_llama` for a Llama), imported;
    None for a model transformers does not map (remote code)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(model_path))]
    except (KeyError, ValueError):
        return None
    return sys.modules[model_class.__module__]


def model_code_restored(model_path: str):
    """Liger kernels patch the student's modeling module for the whole process, not only the model they train: its
    RoPE function and its RMSNorm and MLP classes become Triton kernels. A later model of that family in the same
    process would run them: the benchmark's transformers engine after `distill run`'s train stage, measured on code
    a user does not serve, or a model on the CPU, which fails inside Triton. The stage trains inside this, and the
    module is as it was once training is done."""
    return module_restored(model_family_module(model_path))


def speed_options(trainer: Any) -> dict[str, bool]:
    """The speed options as a built trainer resolved them (unset keys are chosen by device, packing and size): what
    train_metrics.json and scripts/bench_train.py record."""
    return {
        "bf16": bool(trainer.args.bf16),
        "fused_lm_head": bool(getattr(trainer, "fused_head", False)),  # a KD trainer has none
        "liger_kernels": bool(trainer.args.use_liger_kernel),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "torch_compile": bool(getattr(trainer, "compiled_modules", 0)),
    }
