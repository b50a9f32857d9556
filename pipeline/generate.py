"""Stage 1, generate: the teacher answers every training prompt of the task.

    distill generate --config configs/smollm2_support.yaml

Rows are appended per finished chunk to `teacher_outputs.partial.jsonl` and flushed, so a killed
run resumes where it stopped; the file is renamed to `teacher_outputs.jsonl` when every prompt is done.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig
from pipeline.engines import load_engine
from pipeline.models import resolve_model
from pipeline.runs import PipelineError, Stage, log
from pipeline.tasks import Example, build_task
from pipeline.tracking import start_tracking

OUTPUT = "teacher_outputs.jsonl"


def generate_stage(config: ExperimentConfig) -> Stage:
    sections = {"seed": config.seed, "task": config.task.model_dump(), "teacher": config.teacher.model_dump()}
    return Stage(config, "generate", sections, inputs=[])


def read_done(partial: Path) -> dict[str, dict[str, Any]]:
    """Rows already written, by prompt id; a torn last line (killed mid-write) is cut off the file."""
    done: dict[str, dict[str, Any]] = {}
    if not partial.exists():
        return done
    good_bytes = 0
    with partial.open("rb") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if not line.endswith(b"\n"):
                break
            done[row["prompt_id"]] = row
            good_bytes += len(line)
    if good_bytes != partial.stat().st_size:
        log(f"generate: dropping a torn last line from {partial.name}")
        with partial.open("r+b") as fh:
            fh.truncate(good_bytes)
    return done


def run_generate(config: ExperimentConfig, force: bool = False) -> Path:
    stage = generate_stage(config)
    output = stage.dir / OUTPUT
    if not force and stage.is_fresh():
        log(f"generate: skipped, inputs and config unchanged ({output})")
        return output

    task = build_task(config.task.name, config.task.params, config.seed, config.base_dir)
    if config.teacher.prompt_style not in task.prompt_styles:
        raise PipelineError(f"teacher.prompt_style: {config.teacher.prompt_style!r} not in {task.prompt_styles}")
    examples = task.split("train")
    if not examples:
        raise PipelineError("task: the train split is empty")

    model_path = resolve_model(config.teacher.model)  # fail fast on an unknown model, before any work
    stage.dir.mkdir(parents=True, exist_ok=True)
    partial = stage.dir / "teacher_outputs.partial.jsonl"
    stamp = stage.dir / "teacher_outputs.partial.fingerprint"
    if force or not stamp.exists() or stamp.read_text() != stage.fingerprint:
        partial.unlink(missing_ok=True)  # written under another config: not reusable
    stamp.write_text(stage.fingerprint)
    done = read_done(partial)
    todo = [ex for ex in examples if ex.id not in done]
    log(f"generate: {len(examples)} prompts, {len(done)} already done, {len(todo)} to go")

    tracker = start_tracking(config, "generate")
    output_tokens = sum(c["output_tokens"] for row in done.values() for c in row["completions"])
    if todo:
        engine = load_engine(model_path, config.teacher.engine, config.seed)
        started = time.perf_counter()
        new_tokens = 0
        try:
            with partial.open("a") as fh:
                for start in range(0, len(todo), config.teacher.chunk_size):
                    chunk = todo[start : start + config.teacher.chunk_size]
                    conversations = [task.messages(ex, config.teacher.prompt_style) for ex in chunk]
                    generations = engine.generate(conversations, config.teacher.sampling)
                    for ex, conv, gen in zip(chunk, conversations, generations, strict=True):
                        fh.write(json.dumps(_row(config, ex, conv, gen), ensure_ascii=False) + "\n")
                        new_tokens += sum(c.output_tokens for c in gen.completions)
                    fh.flush()
                    os.fsync(fh.fileno())
                    elapsed = time.perf_counter() - started
                    finished = len(done) + start + len(chunk)
                    tracker.log({"prompts_done": finished, "output_tokens_per_s": new_tokens / elapsed})
                    log(f"generate: {finished}/{len(examples)} prompts, {new_tokens / elapsed:.1f} output tok/s")
        finally:
            engine.close()
        output_tokens += new_tokens

    rows = read_done(partial)
    missing = [ex.id for ex in examples if ex.id not in rows]
    if missing:
        raise PipelineError(f"generate: {len(missing)} prompts have no output (first: {missing[0]})")
    os.replace(partial, output)
    stamp.unlink(missing_ok=True)
    metrics = {"prompts": len(examples), "output_tokens": output_tokens}
    stage.finish([output], metrics)
    tracker.summary(metrics)
    tracker.finish()
    log(f"generate: wrote {output}")
    return output


def _row(config: ExperimentConfig, ex: Example, conv: list[dict[str, str]], gen: Any) -> dict[str, Any]:
    return {
        "prompt_id": ex.id,
        "category": ex.category,
        "user": ex.user,
        "reference": ex.reference,
        "messages": conv,
        "completions": [
            {"text": c.text, "finish_reason": c.finish_reason, "output_tokens": c.output_tokens}
            for c in gen.completions
        ],
        "prompt_tokens": gen.prompt_tokens,
        "teacher": config.teacher.model,
        "sampling": config.teacher.sampling.model_dump(),
    }
