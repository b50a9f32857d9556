"""The student's trainer: TRL's SFTTrainer with a PEFT LoRA adapter (or QLoRA, or every weight), its
precision and memory options chosen by device, and the KD trainer for `train.objective: kd`.

Each chat example becomes a conversational prompt/completion pair: the prompt is every message
before the last assistant turn, the completion is that turn. TRL then puts the loss on completion
tokens only, end-of-turn/EOS token included, whatever the student's chat template (no
`{% generation %}` markers needed), and padding is masked by position, so pad == EOS is harmless.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.chat_templates import add_end_of_turn_stop, chat_template_for, end_of_turn_id
from pipeline.config import ExperimentConfig, TrainConfig
from pipeline.console import PipelineError, log
from pipeline.files import read_jsonl
from pipeline.tracking import trainer_report_to
from pipeline.train.attention import register as register_varlen
from pipeline.train.kd import KD_COLUMNS, attach_teacher_logprobs, kd_trainer_class


def to_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """Split a `{"messages": [...]}` row at its last assistant turn (teacher logprobs for KD kept)."""
    messages = row.get("messages")
    if not messages or messages[-1].get("role") != "assistant":
        raise PipelineError(f"training row {row.get('prompt_id', '?')}: messages must end with an assistant turn")
    return {"prompt": messages[:-1], "completion": messages[-1:], **{k: row[k] for k in KD_COLUMNS if k in row}}


def load_splits(config: ExperimentConfig) -> tuple[list[dict], list[dict]]:
    """train.jsonl and val.jsonl as prompt/completion rows; for KD, with the teacher's logprobs attached
    (one pass over the teacher outputs for both splits)."""
    layout = config.layout
    train, val = list(read_jsonl(layout.train_data)), list(read_jsonl(layout.val_data))
    if config.train.objective == "kd" and train + val:
        attach_teacher_logprobs(train + val, layout.teacher_outputs)  # in place
    return [to_prompt_completion(row) for row in train], [to_prompt_completion(row) for row in val]


def device_defaults(train: TrainConfig) -> dict[str, Any]:
    """Precision and memory options chosen by device unless the config sets them.

    On this 2-core CPU, TRL's GPU-minded defaults (bf16 + gradient checkpointing) made a 135M LoRA step
    take 68 s instead of 4.5 s; on an H200, checkpointing cost ~40% (bench_train.py).
    """
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
    import importlib.util

    return importlib.util.find_spec(module) is not None


def require(module: str, what: str) -> None:
    """A one-line error naming the key (`what`) when an optional package is not installed."""
    if not installed(module):
        package = module.replace("_", "-")
        raise PipelineError(f"{what} needs the {package} package (pip install {package})")


def fast_path_options(train: TrainConfig, device: dict[str, Any]) -> dict[str, Any]:
    """Liger kernels (`train.use_liger_kernel`); a missing package is a one-line error. Unset: on where it was
    measured to pay and is installed: LoRA or full SFT on CUDA, packed. Packed steps are bound by the GPU, where its
    fused kernels gained (1.4B shape on an H200: 1.19 of the plain loop, MFU 23.3% against 19.6%); unpacked steps of
    short examples are bound by the host launching kernels, where it did not (0.81 and 0.89 against 0.99 without
    it, 1.4B; 0.96 on the 0.4B)."""
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


def compile_repeated_blocks(model: Any) -> int:
    """`train.torch_compile`: each block of the model's repeated stack (its decoder layers) compiled in place, one
    compilation serving them all (regional compilation; torchtune compiles per layer too). Transformers' own option
    compiles the whole model: SmolLM2-135M's first two steps on a 2-core CPU took 123 + 165 s unpacked and 31 + 11 s
    packed, against 17 + 21 s and 6 + 5 s this way, the steps after alike; on an H200 the 0.4B shape's first packed
    step had not compiled after ~150 s. Accelerate's regional option compiles a copy of the model, which TRL's
    patched forward never calls. Returns how many modules were compiled."""
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
    a user does not serve, or a model on the CPU, which fails inside Triton (seen on an H200, 2026-11-27). The stage
    trains inside this, and the module is as it was once training is done."""
    return module_restored(model_family_module(model_path))


