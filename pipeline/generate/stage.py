"""The generate stage: the teacher answers every training prompt of the task.

    distill generate --config configs/smollm2_support.yaml
    distill generate --config ... --shard 3 --num-shards 8     # one worker's slice (e.g. a Slurm array task)
    distill generate --config ... --merge-shards 8             # then put the slices together (scale_out.py)

Rows are appended per finished chunk to `teacher_outputs.partial.jsonl`, flushed and fsynced, so a
killed run resumes where it stopped (a torn last line is cut off); the file is renamed to
`teacher_outputs.jsonl` when every prompt is done. Shards split the prompts by a hash of their id:
disjoint, deterministic, and stable when prompts are added.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.config import (
    EngineConfig,
    ExperimentConfig,
    SamplingConfig,
    TeacherConfig,
    engine_identity,
    resolved_dict,
)
from pipeline.console import PipelineError, log
from pipeline.engines import Completion, Conversation, Engine, Generation, load_engine, model_for
from pipeline.files import json_line, parse_json_object
from pipeline.layout import TEACHER_OUTPUTS, RunLayout, partial_file
from pipeline.runs import Stage
from pipeline.tasks import Example, Task, task_for

# Teacher settings that do not change what a row says (how many prompts per chunk, what to do on an error,
# where the workers run), and so neither reset the stage nor stop reusing a previous run's rows.
NOT_IN_A_ROW = ("chunk_size", "on_prompt_error", "ray")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise PipelineError(f"--shard {self.index} --num-shards {self.count}: need 0 <= shard < num-shards")

    @property
    def name(self) -> str:
        """The shard's stage name: its folder under the run directory."""
        return RunLayout.shard_name(self.index, self.count)

    def holds(self, prompt_id: str) -> bool:
        return shard_of(prompt_id, self.count) == self.index


def shard_of(prompt_id: str, count: int) -> int:
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big") % count


def teacher_identity(teacher: dict[str, Any]) -> dict[str, Any]:
    """What decides a teacher row besides its prompt, from a dumped `teacher` config section."""
    identity = {key: value for key, value in teacher.items() if key not in NOT_IN_A_ROW}
    identity["engine"] = engine_identity(identity["engine"])
    return identity


def _sections(config: ExperimentConfig) -> dict[str, Any]:
    return {
        "seed": config.seed,
        "task": config.task.model_dump(),
        "teacher": teacher_identity(config.teacher.model_dump()),
    }


def generate_stage(config: ExperimentConfig, task: Task) -> Stage:
    return Stage(config, "generate", _sections(config), inputs=task.data_files())


def shard_stage(config: ExperimentConfig, task: Task, shard: Shard) -> Stage:
    """A shard is a stage of its own: its own folder and lock (shards of one run work side by side), no
    Artifact (its rows are logged once merged)."""
    folder = config.layout.stage_dir(shard.name)
    sections = _sections(config) | {"shard": shard.name}
    return Stage(config, shard.name, sections, inputs=task.data_files(), lock_dir=folder, artifact=False)


@dataclass(frozen=True)
class Done:
    """What resuming needs of a written row (not the row: 10M of those would not fit in memory)."""

    output_tokens: int
    error: str | None


def read_done(partial: Path) -> dict[str, Done]:
    """Prompts already written, by id; a torn last line (killed mid-write) is cut off the file."""
    done: dict[str, Done] = {}
    if not partial.exists():
        return done
    good_bytes = 0
    with partial.open("rb") as fh:
        for line in fh:
            try:
                row = parse_json_object(line)
            except ValueError:
                break
            if not line.endswith(b"\n"):
                break
            done[row["prompt_id"]] = Done(row_output_tokens(row), row.get("error"))
            good_bytes += len(line)
    if good_bytes != partial.stat().st_size:
        log(f"generate: dropping a torn last line from {partial.name}")
        with partial.open("r+b") as fh:
            fh.truncate(good_bytes)
    return done


