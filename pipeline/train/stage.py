"""The train stage: supervised fine-tuning of the student with a LoRA adapter (TRL SFTTrainer + PEFT).

    distill train --config configs/smollm2_support.yaml

A killed training resumes from its newest checkpoint (stamped with the stage's fingerprint: checkpoints of
another config or data are not resumed). Under `accelerate launch`, every rank trains and saves (saving is
collective under FSDP and ZeRO-3); rank 0 alone merges, writes the metrics and the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig, TrainConfig, resolved_dict
from pipeline.console import PipelineError, log
from pipeline.files import read_jsonl, write_json
from pipeline.layout import read_filter_report
from pipeline.models import resolve_model
from pipeline.pruning import student_identity, student_model
from pipeline.runs import Stage
from pipeline.tasks import task_for
from pipeline.train.data import load_splits, max_length_overflow
from pipeline.train.kd import check_same_tokenizer
from pipeline.train.on_policy import check_on_policy, on_policy_rows, teacher_level, teacher_server
from pipeline.train.options import model_code_restored, model_init_kwargs, speed_options
from pipeline.train.stage_trainer import throughput_metrics
from pipeline.train.trainer import build_trainer, stop_at_end_of_turn


def train_stage(config: ExperimentConfig) -> Stage:
    sections = {"seed": config.seed, "student": config.student.model_dump(), "train": config.train.model_dump()}
    inputs = [config.layout.train_data, config.layout.val_data]
    if config.train.objective == "kd":
        sections["teacher"] = config.teacher.model
        inputs.append(config.layout.teacher_outputs)  # the logprobs distilled from
    if config.train.objective == "on_policy":  # the teacher scores under its own prompt, built from the task
        sections["teacher"] = {"model": config.teacher.model, "prompt_style": config.teacher.prompt_style}
        if teacher_server(config) is not None:  # the model it serves scores, under whatever name it is served
            sections["teacher"]["served_model"] = config.teacher.engine.server.model
        sections["task"] = config.task.model_dump()
        if config.train.on_policy.init_adapter:
            inputs.append(Path(config.train.on_policy.init_adapter))
    if config.benchmark.engine.chat_template is not None:  # the student trains with the template it is served with
        sections["chat_template"] = config.benchmark.engine.chat_template
    return Stage(config, "train", sections, inputs=inputs)


def run_train(config: ExperimentConfig, force: bool = False) -> Path:
    layout = config.layout
    with train_stage(config) as stage:
        if stage.skip(force) or (not force and _data_barely_moved(config, stage)):
            return stage.dir
        import torch
        from transformers import set_seed

        set_seed(config.seed)
        model_path = student_model(config)
        if config.train.objective == "kd":
            check_same_tokenizer(resolve_model(config.teacher.model), model_path)
        teacher_verified_rate = None
        if config.train.objective == "on_policy":
            check_on_policy(config, model_path)
            train_rows, val_rows = on_policy_rows(config, task_for(config), layout.train_data), []
            teacher_verified_rate, said = teacher_level(read_filter_report(layout))
            if said:
                log(said)
        else:
            train_rows, val_rows = load_splits(layout, config.train.objective)
        if not train_rows:
            raise PipelineError(f"{layout.train_data}: no training examples")
        torch.set_num_threads(max(1, torch.get_num_threads()))

        with model_code_restored(model_path):  # Liger's process-wide patches end with training
            trainer = build_trainer(config, model_path, train_rows, val_rows, layout.checkpoints)
            main = trainer.is_world_process_zero()  # under `accelerate launch`, rank 0 owns the run directory
            overflow = (
                max_length_overflow(trainer.processing_class, train_rows, config.train.max_length)
                if config.train.objective != "on_policy"  # no fixed answers: their lengths are sampled
                else {}
            )
            if overflow.get("over_max_length") and main:
                log(_overflow_warning(overflow, len(train_rows), config.train.max_length))
            resume = _last_checkpoint(trainer, stage, force)
            result = _train(trainer, config.train, resume)
            if val_rows:
                trainer.evaluate()  # the final model's val loss, in the log history
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        if losses and not all(math.isfinite(v) for v in losses):
            raise PipelineError("train: the loss became NaN/inf; lower train.learning_rate")
        replicas = replica_digests(trainer)
        outputs = _save_student(config, trainer, model_path)  # collective: every rank calls it
        if not main:
            return stage.dir

        metrics = _metrics(config, trainer, result, losses, len(train_rows), len(val_rows), replicas, resume)
        metrics["max_length_overflow"] = overflow
        if hasattr(trainer, "on_policy_totals"):  # the teacher's scored tokens, for the one-off cost
            totals = trainer.on_policy_totals
            steps = max(result.global_step, 1)
            metrics |= {**totals, "sampling_s_per_step": round(totals["sampling_s"] / steps, 3)}
            metrics |= {f"{kind}_batches": count for kind, count in trainer.on_policy_batches.items()}
            metrics["teacher_verified_rate"] = teacher_verified_rate  # the level on-policy distils toward
        log_history = trainer.state.log_history
        write_json(layout.train_metrics, {**metrics, "replica_digests": replicas, "log_history": log_history})
        if replicas and len(set(replicas)) > 1:
            raise PipelineError(f"train: the {len(replicas)} data-parallel replicas ended with different weights")
        write_json(layout.data_keys, example_keys(layout.train_data))
        shutil.rmtree(layout.checkpoints, ignore_errors=True)  # done: the adapter is the output
        outputs += [layout.train_metrics, layout.data_keys]
        # The trainer's W&B run (opened for TRL's callback) gets the manifest's student Artifact, and closes.
        speed = ("train_runtime_s", "train_tokens_per_s", "mfu", "peak_tflops", "first_loss", "last_loss")
        summary = {key: metrics[key] for key in speed if metrics.get(key) is not None}
        stage.finish(outputs, metrics, summary=summary, artifact=layout.student_artifact)
    log(
        f"train: {result.global_step} steps, loss {metrics['first_loss']} -> {metrics['last_loss']}; saved {outputs[0]}"
    )
    return stage.dir


def _overflow_warning(overflow: dict[str, int], examples: int, max_length: int) -> str:
    """One line for examples longer than train.max_length: how many, the longest, what it costs, the key."""
    dropped = overflow["without_answer_token"]
    lost = f"; {dropped} keep no answer token and train on nothing" if dropped else ""
    return (
        f"train: warning: train.max_length={max_length} cuts {overflow['over_max_length']} of {examples} training "
        f"examples (longest {overflow['longest_tokens']} tokens): their answers lose the end-of-turn token, which "
        f"teaches the student not to stop{lost}; raise train.max_length"
    )


def _train(trainer: Any, train: TrainConfig, resume: str | None) -> Any:
    """`trainer.train()`, a CUDA out-of-memory error turned into the keys that fix it."""
    import torch

    try:
        return trainer.train(resume_from_checkpoint=resume)
    except torch.OutOfMemoryError:
        fix = "set train.fused_lm_head=true, or " if not getattr(trainer, "fused_head", True) else ""
        fix += "set train.gradient_checkpointing=true, or " if not train.gradient_checkpointing else ""
        raise PipelineError(
            f"train: out of GPU memory at per_device_train_batch_size={train.per_device_train_batch_size}, "
            f"max_length={train.max_length}; {fix}lower train.per_device_train_batch_size (raise "
            "train.gradient_accumulation_steps to keep the batch)"
        ) from None


def _last_checkpoint(trainer: Any, stage: Stage, force: bool) -> str | None:
    """The newest checkpoint of a killed run of this same stage (fingerprint stamped beside the checkpoints);
    checkpoints from another config or data, or any when forced, are removed."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoints = stage.config.layout.checkpoints
    stamp = checkpoints / "fingerprint"
    if trainer.is_world_process_zero():
        if force or not stamp.is_file() or stamp.read_text() != stage.fingerprint:
            shutil.rmtree(checkpoints, ignore_errors=True)
        checkpoints.mkdir(parents=True, exist_ok=True)
        stamp.write_text(stage.fingerprint)
    trainer.accelerator.wait_for_everyone()
    resume = get_last_checkpoint(str(checkpoints))
    if resume and trainer.is_world_process_zero():
        log(f"train: resuming from {Path(resume).name} (a killed run)")
    return resume