def sft_args(config: ExperimentConfig, output_dir: Path, has_val: bool, device: dict[str, Any]):
    """TRL's SFTConfig for a run: the train section, checkpoints for resuming (with a val split, validation at
    each one and the best kept), completion-only loss, and the device's precision and memory options."""
    from trl import SFTConfig

    train = config.train
    return SFTConfig(
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        max_length=train.max_length,
        warmup_steps=train.warmup_ratio,  # a value below 1 is a ratio of the total steps (transformers >= 5)
        lr_scheduler_type=train.lr_scheduler_type,
        logging_steps=train.logging_steps,
        logging_first_step=True,  # and the last (log_the_last_step_callback): first and last loss for any length
        logging_nan_inf_filter=False,  # its NaN check read the loss on the host every step; a NaN is logged as NaN
        eval_strategy="steps" if has_val else "no",
        eval_steps=train.save_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        completion_only_loss=True,
        packing=train.packing,
        packing_strategy="bfd",  # padding-free: position ids restart per example
        model_init_kwargs=model_init_kwargs(train, device),
        seed=config.seed,
        data_seed=config.seed,
        report_to=trainer_report_to(config),
        run_name=f"{config.run_name}-train",
        dataloader_num_workers=train.dataloader_workers,
        ddp_find_unused_parameters=False,  # every LoRA / full weight gets a gradient each step
        **fast_path_options(train, device),
        **device,
    )


def student_tokenizer(config: ExperimentConfig, model_path: str) -> Any:
    """The student's tokenizer carrying the chat template it is served with, where that is not its own (a base
    model's plain one, or benchmark.engine.chat_template: see engines.chat_template_for); None, for TRL to load
    the model's as it is. Saved with the adapter and the merged student, so vLLM serves them with it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    template = chat_template_for(tokenizer, config.benchmark.engine.chat_template, model_path)
    if template is None:
        return None
    tokenizer.chat_template = template
    return tokenizer


def stop_at_end_of_turn(model: Any, tokenizer: Any) -> None:
    """Add the chat template's end-of-turn token to the stop tokens in the model's generation config (saved with
    the tuned student). A student whose EOS is not the token its template closes a turn with (Qwen2.5 base:
    `<|endoftext|>` against `<|im_end|>`) learns to emit the latter, and served from its folder never stops."""
    if add_end_of_turn_stop(model.generation_config, tokenizer):
        end = tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer))
        log(
            f"train: the chat template closes a turn with {end}, not the EOS token {tokenizer.eos_token}: the tuned "
            "student's generation_config.json stops at both"
        )


def build_trainer(
    config: ExperimentConfig, model_path: str, train_rows: list[dict], val_rows: list[dict], output_dir: Path
):
    """The SFTTrainer for a run; separate from `run_train` so tests can inspect its batches."""
    from datasets import Dataset
    from peft import LoraConfig

    train = config.train
    has_val = bool(val_rows)
    callbacks = []
    if train.early_stopping_patience is not None:
        if not has_val:
            raise PipelineError("train.early_stopping_patience: needs a val split (filter.val_fraction > 0)")
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
    trainer_class = sft_trainer_class()
    extra: dict[str, Any] = {"train": train}
    if train.objective == "kd":
        if train.packing:
            raise PipelineError("train.objective: kd needs one example per row; set train.packing=false")
        trainer_class = kd_trainer_class()
        extra = {"kd_alpha": train.kd_alpha, "kd_temperature": train.kd_temperature}
    device = device_defaults(train)
    lora = None
    if train.method != "full":
        lora = LoraConfig(
            r=train.lora.r,
            lora_alpha=train.lora.alpha,
            lora_dropout=train.lora.dropout,
            target_modules=train.lora.target_modules,
            task_type="CAUSAL_LM",
        )
    trainer = trainer_class(
        model=model_path,
        args=sft_args(config, output_dir, has_val, device),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if has_val else None,
        processing_class=student_tokenizer(config, model_path),
        peft_config=lora,
        callbacks=callbacks,
        **extra,
    )
    if len(trainer.train_dataset) == 0:  # TRL drops examples that truncation left without a completion token
        raise PipelineError(
            f"train.max_length: no training example keeps a completion token within {train.max_length} tokens "
            "(every prompt fills it); raise it"
        )
    trainer.compiled_modules = compile_repeated_blocks(trainer.model) if train.torch_compile else 0
    # First in line, so that the W&B callback logs what it adds.
    trainer.callback_handler.callbacks.insert(0, throughput_callback())
    trainer.add_callback(log_the_last_step_callback())
    return trainer


def max_length_overflow(tokenizer: Any, rows: list[dict[str, Any]], max_length: int) -> dict[str, int]:
    """What `train.max_length` does to the examples, which TRL does without a word: `over_max_length` examples are
    cut at it (their answer loses its end, end-of-turn token included, so the student is taught not to stop),
    `without_answer_token` of them keep no answer token at all (TRL drops them unpacked; packed, they train on
    nothing). Token counts as TRL makes them: the chat template of the prompt, and of prompt + completion."""
    if not rows:
        return {"over_max_length": 0, "without_answer_token": 0, "longest_tokens": 0}

    def lengths(conversations: list[list[dict[str, Any]]], **kwargs: Any) -> list[int]:
        texts = tokenizer.apply_chat_template(conversations, tokenize=False, **kwargs)
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    full = lengths([row["prompt"] + row["completion"] for row in rows])
    prompt = lengths([row["prompt"] for row in rows], add_generation_prompt=True)
    return {
        "over_max_length": sum(n > max_length for n in full),
        "without_answer_token": sum(n >= max_length for n in prompt),
        "longest_tokens": max(full),
    }


class AttentionWithoutCudnn:
    """Trains with `scaled_dot_product_attention` kept off cuDNN on CUDA (`hardware.attention_without_cudnn`):
    unpacked batches are padded to their longest example, so nearly every step brings a new length, and cuDNN
    builds a plan for each (forward and backward). On an H200 the hand-written loop of scripts/bench_train.py ran
    unpacked steps 1.8x (0.4B shape) and 2.3x (1.4B) faster without cuDNN; the stage, measured after that loop had
    planned the same lengths, 0.96x and 1.23x."""

    def train(self, *args: Any, **kwargs: Any) -> Any:
        from pipeline.hardware import attention_without_cudnn

        with attention_without_cudnn(self.args.device.type):
            return super().train(*args, **kwargs)


@contextmanager
def heap_frozen() -> Iterator[None]:
    """Python's objects alive now (the model, the libraries: ~0.5 million) moved out of the garbage collector's
    reach until the block ends, so that its full collections scan only what training allocates. Unfrozen, a full
    collection walked them all about every 100 steps: 288 ms at once, ~2.5 host-bound steps of ~110 ms on this CPU
    (scripts/bench_train.py --host-bound); under DDP one rank's pause stalls them all. Garbage is collected first;
    a caller's freeze is left as it was."""
    import gc

    frozen_before = gc.get_freeze_count() > 0
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:
            gc.unfreeze()


