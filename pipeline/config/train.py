"""`train`: how the student is fine-tuned, and the replay rows mixed into its data against forgetting."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import StrictModel


class LoraConfig(StrictModel):
    """The LoRA adapter (PEFT), for train.method lora and qlora."""

    r: int = Field(16, ge=1, description="The adapter's rank.")
    alpha: int = Field(32, ge=1, description="LoRA's scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | str = Field(
        "all-linear", description="The modules that get an adapter: names, or PEFT's 'all-linear'."
    )


class ReplayConfig(StrictModel):
    """General chat examples mixed into the training data, against forgetting: `fraction` of the training mix.

    `source`: "self", general prompts (`prompts`, default the shipped set) answered by the untuned student
    itself, so it keeps its own behaviour (self-distillation); "teacher", the same answered by the teacher; or
    "dataset", chats with their answers from `dataset` (a JSONL/JSON file of `{"messages": [...]}` rows, or a
    Hugging Face dataset id, read with `datasets`). Each row is screened (empty, truncated, repeated) and dropped
    when its user turn is a benchmark test prompt or a probe question, or shares an n-gram with one (always,
    whatever filter.decontaminate says)."""

    fraction: float = Field(0.0, ge=0, lt=1, description="Share of the training examples that are replay rows; 0: off.")
    source: Literal["self", "teacher", "dataset"] = Field(
        "self",
        description="Who answers the general prompts: the untuned student (self), the teacher, or a dataset of chats.",
    )
    prompts: str | None = Field(
        None,
        description='A JSONL file with a "prompt" per line; null: pipeline/filter/data/general_prompts.jsonl.',
    )
    max_tokens: int = Field(128, gt=0, description="Most tokens in an answer to a general prompt, answered greedily.")
    dataset: str | None = Field(
        None, description="With source dataset: a JSONL/JSON file of {messages: [...]} rows, or a Hugging Face id."
    )
    split: str = Field("train", description="The dataset's split (a Hugging Face dataset).")
    messages_column: str = Field("messages", description="The dataset's column that holds the chat.")

    @model_validator(mode="after")
    def _has_a_source(self) -> ReplayConfig:
        if self.source == "dataset" and not self.dataset:
            raise ValueError("dataset: source dataset needs a dataset of chats (a JSONL file or a Hugging Face id)")
        if self.source != "dataset" and self.dataset:
            raise ValueError(f"dataset: given with source {self.source!r}; set source: dataset to replay it")
        return self


class OnPolicyConfig(StrictModel):
    """On-policy distillation (pipeline/train/on_policy.py): the student samples answers to the training prompts,
    and the teacher's next-token distribution on those very tokens, under the teacher's prompt, is its target."""

    # GKD's beta; 1 is MiniLLM's reverse KL.
    beta: float = Field(
        1.0,
        ge=0,
        le=1,
        description="The divergence: 1 reverse KL(student || teacher), 0 forward KL, between the generalised JSD.",
    )
    max_completion_length: int = Field(64, ge=1, description="Tokens the student samples per prompt.")
    temperature: float = Field(1.0, gt=0, description="The student's sampling temperature.")
    top_k: int | None = Field(
        None,
        ge=1,
        description="Take the divergence over the student's top-k tokens, the teacher's probabilities renormalised on "
        "them; null: the whole vocabulary.",
    )
    # vLLM's server returns at most 20 log-probabilities a position unless started with a larger --max-logprobs.
    server_top_k: int = Field(
        20,
        ge=1,
        description="A teacher behind a server (teacher.engine.backend openai): the log-probabilities it returns per "
        "answer token; the rest of the vocabulary shares what they leave.",
    )
    # GKD's lmbda is the other share: the batches on the student's own samples.
    teacher_sample_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="The share of batches trained on the filter's kept teacher answers instead of the student's own "
        "samples, each scored by the teacher token by token all the same.",
    )
    # SFT first, then on-policy: the usual recipe. The teacher stays the base weights with the adapter disabled.
    init_adapter: str | None = Field(
        None,
        description="A LoRA adapter folder the student starts from, e.g. an SFT run's <run>/train/adapter; null: a "
        "new adapter.",
    )


class TrainConfig(StrictModel):
    """How the student is fine-tuned (TRL's SFTTrainer with PEFT, pipeline/train/)."""

    method: Literal["lora", "qlora", "full"] = Field(
        "lora",
        description="lora: an adapter on the full-precision student; qlora: the same on 4-bit NF4 weights (CUDA "
        "only); full: every weight.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The adapter, for method lora and qlora.")
    # Position ids restart at every example, so no example attends to another and each keeps the loss it has alone.
    packing: bool = Field(
        False, description="Pack examples into rows of max_length tokens (best-fit decreasing), padding-free."
    )
    # kd: (1 - kd_alpha) * cross-entropy + kd_alpha * T^2 * KL against the teacher's stored top-k logprobs
    # (pipeline/train/kd.py); on_policy: pipeline/train/on_policy.py.
    objective: Literal["sft", "kd", "on_policy"] = Field(
        "sft",
        description="sft: cross-entropy on the kept answers; kd: logit distillation on the teacher's top-k logprobs; "
        "on_policy: the teacher scores the student's own answers.",
    )
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig, description="Settings of objective on_policy.")
    kd_alpha: float = Field(0.5, ge=0, le=1, description="Objective kd: the weight of the KL term against CE.")
    kd_temperature: float = Field(1.0, gt=0, description="Objective kd: the softmax temperature T of both sides.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    num_train_epochs: float = Field(3.0, gt=0, description="Passes over the training data.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1: num_train_epochs decides.")
    per_device_train_batch_size: int = Field(8, ge=1, description="Examples (or packed rows) per device and step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Batches summed into one optimizer step.")
    # TRL cuts longer examples without a word; the train stage counts them and warns (max_length_overflow).
    max_length: int = Field(512, gt=0, description="Most tokens of one training example, chat template included.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps spent warming the rate up.")
    lr_scheduler_type: str = Field("cosine", description="The learning-rate schedule (transformers' names).")
    logging_steps: int = Field(5, ge=1, description="Log the loss every this many steps.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train; auto: CUDA when present.")
    # On CUDA with LoRA/QLoRA the frozen base weights are then loaded in bf16 and the adapter kept in fp32, under
    # autocast: what a hand-written loop does. bf16 is ~5x slower on a CPU.
    bf16: bool | None = Field(None, description="Train in bf16; null: on for CUDA with bf16 support, off on a CPU.")
    # Much slower (docs/measurements.md); a CUDA out-of-memory error names this key (and the batch size) as the fix.
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, slower."
    )
    # varlen (pipeline/train/attention.py): each packed example attends to itself, with PyTorch's FlashAttention
    # varlen kernel on CUDA; never a mask over the whole packed row.
    attn_implementation: str | None = Field(
        None,
        description="sdpa, eager, varlen, flash_attention_2/3 (flash-attn) or a kernels-hub id such as "
        "kernels-community/flash-attn2; null: sdpa, or varlen when packing.",
    )
    # An extra pass over the vocabulary every step (pipeline/train/trainer.py, sft_trainer_class).
    token_metrics: bool = Field(
        False, description="Log TRL's per-step mean token accuracy and entropy; off: the loss alone."
    )
    # The head computes log-probabilities of the trained tokens in tiles, never the batch x length x vocab logits;
    # it saves memory and its syncs cost a little speed (pipeline/train/options.fused_head_wanted).
    fused_lm_head: bool | None = Field(
        None,
        description="CUDA: TRL's fused LM head instead of the model's logits; null: on when a full batch's logits "
        "would take over an eighth of the GPU's memory.",
    )
    # Collation overlaps the step once nothing syncs; workers gained nothing beyond noise on a GPU and would take a
    # small CPU's cores from the step (docs/measurements.md).
    dataloader_workers: int = Field(
        0, ge=0, description="Processes that collate the next batches during the step; 0: in the training loop."
    )
    # Packed steps are bound by the GPU, where the kernels gain; unpacked, launching kernels bounds the step
    # (docs/measurements.md). TRL keeps its own fused LM head beside them.
    use_liger_kernel: bool | None = Field(
        None,
        description="Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE); null: on for packed LoRA and full SFT on "
        "CUDA when liger-kernel is installed; true without it: an error.",
    )
    torch_compile: bool = Field(
        False, description="torch.compile each decoder layer in place; the first steps pay the compilation."
    )
    merge: bool = Field(True, description="Also save merged weights that vLLM serves directly.")
    # With a val split, validation loss is computed at each checkpoint and the best one is loaded at the end.
    save_steps: int = Field(50, ge=1, description="Save a checkpoint every this many steps; a killed run resumes.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept, the newest.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validation checks without improvement; null: never."
    )
    # A changed base model or train config always retrains.
    retrain_min_change: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Scheduled runs: retrain only when at least this share of the training examples changed; 0: any.",
    )
    replay: ReplayConfig = Field(
        default_factory=ReplayConfig, description="General chats mixed into the training data, against forgetting."
    )

    @model_validator(mode="after")
    def _replay_with_sft(self) -> TrainConfig:
        if self.replay.fraction > 0 and self.objective == "kd":
            raise ValueError("replay: replay rows have no teacher logprobs; use objective sft with replay")
        return self

    @field_validator("attn_implementation")
    @classmethod
    def _attention(cls, value: str | None) -> str | None:
        known = ("sdpa", "eager", "varlen", "flash_attention_2", "flash_attention_3")
        if value is None or value in known or "/" in value:
            return value
        raise ValueError(f"use one of {', '.join(known)} or a kernels-hub id such as kernels-community/flash-attn2")
