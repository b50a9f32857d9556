"""The student's trainer: TRL's SFTTrainer with a PEFT LoRA adapter (or QLoRA, or every weight), or the KD trainer
for `train.objective: kd` (kd.py), with the options options.py chooses and the step savings of stage_trainer.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.chat_templates import add_end_of_turn_stop, chat_template_for, end_of_turn_id
from pipeline.config import ExperimentConfig, TrainConfig
from pipeline.console import PipelineError, log
from pipeline.tracking import trainer_report_to
from pipeline.train.kd import kd_trainer_class
from pipeline.train.on_policy import on_policy_trainer
from pipeline.train.options import (
    compile_repeated_blocks,
    device_defaults,
    fast_path_options,
    fused_head_wanted,
    liger_replaces_the_head,
    model_init_kwargs,
)
from pipeline.train.stage_trainer import StageTrainer, log_the_last_step_callback, throughput_callback


def sft_args(
    train: TrainConfig, seed: int, run_name: str, report_to: list[str], output_dir: Path, has_val: bool, device: dict
):
    """TRL's SFTConfig for a run: the train section, checkpoints for resuming (with a val split, validation at
    each one and the best kept), completion-only loss, the device's precision and memory options, and where the
    trainer logs (`report_to`, with the run's name)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        **schedule_args(train, seed, run_name, report_to),
        per_device_eval_batch_size=train.per_device_train_batch_size,
        max_length=train.max_length,
        eval_strategy="steps" if has_val else "no",
        eval_steps=train.save_steps,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        completion_only_loss=True,
        packing=train.packing,
        packing_strategy="bfd",  # padding-free: position ids restart per example
        model_init_kwargs=model_init_kwargs(train, device),
        dataloader_num_workers=train.dataloader_workers,
        ddp_find_unused_parameters=False,  # every LoRA / full weight gets a gradient each step
        **fast_path_options(train, device),
        **device,
    )


def schedule_args(train: TrainConfig, seed: int, run_name: str, report_to: list[str]) -> dict[str, Any]:
    """The training arguments every objective shares: optimiser schedule, batch, logging, checkpoints, seeds."""
    return {
        "learning_rate": train.learning_rate,
        "num_train_epochs": train.num_train_epochs,
        "max_steps": train.max_steps,
        "per_device_train_batch_size": train.per_device_train_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "warmup_steps": train.warmup_ratio,  # a value below 1 is a ratio of the total steps (transformers >= 5)
        "lr_scheduler_type": train.lr_scheduler_type,
        "logging_steps": train.logging_steps,
        "logging_first_step": True,  # and the last (log_the_last_step_callback): first and last loss for any length
        "logging_nan_inf_filter": False,  # its NaN check read the loss on the host every step; NaN is logged as NaN
        "save_strategy": "steps",
        "save_steps": train.save_steps,
        "save_total_limit": train.save_total_limit,
        "seed": seed,
        "data_seed": seed,
        "report_to": report_to,
        "run_name": f"{run_name}-train",
    }


def student_tokenizer(served_template: str | None, model_path: str) -> Any:
    """The student's tokenizer carrying the chat template it is served with, where that is not its own (a base
    model's plain one, or `served_template`, benchmark.engine.chat_template: see chat_templates.chat_template_for);
    None, for TRL to load the model's as it is. Saved with the adapter and the merged student, so vLLM serves them
    with it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    template = chat_template_for(tokenizer, served_template, model_path)
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
    if train.objective == "on_policy":
        trainer = on_policy_trainer(
            config,
            model_path,
            train_rows,
            output_dir,
            processing_class=student_tokenizer(config.benchmark.engine.chat_template, model_path),
            peft_config=lora,
            args={**schedule_args(train, config.seed, config.run_name, trainer_report_to(config)), **device},
        )
        trainer.callback_handler.callbacks.insert(0, throughput_callback())
        trainer.add_callback(log_the_last_step_callback())
        return trainer
    trainer = trainer_class(
        model=model_path,
        args=sft_args(train, config.seed, config.run_name, trainer_report_to(config), output_dir, has_val, device),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if has_val else None,
        processing_class=student_tokenizer(config.benchmark.engine.chat_template, model_path),
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


def sft_trainer_class():
    """TRL's SFTTrainer without its per-step token metrics, unless `train.token_metrics` asks for them.

    TRL scores every step's tokens through a fused LM head that also computes the entropy and top-1 accuracy over
    the vocabulary. Without them: on CUDA the same fused head computes only the log-probabilities of the trained
    tokens (no (batch x length x vocab) logits); elsewhere, where TRL's head would run in plain torch over every
    position twice, the model's own cross-entropy, as a hand-written loop computes it (docs/measurements.md, "The
    trainer's defaults")."""
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
