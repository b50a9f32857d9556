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
from pipeline.train.kd import KD_COLUMNS, attach_teacher_logprobs, check_same_tokenizer, kd_trainer_class

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
    inputs = [data / "train.jsonl", data / "val.jsonl"]
    if config.train.objective == "kd":
        sections["teacher"] = config.teacher.model
        inputs.append(teacher_outputs_path(config))  # the logprobs distilled from
    return Stage(config, "train", sections, inputs=inputs)


def teacher_outputs_path(config: ExperimentConfig) -> Path:
    return config.run_dir / "generate" / "teacher_outputs.jsonl"


def to_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """Split a `{"messages": [...]}` row at its last assistant turn (teacher logprobs for KD kept)."""
    messages = row.get("messages")
    if not messages or messages[-1].get("role") != "assistant":
        raise PipelineError(f"training row {row.get('prompt_id', '?')}: messages must end with an assistant turn")
    return {"prompt": messages[:-1], "completion": messages[-1:], **{k: row[k] for k in KD_COLUMNS if k in row}}


def load_splits(data: Path, teacher_outputs: Path | None = None) -> tuple[list[dict], list[dict]]:
    """train.jsonl and val.jsonl as prompt/completion rows; for KD, with the teacher's logprobs attached
    (one pass over the teacher outputs for both splits)."""
    train, val = list(read_jsonl(data / "train.jsonl")), list(read_jsonl(data / "val.jsonl"))
    if teacher_outputs is not None and train + val:
        attach_teacher_logprobs(train + val, teacher_outputs)  # in place
    return [to_prompt_completion(row) for row in train], [to_prompt_completion(row) for row in val]


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
        ddp_find_unused_parameters=False,  # every LoRA / full weight gets a gradient each step
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
    if train.packing and device_defaults(train)["use_cpu"]:
        log(
            "train: packing without FlashAttention (here: CPU) attends across the whole packed row; measured "
            "0.42x the unpacked tokens/s on a 2-core CPU (scripts/bench_train.py). It pays off on GPUs."
        )
    trainer_class, extra = SFTTrainer, {}
    if train.objective == "kd":
        if train.packing:
            raise PipelineError("train.objective: kd needs one example per row; set train.packing=false")
        trainer_class = kd_trainer_class()
        extra = {"kd_alpha": train.kd_alpha, "kd_temperature": train.kd_temperature}
    trainer = trainer_class(
        model=model_path,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if has_val else None,
        peft_config=lora,
        callbacks=callbacks,
        **extra,
    )
    # First in line, so that the W&B callback logs what it adds.
    trainer.callback_handler.callbacks.insert(0, throughput_callback())
    return trainer


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
    model_path = resolve_model(config.student.model)
    logprobs = None
    if config.train.objective == "kd":
        check_same_tokenizer(resolve_model(config.teacher.model), model_path)
        logprobs = teacher_outputs_path(config)
    train_rows, val_rows = load_splits(data, logprobs)
    if not train_rows:
        raise PipelineError(f"{data / 'train.jsonl'}: no training examples")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    checkpoints = stage.dir / "checkpoints"
    trainer = build_trainer(config, model_path, train_rows, val_rows, checkpoints)
    main = trainer.is_world_process_zero()  # under `accelerate launch`, rank 0 owns the run directory
    stamp = checkpoints / "fingerprint"
    if main:
        if force or not stamp.is_file() or stamp.read_text() != stage.fingerprint:
            shutil.rmtree(checkpoints, ignore_errors=True)  # from another config or data: not resumable
        checkpoints.mkdir(parents=True, exist_ok=True)
        stamp.write_text(stage.fingerprint)
    trainer.accelerator.wait_for_everyone()
    from transformers.trainer_utils import get_last_checkpoint

    resume = get_last_checkpoint(str(checkpoints))
    if resume and main:
        log(f"train: resuming from {Path(resume).name} (a killed run)")
    result = trainer.train(resume_from_checkpoint=resume)
    if val_rows:
        trainer.evaluate()  # the final model's val loss, in the log history
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    if losses and not all(math.isfinite(v) for v in losses):
        raise PipelineError("train: the loss became NaN/inf; lower train.learning_rate")
    replicas = replica_digests(trainer)

    # Collective (FSDP and ZeRO-3 gather their shards to rank 0): every rank calls save_model.
    full = config.train.method == "full"
    saved = _save_atomic(trainer, merged_dir if full else adapter_dir)
    if not main:
        return stage.dir
    if full:  # no adapter: the trained model is the tuned student
        shutil.rmtree(adapter_dir, ignore_errors=True)
    elif config.train.merge:
        merged = _merged_student(config.train, model_path, adapter_dir)
        tmp = merged_dir.with_name(f".{merged_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(tmp, safe_serialization=True)
        trainer.processing_class.save_pretrained(tmp)
        shutil.rmtree(merged_dir, ignore_errors=True)
        tmp.rename(merged_dir)
    outputs = [saved] + ([merged_dir] if config.train.merge and not full else [])
    metrics = {
        "method": config.train.method,
        "objective": config.train.objective,
        "packing": config.train.packing,
        "processes": trainer.args.world_size,
        "replicas_identical": replicas is None or len(set(replicas)) == 1,
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
    write_json(
        stage.dir / "train_metrics.json",
        {**metrics, "replica_digests": replicas, "log_history": trainer.state.log_history},
    )
    if replicas and len(set(replicas)) > 1:
        raise PipelineError(f"train: the {len(replicas)} data-parallel replicas ended with different weights")
    write_json(stage.dir / DATA_KEYS, _example_keys(data / "train.jsonl"))
    shutil.rmtree(checkpoints, ignore_errors=True)  # done: the adapter is the output
    outputs += [stage.dir / "train_metrics.json", stage.dir / DATA_KEYS]
    stage.finish(outputs, metrics)
    _log_student_artifact(config, stage, *student_artifact_paths(stage.dir))
    log(f"train: {result.global_step} steps, loss {metrics['first_loss']} -> {metrics['last_loss']}; saved {saved}")
    _finish_wandb()
    return stage.dir


def replica_digests(trainer) -> list[str] | None:
    """Under DDP, a hash of each rank's trainable weights, gathered to every rank (None otherwise).

    DDP keeps replicas identical by all-reducing gradients; a desync (a rank skipping a step, a non-
    deterministic module) would silently save rank 0's copy only. FSDP/ZeRO-3 shard weights: not compared.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    if not isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel):
        return None
    digest = hashlib.sha256()
    for name, param in sorted(trainer.model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest.hexdigest())
    return [str(d) for d in gathered]


def _merged_student(train: TrainConfig, model_path: str, adapter_dir: Path):
    """The saved adapter folded into freshly loaded base weights: what was saved is what gets served, and
    it works however training ran (QLoRA's 4-bit base merges into full-precision weights, sharded FSDP or
    ZeRO-3 models need no gathering here)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = model_init_kwargs(train)["dtype"] if train.method == "qlora" else "auto"
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def _save_atomic(trainer, target: Path) -> Path:
    """`trainer.save_model` (adapter or full weights, plus the tokenizer) into a temporary folder, renamed."""
    tmp = target.with_name(f".{target.name}.tmp")
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def student_artifact_paths(train_dir: Path) -> list[Path]:
    """What the student Artifact holds: the adapter (the full weights when there is none) and the metrics."""
    adapter = train_dir / "adapter"
    return [adapter if adapter.is_dir() else train_dir / "merged", train_dir / "train_metrics.json"]


def _log_student_artifact(config: ExperimentConfig, stage: Stage, *paths: Path) -> None:
    """The adapter (or, for full fine-tuning, the whole model) as a W&B Artifact, into the trainer's run."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        from pipeline.tracking import WandbTracker

        WandbTracker(wandb.run).artifact(config, "train", stage.fingerprint, list(paths))


def _finish_wandb() -> None:
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
