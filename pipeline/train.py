"""Stage 3, train: supervised fine-tuning of the student with a LoRA adapter (TRL SFTTrainer + PEFT).

    distill train --config configs/smollm2_support.yaml

Each chat example becomes a conversational prompt/completion pair: the prompt is every message
before the last assistant turn, the completion is that turn. TRL then puts the loss on completion
tokens only, end-of-turn/EOS token included, whatever the student's chat template (no
`{% generation %}` markers needed), and padding is masked by position, so pad == EOS is harmless.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig, TrainConfig, resolved_dict
from pipeline.models import resolve_model
from pipeline.runs import PipelineError, Stage, log, read_jsonl, write_json
from pipeline.tracking import trainer_report_to

DATA_KEYS = "data_keys.json"  # a hash per training example, to measure how far the data moved


def _example_keys(path: Path) -> list[str]:
    return sorted(
        hashlib.blake2b(json.dumps(row["messages"]).encode(), digest_size=8).hexdigest() for row in read_jsonl(path)
    )


def data_moved(config: ExperimentConfig, stage: Stage) -> float | None:
    """Share of training examples added or removed since the last training with this same config and
    base model; None when that training does not exist (or anything but the data changed)."""
    manifest = stage.manifest()
    keys_file = stage.dir / DATA_KEYS
    if not manifest or not keys_file.is_file() or not all((stage.dir / rel).exists() for rel in manifest["outputs"]):
        return None
    # The manifest holds the resolved config it trained under: anything but the data changed, retrain.
    resolved = resolved_dict(config)
    if any(manifest["config"].get(key) != resolved[key] for key in ("seed", "student", "train")):
        return None
    before = set(json.loads(keys_file.read_text()))
    now = set(_example_keys(config.run_dir / "filter" / "train.jsonl"))
    return len(before ^ now) / max(len(before), 1)


def train_stage(config: ExperimentConfig) -> Stage:
    sections = {"seed": config.seed, "student": config.student.model_dump(), "train": config.train.model_dump()}
    data = config.run_dir / "filter"
    return Stage(config, "train", sections, inputs=[data / "train.jsonl", data / "val.jsonl"])


def to_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """Split a `{"messages": [...]}` row at its last assistant turn."""
    messages = row.get("messages")
    if not messages or messages[-1].get("role") != "assistant":
        raise PipelineError(f"training row {row.get('prompt_id', '?')}: messages must end with an assistant turn")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def load_split(path: Path) -> list[dict[str, Any]]:
    return [to_prompt_completion(row) for row in read_jsonl(path)]


def device_defaults(train: TrainConfig) -> dict[str, Any]:
    """Precision and memory options chosen by device unless the config sets them.

    On this 2-core CPU, TRL's GPU-minded defaults (bf16 + gradient checkpointing) made a 135M LoRA step
    take 68 s instead of 4.5 s.
    """
    import torch

    cuda = torch.cuda.is_available() and train.device != "cpu"
    if train.device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device: cuda requested but no CUDA device is visible")
    bf16 = train.bf16 if train.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    checkpointing = train.gradient_checkpointing if train.gradient_checkpointing is not None else cuda
    return {"use_cpu": not cuda, "bf16": bf16, "gradient_checkpointing": checkpointing}


def model_init_kwargs(train: TrainConfig) -> dict[str, Any]:
    """Loading options for the student: 4-bit NF4 weights for QLoRA (bitsandbytes, CUDA only)."""
    if train.method != "qlora":
        return {}
    import torch

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
    return {"quantization_config": quantization, "dtype": compute}


def build_trainer(
    config: ExperimentConfig, model_path: str, train_rows: list[dict], val_rows: list[dict], output_dir: Path
):
    """The SFTTrainer for a run; separate from `run_train` so tests can inspect its batches."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    train = config.train
    has_val = bool(val_rows)
    args = SFTConfig(
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        max_length=train.max_length,
        warmup_steps=train.warmup_ratio,
        lr_scheduler_type=train.lr_scheduler_type,
        logging_steps=train.logging_steps,
        # Checkpoints for resuming; with a val split, validation at each one and the best kept.
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
        model_init_kwargs=model_init_kwargs(train) or None,
        seed=config.seed,
        data_seed=config.seed,
        report_to=trainer_report_to(config),
        run_name=f"{config.run_name}-train",
        dataloader_num_workers=0,
        **device_defaults(train),
    )
    lora = None
    if train.method != "full":
        lora = LoraConfig(
            r=train.lora.r,
            lora_alpha=train.lora.alpha,
            lora_dropout=train.lora.dropout,
            target_modules=train.lora.target_modules,
            task_type="CAUSAL_LM",
        )
    callbacks = []
    if train.early_stopping_patience is not None:
        if not has_val:
            raise PipelineError("train.early_stopping_patience: needs a val split (filter.val_fraction > 0)")
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
    return SFTTrainer(
        model=model_path,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if has_val else None,
        peft_config=lora,
        callbacks=callbacks,
    )


