"""Stage 2, filter: teacher outputs become JSONL chat examples; every dropped sample keeps its reason.

    distill filter --config configs/smollm2_support.yaml

The kept examples carry the *student's* prompt (context distillation: the teacher saw the full
prompt, the student learns to answer from the short one). Provenance sits beside `messages`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig
from pipeline.generate import OUTPUT as TEACHER_OUTPUTS
from pipeline.runs import PipelineError, Stage, log, read_jsonl, write_json, write_jsonl
from pipeline.tasks import Example, Task, build_task
from pipeline.tracking import start_tracking


def filter_stage(config: ExperimentConfig) -> Stage:
    sections = {
        "seed": config.seed,
        "task": config.task.model_dump(),
        "filter": config.filter.model_dump(),
        "student_prompt_style": config.student.prompt_style,
    }
    return Stage(config, "filter", sections, inputs=[config.run_dir / "generate" / TEACHER_OUTPUTS])


def _in_val(prompt_id: str, seed: int, fraction: float) -> bool:
    """Deterministic split by prompt id, so every sample of one prompt lands on the same side."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def judge_row(task: Task, row: dict[str, Any], config: ExperimentConfig) -> tuple[list[str], list[dict[str, Any]]]:
    """Return (kept completion texts, drop records) for one teacher row."""
    example = Example(row["prompt_id"], row["user"], row.get("reference", {}), row.get("category", ""))
    passing: list[str] = []
    drops: list[dict[str, Any]] = []
    for index, completion in enumerate(row["completions"]):
        text = completion["text"].strip()
        reason, detail = None, ""
        if not text:
            reason = "empty"
        elif completion.get("finish_reason") == "length" and config.filter.drop_truncated:
            reason, detail = "truncated", f"hit max_tokens after {completion.get('output_tokens')} tokens"
        elif config.filter.require_correct:
            failed = [rule for rule, ok in task.score(text, example).items() if not ok]
            if failed:
                reason, detail = "failed_check", ",".join(failed)
        if reason:
            drops.append(
                {"prompt_id": example.id, "sample_index": index, "reason": reason, "detail": detail, "text": text}
            )
        else:
            passing.append(text)
    agreement = len(passing) / max(1, len(row["completions"]))
    if passing and agreement < config.filter.min_agreement:
        detail = f"{len(passing)}/{len(row['completions'])} samples pass < {config.filter.min_agreement}"
        drops += [
            {"prompt_id": example.id, "sample_index": -1, "reason": "low_agreement", "detail": detail, "text": t}
            for t in passing
        ]
        passing = []
    kept = list(dict.fromkeys(passing))[: config.filter.max_samples_per_prompt]
    surplus = list(passing)
    for text in kept:
        surplus.remove(text)
    drops += [
        {
            "prompt_id": example.id,
            "sample_index": -1,
            "reason": "duplicate_or_surplus",
            "detail": f"max_samples_per_prompt={config.filter.max_samples_per_prompt}",
            "text": t,
        }
        for t in surplus
    ]
    return kept, drops


def run_filter(config: ExperimentConfig, force: bool = False) -> Path:
    stage = filter_stage(config)
    out_dir = stage.dir
    if not force and stage.is_fresh():
        log(f"filter: skipped, inputs and config unchanged ({out_dir})")
        return out_dir
    task = build_task(config.task.name, config.task.params, config.seed, config.base_dir)
    if config.student.prompt_style not in task.prompt_styles:
        raise PipelineError(f"student.prompt_style: {config.student.prompt_style!r} not in {task.prompt_styles}")

    train_rows, val_rows, drop_rows = [], [], []
    samples_in = 0
    categories_in: Counter[str] = Counter()
    categories_out: Counter[str] = Counter()
    for row in read_jsonl(config.run_dir / "generate" / TEACHER_OUTPUTS):
        samples_in += len(row["completions"])
        categories_in[row.get("category", "")] += 1
        kept, drops = judge_row(task, row, config)
        drop_rows += drops
        example = Example(row["prompt_id"], row["user"], row.get("reference", {}), row.get("category", ""))
        target = val_rows if _in_val(example.id, config.seed, config.filter.val_fraction) else train_rows
        for index, text in enumerate(kept):
            messages = [*task.messages(example, config.student.prompt_style), {"role": "assistant", "content": text}]
            target.append(
                {
                    "messages": messages,
                    "prompt_id": example.id,
                    "category": example.category,
                    "sample_index": index,
                    "teacher": row.get("teacher"),
                }
            )
        if kept:
            categories_out[example.category] += 1

    if not train_rows:
        raise PipelineError(f"filter: no teacher sample survived ({Counter(d['reason'] for d in drop_rows)})")
    reasons = Counter(d["reason"] for d in drop_rows)
    report = {
        "samples_in": samples_in,
        "samples_kept": len(train_rows) + len(val_rows),
        "train": len(train_rows),
        "val": len(val_rows),
        "dropped": dict(reasons),
        "categories_in": dict(categories_in),
        "categories_kept": dict(categories_out),
    }
    outputs = [out_dir / "train.jsonl", out_dir / "val.jsonl", out_dir / "drops.jsonl", out_dir / "filter_report.json"]
    write_jsonl(outputs[0], train_rows)
    write_jsonl(outputs[1], val_rows)
    write_jsonl(outputs[2], drop_rows)
    write_json(outputs[3], report)
    stage.finish(outputs, report)
    tracker = start_tracking(config, "filter")
    tracker.summary(
        {k: v for k, v in report.items() if isinstance(v, int)} | {f"dropped/{k}": v for k, v in reasons.items()}
    )
    tracker.finish()
    log(
        f"filter: {report['samples_kept']}/{samples_in} samples kept ({len(train_rows)} train, {len(val_rows)} val); "
        f"dropped {dict(reasons)}"
    )
    return out_dir