class HeapFrozen:
    """Trains inside `heap_frozen`."""

    def train(self, *args: Any, **kwargs: Any) -> Any:
        with heap_frozen():
            return super().train(*args, **kwargs)


class TokenCounter:
    """Counts the trained (non-padding) tokens of every rank, as TRL's `num_tokens`, without a host-device sync per
    step: the count stays on the device (a mask's sum) or in Python (a padding-free row's length) until the next
    log. TRL's own count, `int(...)` of a device tensor every step, stalled the CPU until the GPU caught up, so
    that the next batch was collated and sent while the GPU waited."""

    _uncounted: Any = None  # tokens of the training steps since the last log

    def count_tokens(self, inputs: dict[str, Any]) -> None:
        mask, positions = inputs.get("attention_mask"), inputs.get("position_ids")
        tokens = mask.sum() if mask is not None else positions.size(1)
        self._uncounted = tokens if self._uncounted is None else self._uncounted + tokens

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        import torch

        if self._uncounted is not None and self.model.training:  # an evaluation's log leaves them for the next
            uncounted, self._uncounted = self._uncounted, None
            if self.accelerator.num_processes > 1:  # every rank logs at the same steps: the gather is collective
                uncounted = self.accelerator.gather(torch.as_tensor(uncounted, device=self.accelerator.device)).sum()
            self._total_train_tokens += int(uncounted)
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        super().log(logs, start_time)