def run_train(config: ExperimentConfig, force: bool = False) -> Path:
    stage = train_stage(config)
    adapter_dir, merged_dir = stage.dir / "adapter", stage.dir / "merged"
    if not force and stage.is_fresh():
        log(f"train: skipped, inputs and config unchanged ({stage.dir})")
        return stage.dir
    if not force and config.train.retrain_min_change > 0:
        moved = data_moved(config, stage)
        if moved is not None and moved < config.train.retrain_min_change:
            log(
                f"train: skipped, the training data moved {moved:.1%} < train.retrain_min_change "
                f"{config.train.retrain_min_change:.1%}; keeping the adapter in {stage.dir}"
            )
            return stage.dir

    import torch
    from transformers import set_seed

    set_seed(config.seed)
    data = config.run_dir / "filter"
    train_rows, val_rows = load_split(data / "train.jsonl"), load_split(data / "val.jsonl")
    if not train_rows:
        raise PipelineError(f"{data / 'train.jsonl'}: no training examples")
    model_path = resolve_model(config.student.model)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    checkpoints = stage.dir / "checkpoints"
    stamp = checkpoints / "fingerprint"
    if force or not stamp.is_file() or stamp.read_text() != stage.fingerprint:
        shutil.rmtree(checkpoints, ignore_errors=True)  # from another config or data: not resumable
    checkpoints.mkdir(parents=True, exist_ok=True)
    stamp.write_text(stage.fingerprint)
    from transformers.trainer_utils import get_last_checkpoint

    resume = get_last_checkpoint(str(checkpoints))
    if resume:
        log(f"train: resuming from {Path(resume).name} (a killed run)")
    trainer = build_trainer(config, model_path, train_rows, val_rows, checkpoints)
    result = trainer.train(resume_from_checkpoint=resume)
    if val_rows:
        trainer.evaluate()  # the final model's val loss, in the log history
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    if losses and not all(math.isfinite(v) for v in losses):
        raise PipelineError("train: the loss became NaN/inf; lower train.learning_rate")

    tokenizer = trainer.processing_class
    outputs = []
    if config.train.method == "full":  # no adapter: the trained model is the tuned student
        shutil.rmtree(adapter_dir, ignore_errors=True)
        _save_atomic(
            lambda path: (
                trainer.model.save_pretrained(path, safe_serialization=True),
                tokenizer.save_pretrained(path),
            ),
            merged_dir,
        )
        outputs.append(merged_dir)
    else:
        _save_atomic(lambda path: (trainer.model.save_pretrained(path), tokenizer.save_pretrained(path)), adapter_dir)
        outputs.append(adapter_dir)
    if config.train.merge and config.train.method != "full":
        merged = _merged_student(trainer.model, config.train, model_path, adapter_dir)
        _save_atomic(
            lambda path: (
                merged.save_pretrained(path, safe_serialization=True),
                tokenizer.save_pretrained(path),
            ),
            merged_dir,
        )
        outputs.append(merged_dir)
    metrics = {
        "train_examples": len(train_rows),
        "val_examples": len(val_rows),
        "steps": result.global_step,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval_losses": eval_losses,
        "best_checkpoint": Path(trainer.state.best_model_checkpoint).name
        if trainer.state.best_model_checkpoint
        else None,
        "resumed_from": Path(resume).name if resume else None,
        "base_model": config.student.model,
    }
    write_json(stage.dir / "train_metrics.json", {**metrics, "log_history": trainer.state.log_history})
    write_json(stage.dir / DATA_KEYS, _example_keys(data / "train.jsonl"))
    shutil.rmtree(checkpoints, ignore_errors=True)  # done: the adapter is the output
    outputs += [stage.dir / "train_metrics.json", stage.dir / DATA_KEYS]
    stage.finish(outputs, metrics)
    log(
        f"train: {result.global_step} steps, loss {metrics['first_loss']} -> {metrics['last_loss']}; "
        f"adapter in {adapter_dir}"
    )
    _finish_wandb()
    return stage.dir


def _merged_student(model, train: TrainConfig, model_path: str, adapter_dir: Path):
    """The adapter folded into the base weights. QLoRA trained against 4-bit weights, but vLLM should serve
    full-precision ones: reload the base in its compute dtype and merge the saved adapter into that."""
    if train.method != "qlora":
        return model.merge_and_unload()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = model_init_kwargs(train)["dtype"]
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def _save_atomic(save, target: Path) -> None:
    import shutil

    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _finish_wandb() -> None:
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