def train_examples(task: Task) -> list[Example]:
    """The prompts the teacher answers: the task's train split, in the teacher's prompt style."""
    examples = task.split("train")
    if not examples:
        raise PipelineError("task: the train split is empty")
    return examples


def run_generate(config: ExperimentConfig, force: bool = False, shard: Shard | None = None) -> Path:
    """Answer every training prompt (or one shard's slice of them); returns the output file."""
    task = task_for(config)
    stage = shard_stage(config, task, shard) if shard else generate_stage(config, task)
    output = stage.dir / TEACHER_OUTPUTS
    with stage:
        if stage.skip(force, output):
            return output
        examples = train_examples(task)
        if shard:
            examples = [ex for ex in examples if shard.holds(ex.id)]
        model = model_for(config.teacher.model, config.teacher.engine)  # fail fast on an unknown model
        sampling = teacher_sampling(config.teacher, task)
        partial, reused = _open_partial(
            config, stage, task, examples, sampling, reuse=not (force or shard), force=force
        )
        done = read_done(partial)
        todo = [ex for ex in examples if ex.id not in done]
        log(
            f"generate: {len(examples)} prompts, {len(done)} already done"
            + (f" ({reused} reused from the previous run)" if reused else "")
            + f", {len(todo)} to go"
        )
        new_tokens, timing = 0, {}
        if todo:
            new_tokens, timing = _answer(
                config.teacher, sampling, config.seed, stage, task, model, todo, partial, len(examples)
            )

        rows = read_done(partial)
        missing = [ex.id for ex in examples if ex.id not in rows]
        if missing:
            raise PipelineError(f"generate: {len(missing)} prompts have no output (first: {missing[0]})")
        errors = [(prompt_id, row.error) for prompt_id, row in rows.items() if row.error]
        os.replace(partial, output)
        partial.with_suffix(".fingerprint").unlink(missing_ok=True)
        metrics = {
            "prompts": len(examples),
            "generated_prompts": len(todo),
            "reused_prompts": reused,
            "output_tokens": sum(row.output_tokens for row in done.values()) + new_tokens,
            "prompt_errors": len(errors),
            "gpus": gpus_held(config.teacher.engine),
            **timing,
        }
        stage.finish([output], metrics, summary=metrics)
    if errors:
        log(f"generate: {len(errors)} prompts skipped (first: {errors[0][0]}: {errors[0][1]})")
    log(f"generate: wrote {output}")
    return output


def gpus_held(engine: EngineConfig) -> int:
    """The GPUs this process's teacher engine held, for the one-off cost (benchmark/costs.py): none for a server
    elsewhere or on a CPU, its tensor x pipeline parallel size for vLLM, one for transformers."""
    if engine.backend == "openai":
        return 0
    import torch

    if not torch.cuda.is_available():
        return 0
    return engine.devices_per_replica if engine.backend == "vllm" else 1


def _open_partial(
    config: ExperimentConfig,
    stage: Stage,
    task: Task,
    examples: list[Example],
    sampling: SamplingConfig,
    *,
    reuse: bool,
    force: bool,
) -> tuple[Path, int]:
    """The partial file to append to, stamped with the fingerprint it is written under: one from another
    config (or any, when forced) is not resumable and is removed; a new one starts with the previous run's
    rows that still hold, when `reuse`. Returns the file and how many rows were reused."""
    partial = partial_file(stage.dir / TEACHER_OUTPUTS)
    stamp = partial.with_suffix(".fingerprint")
    stage.dir.mkdir(parents=True, exist_ok=True)
    if force or not stamp.exists() or stamp.read_text() != stage.fingerprint:
        partial.unlink(missing_ok=True)
    stamp.write_text(stage.fingerprint)
    reused = 0
    if reuse and not partial.exists():
        reused = reuse_previous(config, stage, task, examples, sampling, partial)
    return partial, reused


