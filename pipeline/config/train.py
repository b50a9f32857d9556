"""`train`: how the student is fine-tuned, and the replay rows mixed into its data against forgetting."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import StrictModel


class LoraConfig(StrictModel):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class ReplayConfig(StrictModel):
    """General chat examples mixed into the training data, against forgetting: `fraction` of the training mix.

    `source`: "self", general prompts (`prompts`, default the shipped set) answered by the untuned student
    itself, so it keeps its own behaviour (self-distillation); "teacher", the same answered by the teacher; or
    "dataset", chats with their answers from `dataset` (a JSONL/JSON file of `{"messages": [...]}` rows, or a
    Hugging Face dataset id, read with `datasets`). Each row is screened (empty, truncated, repeated) and dropped
    when its user turn is a benchmark test prompt or a probe question, or shares an n-gram with one (always,
    whatever filter.decontaminate says)."""

    fraction: float = Field(0.0, ge=0, lt=1)  # share of the training examples that are replay rows; 0: off
    source: Literal["self", "teacher", "dataset"] = "self"
    prompts: str | None = None  # JSONL with a "prompt" per line; None: pipeline/filter/data/general_prompts.jsonl
    max_tokens: int = Field(128, gt=0)  # answers to the prompts, greedy
    dataset: str | None = None
    split: str = "train"
    messages_column: str = "messages"

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

    # The divergence: 1 is reverse KL(student || teacher) (MiniLLM, GKD's beta), 0 forward KL, between the
    # generalised Jensen-Shannon divergence.
    beta: float = Field(1.0, ge=0, le=1)
    max_completion_length: int = Field(64, ge=1)  # tokens the student samples per prompt
    temperature: float = Field(1.0, gt=0)  # the student's sampling temperature
    # The divergence over the student's top_k tokens, the teacher's probabilities renormalised on them; None: over
    # the whole vocabulary.
    top_k: int | None = Field(None, ge=1)


class TrainConfig(StrictModel):
    # lora: a LoRA adapter on the full-precision student; qlora: the same on 4-bit NF4 weights (bitsandbytes,
    # CUDA only); full: every weight trained (no adapter; the saved model is the tuned student).
    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    # Pack several examples into each row of `max_length` tokens (best-fit decreasing), padding-free: position
    # ids restart at every example, so no example attends to another and each keeps the loss it has alone.
    packing: bool = False
    # sft: cross-entropy on the teacher's kept answers. kd: logit distillation, (1 - kd_alpha) * cross-entropy +
    # kd_alpha * T^2 * KL against the teacher's top-k logprobs that generate stored (teacher.sampling.logprobs);
    # teacher and student must share a tokenizer (pipeline/train/kd.py).
    # on_policy: the student answers the training prompts itself, and the teacher, shown its own prompt, scores
    # every token of those answers (`on_policy`).
    objective: Literal["sft", "kd", "on_policy"] = "sft"
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)
    kd_alpha: float = Field(0.5, ge=0, le=1)
    kd_temperature: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    num_train_epochs: float = Field(3.0, gt=0)
    max_steps: int = -1
    per_device_train_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(512, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler_type: str = "cosine"
    logging_steps: int = Field(5, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # None: chosen by device (on for CUDA with bf16 support, off on CPU). On CUDA with LoRA/QLoRA the frozen base
    # weights are then loaded in bf16 and the adapter kept in fp32, under autocast: what a hand-written loop does.
    bf16: bool | None = None
    # Recompute activations in the backward pass: less memory, much slower (docs/measurements.md). Off; a CUDA
    # out-of-memory error names this key (and the batch size) as the fix.
    gradient_checkpointing: bool = False
    # None: "sdpa", or "varlen" when packing (pipeline/train/attention.py: each packed example attends to itself,
    # with PyTorch's FlashAttention varlen kernel on CUDA; never a mask over the whole packed row). Also "eager",
    # "flash_attention_2"/"flash_attention_3" (the flash-attn package), or a kernels-hub id such as
    # "kernels-community/flash-attn2" (the kernels package).
    attn_implementation: str | None = None
    # TRL's per-step mean token accuracy and entropy in the logs: an extra pass over the vocabulary every step
    # (pipeline/train/trainer.py, sft_trainer_class). Off: the loss alone.
    token_metrics: bool = False
    # CUDA: TRL's fused LM head (log-probabilities of the trained tokens in tiles, never the batch x length x vocab
    # logits: less memory) or, when false, the model's own logits and cross-entropy. Elsewhere always the latter.
    # Unset: on when a full batch's logits would take more than an eighth of the GPU's memory: the head saves
    # memory, and its syncs cost a little speed (pipeline/train/options.fused_head_wanted).
    fused_lm_head: bool | None = None
    # Processes that collate the next batches while the device trains on this one. 0: collation in the training
    # loop, where it overlaps the step once nothing syncs; workers gained nothing beyond noise on a GPU and would
    # take a small CPU's cores from the step (docs/measurements.md).
    dataloader_workers: int = Field(0, ge=0)
    # Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE; TRL keeps its own fused LM head beside them; the
    # liger-kernel package, which scripts/setup.sh installs on a GPU node). Unset: on for packed LoRA and full SFT
    # on CUDA when installed, where the GPU bounds the step and they gain; off unpacked, where launching kernels
    # bounds it (docs/measurements.md), and for QLoRA, KD and without CUDA. true without the package: an error.
    use_liger_kernel: bool | None = None
    torch_compile: bool = False  # torch.compile each decoder layer in place (the first steps pay the compilation)
    merge: bool = True  # also save merged weights that vLLM serves directly
    # Checkpoints every `save_steps` steps (the last `save_total_limit` kept): a killed training resumes from
    # the newest. With a val split, validation loss is computed at each checkpoint and the best one is kept
    # (loaded at the end); `early_stopping_patience` stops after that many checks without improvement.
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)
    # Scheduled runs: retrain only when at least this fraction of training examples was added or removed
    # since the adapter was trained (0: on any change). A changed base model or train config always retrains.
    retrain_min_change: float = Field(0.0, ge=0, le=1)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)

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