def _save_student(config: ExperimentConfig, trainer: Any, model_path: str) -> list[Path]:
    """The adapter (or, for `train.method: full`, the whole tuned model as `merged/`) and, with `train.merge`,
    the adapter folded into the base weights: what vLLM serves. Returns the folders written."""
    layout, full = config.layout, config.train.method == "full"
    if full:
        stop_at_end_of_turn(trainer.model, trainer.processing_class)
    saved = _save_atomic(trainer, layout.merged if full else layout.adapter)
    if not trainer.is_world_process_zero():
        return [saved]
    if full:  # no adapter: the trained model is the tuned student
        shutil.rmtree(layout.adapter, ignore_errors=True)
        return [saved]
    if not config.train.merge:
        return [saved]
    merged = _merged_student(config.train, model_path, layout.adapter)
    stop_at_end_of_turn(merged, trainer.processing_class)
    tmp = layout.merged.with_name(f".{layout.merged.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    trainer.processing_class.save_pretrained(tmp)
    shutil.rmtree(layout.merged, ignore_errors=True)
    tmp.rename(layout.merged)
    return [saved, layout.merged]


def _metrics(
    config: ExperimentConfig,
    trainer: Any,
    result: Any,
    losses: list[float],
    train_examples: int,
    val_examples: int,
    replicas: list[str] | None,
    resume: str | None,
) -> dict[str, Any]:
    """What the manifest and train_metrics.json say about the training."""
    best = trainer.state.best_model_checkpoint
    runtime = result.metrics.get("train_runtime", 0.0)
    return {
        "method": config.train.method,
        "objective": config.train.objective,
        "packing": config.train.packing,
        "processes": trainer.args.world_size,
        "replicas_identical": replicas is None or len(set(replicas)) == 1,
        "train_examples": train_examples,
        "val_examples": val_examples,
        "steps": result.global_step,
        "train_runtime_s": round(runtime, 2),
        **speed_options(trainer),
        **throughput_metrics(trainer, runtime, config.train.method == "full", config.benchmark.hardware_profiles),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval_losses": [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry],
        "best_checkpoint": Path(best).name if best else None,
        "resumed_from": Path(resume).name if resume else None,
        "base_model": student_identity(config),
    }


def example_keys(path: Path) -> list[str]:
    """A short hash of each training example's messages, sorted: what `train.retrain_min_change` compares."""
    return sorted(
        hashlib.blake2b(json.dumps(row["messages"]).encode(), digest_size=8).hexdigest() for row in read_jsonl(path)
    )


def data_moved(config: ExperimentConfig, stage: Stage) -> float | None:
    """Share of training examples added or removed since the last training with this same config and
    base model; None when that training does not exist (or anything but the data changed)."""
    manifest = stage.manifest()
    keys_file = config.layout.data_keys
    if not manifest or not keys_file.is_file() or not all((stage.dir / rel).exists() for rel in manifest["outputs"]):
        return None
    # The manifest holds the resolved config it trained under: anything but the data changed, retrain.
    resolved = resolved_dict(config)
    if any(manifest["config"].get(key) != resolved[key] for key in ("seed", "student", "train")):
        return None
    before = set(json.loads(keys_file.read_text()))
    now = set(example_keys(config.layout.train_data))
    return len(before ^ now) / max(len(before), 1)


def barely_moved(config: ExperimentConfig, stage: Stage) -> float | None:
    """Scheduled runs keep the adapter when less than `train.retrain_min_change` of the data changed: the share
    that moved when it is kept, else None (`distill status` asks too)."""
    if config.train.retrain_min_change <= 0:
        return None
    moved = data_moved(config, stage)
    return moved if moved is not None and moved < config.train.retrain_min_change else None


def _data_barely_moved(config: ExperimentConfig, stage: Stage) -> bool:
    moved = barely_moved(config, stage)
    if moved is None:
        return False
    log(
        f"train: skipped, the training data moved {moved:.1%} < train.retrain_min_change "
        f"{config.train.retrain_min_change:.1%}; keeping the adapter in {stage.dir}"
    )
    return True


def replica_digests(trainer: Any) -> list[str] | None:
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


def _save_atomic(trainer: Any, target: Path) -> Path:
    """`trainer.save_model` (adapter or full weights, plus the tokenizer) into a temporary folder, renamed."""
    tmp = target.with_name(f".{target.name}.tmp")
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target