def teacher_sampling(teacher: TeacherConfig, task: Task) -> SamplingConfig:
    """How the teacher samples: constrained to the task's labels where it has them, with max_tokens raised where the
    longest label and the end of turn after it might not fit (cut short, every such answer would be dropped as
    truncated; raised, a constrained answer still ends with its label). The raise follows from the config and the
    labels (in the data files), both in the stage's fingerprint, so a resumed run raises it alike; rows record it."""
    sampling, longest = teacher.sampling.constrained_to(task.answer_choices()).fitted_to_choices()
    if longest is not None:
        log(
            f"generate: teacher.sampling.max_tokens raised from {teacher.sampling.max_tokens} to "
            f"{sampling.max_tokens}: constrained decoding may spell the longest label, {longest!r}, in a token per "
            f"UTF-8 byte ({len(longest.encode())}), and the end of turn takes one more"
        )
    return sampling


def _answer(
    teacher: TeacherConfig,
    sampling: SamplingConfig,
    seed: int,
    stage: Stage,
    task: Task,
    model: str,
    todo: list[Example],
    partial: Path,
    total: int,
) -> tuple[int, dict[str, float]]:
    """The teacher answers `todo` chunk by chunk; each finished chunk is appended to `partial`, flushed and
    fsynced. Returns the output tokens generated and the timing metrics."""
    constraint = constraint_key(teacher.sampling, task)
    engine = load_engine(model, teacher.engine, seed)
    started = time.perf_counter()
    new_tokens = 0
    bar = tqdm(total=total, initial=total - len(todo), desc="generate", unit="prompt", smoothing=0.1)
    try:
        with partial.open("a") as fh:
            for start in range(0, len(todo), teacher.chunk_size):
                chunk = todo[start : start + teacher.chunk_size]
                conversations = [task.messages(ex, teacher.prompt_style) for ex in chunk]
                generations = engine.generate(conversations, sampling, progress=False)
                if start == 0 and constraint:
                    check_constraint_taken(engine, conversations[0], sampling, generations, constraint)
                for ex, conversation, generation in zip(chunk, conversations, generations, strict=True):
                    if generation.error and teacher.on_prompt_error == "fail":
                        raise PipelineError(
                            f"generate: prompt {ex.id}: {generation.error} (teacher.on_prompt_error=skip skips it)"
                        )
                    fh.write(json_line(_row(teacher.model, sampling, ex, conversation, generation)))
                    new_tokens += generation.output_tokens
                fh.flush()
                os.fsync(fh.fileno())
                rate = new_tokens / (time.perf_counter() - started)
                bar.set_postfix_str(f"{rate:.1f} output tok/s", refresh=False)
                bar.update(len(chunk))
                stage.tracker.log({"prompts_done": bar.n, "output_tokens_per_s": rate, "output_tokens": new_tokens})
        seconds = time.perf_counter() - started  # from the engine being ready to the last row on disk
    finally:
        bar.close()
        engine.close()
    return new_tokens, {"generation_s": round(seconds, 3), "output_tokens_per_s": round(new_tokens / seconds, 2)}


def constraint_key(sampling: SamplingConfig, task: Task) -> str | None:
    """The config key that constrains the teacher's answers (labels or a JSON schema); None: they are free."""
    if task.answer_choices() is not None:
        return "task.params.constrained"
    if sampling.choices is not None:
        return "teacher.sampling.choices"
    return "teacher.sampling.json_schema" if sampling.json_schema is not None else None