class ParametersCountedOnce:
    """Transformers' per-step FLOPs estimate (`total_flos`: 6 x input tokens x non-embedding parameters) with the
    parameters counted once: its `floating_point_ops` recounted them every step, walking every module and
    parameter of the model (2.6 ms a step for a 24-layer LoRA student on this CPU, spent while the GPU waits)."""

    _counted: tuple[int, int] | None = None  # (id of the model, its non-embedding parameters)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._counted is None or self._counted[0] != id(self.model):
            self._counted = (id(self.model), self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * self._counted[1]


@contextmanager
def housekeeping_on(model: Any, trained: list[Any]) -> Iterator[None]:
    """The model's `train()` a no-op while it is already in training mode, and its `zero_grad()` over the `trained`
    weights only, until exit (instance attributes over the class's methods). Transformers' loop calls both every step
    over the whole model. Mode changes go through the model itself (the trainer's `model.eval()` for an evaluation,
    then `model.train()`, which walks every module again), so a module left in eval mode below it is not expected."""
    model_class = type(model)

    def train(mode: bool = True) -> Any:
        return model if mode and model.training else model_class.train(model, mode)

    def zero_grad(set_to_none: bool = True) -> None:
        for parameter in trained:
            if parameter.grad is None:
                continue
            if set_to_none:
                parameter.grad = None
            else:
                parameter.grad.detach_().zero_()

    model.train, model.zero_grad = train, zero_grad
    try:
        yield
    finally:
        del model.train, model.zero_grad


class HousekeepingOnTrainable:
    """Transformers' per-step housekeeping over the weights that train, not the whole model: each step it put every
    module in training mode (2,333 modules for a 28-layer LoRA student, 4.2 ms on this CPU), set every parameter's
    gradient to None (646, 392 trained; 2.0 ms) and clipped the gradient norm through all of them (3.7 ms against
    1.0). An unpacked GPU step of short examples is bound by the host, so it paid all of that: on a CPU stand-in
    bound the same way (scripts/bench_train.py --host-bound), the stage ran 0.87 of the plain loop, 0.95-0.99 now."""

    _trained: tuple[int, list[Any]] | None = None  # (id of the model, its parameters that train)

    def trained_parameters(self) -> list[Any]:
        if self._trained is None or self._trained[0] != id(self.model):
            self._trained = (id(self.model), [p for p in self.model.parameters() if p.requires_grad])
        return self._trained[1]

    def train(self, *args: Any, **kwargs: Any) -> Any:
        with housekeeping_on(self.model, self.trained_parameters()):
            return super().train(*args, **kwargs)

    def _clip_grad_norm(self, model: Any) -> Any:
        if self.accelerator.distributed_type not in ("NO", "MULTI_CPU", "MULTI_GPU"):  # sharded gradients
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(self.trained_parameters(), self.args.max_grad_norm)


class StageTrainer(AttentionWithoutCudnn, HeapFrozen, HousekeepingOnTrainable, TokenCounter, ParametersCountedOnce):
    """What the stage adds to TRL's trainer, for SFT and KD alike: put before `SFTTrainer` in a class's bases."""


def liger_replaces_the_head(args: Any) -> bool:
    """Whether Liger's fused linear cross-entropy replaces the model's forward (and so the LM head) in this run.
    TRL 1.16 applies only Liger's layer kernels (RMSNorm, RoPE, SwiGLU): it sets the config's
    `fused_linear_cross_entropy` to False to keep its own fused head, which must then stay on. Without it, an
    H200 run with Liger materialised the (tokens x vocabulary) logits: 32.0 GiB peak against 28.7 without Liger
    (0.4B shape, packed, 16k tokens a step)."""
    config = args.liger_kernel_config or {}
    return bool(args.use_liger_kernel) and bool(config.get("fused_linear_cross_entropy", True))


# Bytes a full batch's logits take in the model's own loss: bf16 logits, their fp32 copy for the cross-entropy and
# its fp32 gradient. Measured on an H200 (0.4B shape, 49k vocabulary, 16k tokens a step): peak 37.6 GiB through the
# logits against 28.7 through TRL's fused head, where this estimate says 7.5 GiB.
LOGIT_BYTES = 10
# The fused head goes on when those logits would take more than this share of the GPU's memory.
FUSED_HEAD_MEMORY_SHARE = 1 / 8


def fused_head_wanted(train: TrainConfig, vocab_size: int, gpu_memory_bytes: int) -> bool:
    """Whether a CUDA run scores its tokens through TRL's fused LM head: `train.fused_lm_head`, or unset, when the
    logits of a full batch (per_device_train_batch_size x max_length x vocabulary) would take more than an eighth of
    the GPU's memory. The head's gain is memory (packed 0.4B shape on an H200: 23.9 GiB peak against 32.8); its
    cost is two host-device syncs a step, which stall the CPU's launches where a step's GPU time is close to its
    CPU time: packed, the stage without it ran 63.4k-64.0k tok/s in three turns against 59.3k and 61.4k with it
    (two runs, another H200, the same day); unpacked, no difference measured (0.95 against 0.96 of the plain
    loop). README, "Speed and precision"."""
    if train.fused_lm_head is not None:
        return train.fused_lm_head
    logits = train.per_device_train_batch_size * train.max_length * vocab_size * LOGIT_BYTES
    return logits > gpu_memory_bytes * FUSED_HEAD_MEMORY_SHARE


def sft_trainer_class():
    """TRL's SFTTrainer without its per-step token metrics, unless `train.token_metrics` asks for them.

    TRL scores every step's tokens through a fused LM head that also computes the entropy and top-1 accuracy over
    the vocabulary. Without them: on CUDA the same fused head computes only the log-probabilities of the trained
    tokens (no (batch x length x vocab) logits); elsewhere, where TRL's head would run in plain torch over every
    position twice, the model's own cross-entropy, as a hand-written loop computes it. cProfile of 3 steps of
    the 135M student on this CPU: TRL's head took 8.9 of 30 s."""
    from transformers import Trainer
    from trl import SFTTrainer
    from trl.trainer.utils import add_fused_lm_head

    class LeanSFTTrainer(StageTrainer, SFTTrainer):
        def __init__(self, *args: Any, train: TrainConfig, **kwargs: Any) -> None:
            import torch

            super().__init__(*args, **kwargs)
            self.token_metrics = train.token_metrics
            self.fused_head = False
            if self.args.device.type == "cuda" and not liger_replaces_the_head(self.args):
                memory = torch.cuda.get_device_properties(self.args.device).total_memory
                self.fused_head = fused_head_wanted(train, self.model.config.vocab_size, memory)
            if self.fused_head and not self.token_metrics:
                base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
                add_fused_lm_head(base, outputs=("log_probs",))  # wraps TRL's: the same head, fewer outputs

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.token_metrics:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            if self.fused_head:
                outputs = model(**inputs, fused_lm_head=True, num_items_in_batch=num_items_in_batch)
                loss = outputs.loss
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    loss = loss * self.accelerator.num_processes  # as TRL: DDP averages gradients across ranks
            else:
                loss, outputs = Trainer.compute_loss(self, model, inputs, True, num_items_in_batch)
            if model.training:
                self.count_tokens(inputs)
            return (loss, outputs) if return_outputs else loss

    return LeanSFTTrainer


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


def model_parameters(model: Any) -> int:
    """Parameters a token is multiplied by (4-bit weights counted unpacked; LoRA's included): all of them but an
    input embedding table that is not also the head (one row looked up per token, no FLOPs)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        total = int(model.get_nb_trainable_parameters()[1])
    else:
        total = sum(p.numel() for p in model.parameters())
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embeddings is not None and head is not None and embeddings.weight is not head.weight:
        total -= embeddings.weight.numel()
    return total


def throughput_metrics(trainer: Any, runtime_s: float, full: bool) -> dict[str, Any]:
    """Training tokens (prompt and completion, padding excluded) per second and, on a CUDA device the datasheet
    table knows, model FLOPs utilisation of each GPU against its dense bf16 peak (pipeline/hardware.py). The token
    count is every rank's (TRL gathers it), so a GPU's share is 1/world_size of it."""
    from pipeline.hardware import cuda_accelerator, mfu

    counts = [entry["num_tokens"] for entry in trainer.state.log_history if "num_tokens" in entry]
    tokens = int(counts[-1]) if counts else 0
    per_s = tokens / runtime_s if runtime_s > 0 else 0.0
    metrics: dict[str, Any] = {"train_tokens": tokens, "train_tokens_per_s": round(per_s, 1)}
    cuda = cuda_accelerator() if not trainer.args.use_cpu else None
    if cuda:
        name, accelerator = cuda
        metrics["accelerator"] = name
        if accelerator:
            per_gpu = per_s / trainer.args.world_size
            metrics["peak_tflops"] = accelerator.peak_tflops
            metrics["mfu"] = round(mfu(per_gpu, model_parameters(trainer.model), full, accelerator.peak_tflops), 4)
    return metrics


def log_the_last_step_callback():
    """Logs the last step's loss whatever `logging_steps` is (with `logging_first_step`, the first one too): a run
    shorter than `logging_steps` used to record no loss at all (`loss None -> None`)."""
    from transformers import TrainerCallback

    class LogTheLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True

    return LogTheLastStep()


def throughput_callback():
    """Adds training tokens/s (since the previous log) and, on CUDA, peak GPU memory to every log entry."""
    import time

    import torch
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        last: tuple[float, float] | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "num_tokens" not in logs:
                return
            now, tokens = time.perf_counter(), float(logs["num_tokens"])
            added = {}
            if self.last is not None and now > self.last[0] and tokens >= self.last[1]:
                added["tokens_per_s"] = (tokens - self.last[1]) / (now - self.last[0])
            self.last = (now, tokens)
            if torch.cuda.is_available():
                added["gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            logs.update(added)  # what the W&B callback, next in line, logs
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(added)  # the trainer copied `logs` there already

    return Throughput()