def check_constraint_taken(
    engine: Engine, conversation: Conversation, sampling: SamplingConfig, generations: list[Generation], key: str
) -> None:
    """Stop when the engine refuses constrained decoding itself, found on the first chunk before a row is written.

    A hosted API rejects vLLM's `structured_outputs`, so every prompt would be recorded as an error and the filter
    would say so after the whole run; config alone cannot tell, as `vllm serve` takes it. When every request of the
    chunk failed, one request without the constraint tells a refused constraint from prompts refused for their own
    reasons (too long for the context): only when it is answered does the stage stop."""
    if not all(generation.error for generation in generations):
        return
    free = sampling.model_copy(update={"choices": None, "json_schema": None, "n": 1, "max_tokens": 1})
    (probe,) = engine.generate([conversation], free, progress=False)
    if probe.error:
        return
    fix = (
        "set task.params.constrained=false (the filters then drop answers that are not labels)"
        if key == "task.params.constrained"
        else f"remove {key}"
    )
    raise PipelineError(
        f"{key}: every constrained request of the first chunk was refused ({generations[0].error}) and the same "
        "prompt without the constraint was answered: the teacher's server does not take it (a hosted API has no "
        f"structured_outputs); {fix}, or serve the teacher with vllm serve"
    )


def reuse_previous(
    config: ExperimentConfig,
    stage: Stage,
    task: Task,
    examples: list[Example],
    sampling: SamplingConfig,
    partial: Path,
) -> int:
    """Start a fresh partial file with the previous run's rows that still hold.

    When only the prompt set changed (new rows in the data file, a larger split), the previous output's
    rows for prompts still present, with the same teacher prompt, teacher, sampling and seed, are copied
    in prompt order; only the new prompts are generated. The sampling is each row's own, as the teacher ran it
    (`teacher_sampling`): a new label changes it under an unchanged config. Returns how many rows were reused.
    """
    previous, manifest = stage.dir / TEACHER_OUTPUTS, stage.manifest()
    if not previous.is_file() or not manifest or "config" not in manifest:
        return 0
    before, now = manifest["config"], resolved_dict(config)
    if (before["seed"], teacher_identity(before["teacher"])) != (now["seed"], teacher_identity(now["teacher"])):
        return 0
    where: dict[str, tuple[int, int]] = {}  # prompt id -> (offset, length) of its line
    offset = 0
    with previous.open("rb") as fh:
        for line in fh:
            where[parse_json_object(line)["prompt_id"]] = (offset, len(line))
            offset += len(line)
    reused, ran_with = 0, sampling.model_dump()
    with previous.open("rb") as source, partial.open("ab") as out:
        for example in examples:
            if example.id not in where:
                continue
            source.seek(where[example.id][0])
            line = source.read(where[example.id][1])
            row = parse_json_object(line)
            same_prompt = row["messages"] == task.messages(example, config.teacher.prompt_style)
            if row.get("error") or not same_prompt or row["sampling"] != ran_with:
                continue
            out.write(line)
            reused += 1
        out.flush()
        os.fsync(out.fileno())
    return reused


def _completion(completion: Completion) -> dict[str, Any]:
    record = {
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "output_tokens": completion.output_tokens,
    }
    if completion.top_logprobs is not None:  # kept for logit distillation (sampling.logprobs)
        record["token_ids"] = completion.token_ids
        record["top_logprobs"] = completion.top_logprobs
    return record


def row_output_tokens(row: dict[str, Any]) -> int:
    reported = row.get("usage", {}).get("completion_tokens")
    return reported if reported is not None else sum(c["output_tokens"] or 0 for c in row["completions"])


def _row(
    teacher: str, sampling: SamplingConfig, ex: Example, conv: list[dict[str, str]], gen: Generation
) -> dict[str, Any]:
    row = {
        "prompt_id": ex.id,
        "category": ex.category,
        "user": ex.user,
        "reference": ex.reference,
        "messages": conv,
        "completions": [_completion(c) for c in gen.completions],
        "prompt_tokens": gen.prompt_tokens,
        "teacher": teacher,
        "sampling": sampling.model_dump(),
    }
    if "usage" in gen.extra:
        row["usage"] = gen.extra["usage"]  # what the server reported, for cost accounting
    if gen.error:
        row["error"] = gen.error
    return row
