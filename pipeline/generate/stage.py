"""Stage 1, generate: the teacher answers every training prompt of the task.

    distill generate --config configs/smollm2_support.yaml
    distill generate --config ... --shard 3 --num-shards 8     # one worker's slice (e.g. a Slurm array task)
    distill generate --config ... --merge-shards 8             # then put the slices together

Rows are appended per finished chunk to `teacher_outputs.partial.jsonl`, flushed and fsynced, so a
killed run resumes where it stopped (a torn last line is cut off); the file is renamed to
`teacher_outputs.jsonl` when every prompt is done. Shards split the prompts by a hash of their id:
disjoint, deterministic, and stable when prompts are added.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.config import ExperimentConfig, resolved_dict
from pipeline.engines import Completion, Generation, load_engine, model_for
from pipeline.runs import PipelineError, Stage, atomic_path, log, sha256_file
from pipeline.tasks import Example, Task, build_task, task_files
from pipeline.tracking import start_tracking

OUTPUT = "teacher_outputs.jsonl"


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise PipelineError(f"--shard {self.index} --num-shards {self.count}: need 0 <= shard < num-shards")

    @property
    def name(self) -> str:
        return f"generate/shards/{self.index:05d}-of-{self.count:05d}"

    def holds(self, prompt_id: str) -> bool:
        return shard_of(prompt_id, self.count) == self.index


def shard_of(prompt_id: str, count: int) -> int:
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big") % count


def _sections(config: ExperimentConfig) -> dict[str, Any]:
    teacher = config.teacher.model_dump(exclude={"chunk_size", "on_prompt_error", "ray"})  # none changes a row
    teacher["engine"].pop("server", None)  # where the server runs does not change what it answers
    return {"seed": config.seed, "task": config.task.model_dump(), "teacher": teacher}


def generate_stage(config: ExperimentConfig) -> Stage:
    return Stage(config, "generate", _sections(config), inputs=task_files(config))


def shard_stage(config: ExperimentConfig, shard: Shard) -> Stage:
    return Stage(config, shard.name, _sections(config) | {"shard": shard.name}, inputs=task_files(config))


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
                row = json.loads(line)
            except json.JSONDecodeError:
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


def _train_examples(config: ExperimentConfig) -> list[Example]:
    task = build_task(config.task.name, config.task.params, config.seed, config.base_dir)
    if config.teacher.prompt_style not in task.prompt_styles:
        raise PipelineError(f"teacher.prompt_style: {config.teacher.prompt_style!r} not in {task.prompt_styles}")
    examples = task.split("train")
    if not examples:
        raise PipelineError("task: the train split is empty")
    return examples


def run_generate(config: ExperimentConfig, force: bool = False, shard: Shard | None = None) -> Path:
    """Answer every training prompt (or one shard's slice of them); returns the output file."""
    stage = shard_stage(config, shard) if shard else generate_stage(config)
    output = stage.dir / OUTPUT
    if not force and stage.is_fresh():
        log(f"generate: skipped, inputs and config unchanged ({output})")
        return output

    task = build_task(config.task.name, config.task.params, config.seed, config.base_dir)
    examples = _train_examples(config)
    if shard:
        examples = [ex for ex in examples if shard.holds(ex.id)]
    model = model_for(config.teacher.model, config.teacher.engine)  # fail fast on an unknown model
    stage.dir.mkdir(parents=True, exist_ok=True)
    partial = stage.dir / "teacher_outputs.partial.jsonl"
    stamp = stage.dir / "teacher_outputs.partial.fingerprint"
    if force or not stamp.exists() or stamp.read_text() != stage.fingerprint:
        partial.unlink(missing_ok=True)  # written under another config: not reusable
    stamp.write_text(stage.fingerprint)
    reused = 0
    if not partial.exists() and not force and not shard:
        reused = reuse_previous(config, stage, task, examples, partial)
    done = read_done(partial)
    todo = [ex for ex in examples if ex.id not in done]
    log(
        f"generate: {len(examples)} prompts, {len(done)} already done"
        + (f" ({reused} reused from the previous run)" if reused else "")
        + f", {len(todo)} to go"
    )

    tracker = start_tracking(config, "generate")
    output_tokens = sum(row.output_tokens for row in done.values())
    timing: dict[str, float] = {}
    if todo:
        engine = load_engine(model, config.teacher.engine, config.seed)
        started = time.perf_counter()
        new_tokens = 0
        bar = tqdm(total=len(examples), initial=len(done), desc="generate", unit="prompt", smoothing=0.1)
        try:
            with partial.open("a") as fh:
                for start in range(0, len(todo), config.teacher.chunk_size):
                    chunk = todo[start : start + config.teacher.chunk_size]
                    conversations = [task.messages(ex, config.teacher.prompt_style) for ex in chunk]
                    generations = engine.generate(conversations, config.teacher.sampling, progress=False)
                    for ex, conv, gen in zip(chunk, conversations, generations, strict=True):
                        if gen.error and config.teacher.on_prompt_error == "fail":
                            raise PipelineError(
                                f"generate: prompt {ex.id}: {gen.error} (teacher.on_prompt_error=skip skips it)"
                            )
                        fh.write(json.dumps(_row(config, ex, conv, gen), ensure_ascii=False) + "\n")
                        new_tokens += gen.output_tokens
                    fh.flush()
                    os.fsync(fh.fileno())
                    rate = new_tokens / (time.perf_counter() - started)
                    bar.set_postfix_str(f"{rate:.1f} output tok/s", refresh=False)
                    bar.update(len(chunk))
                    tracker.log({"prompts_done": bar.n, "output_tokens_per_s": rate, "output_tokens": new_tokens})
            seconds = time.perf_counter() - started  # from the engine being ready to the last row on disk
        finally:
            bar.close()
            engine.close()
        output_tokens += new_tokens
        timing = {"generation_s": round(seconds, 3), "output_tokens_per_s": round(new_tokens / seconds, 2)}

    rows = read_done(partial)
    missing = [ex.id for ex in examples if ex.id not in rows]
    if missing:
        raise PipelineError(f"generate: {len(missing)} prompts have no output (first: {missing[0]})")
    errors = [(prompt_id, row.error) for prompt_id, row in rows.items() if row.error]
    os.replace(partial, output)
    stamp.unlink(missing_ok=True)
    metrics = {
        "prompts": len(examples),
        "generated_prompts": len(todo),
        "reused_prompts": reused,
        "output_tokens": output_tokens,
        "prompt_errors": len(errors),
        **timing,
    }
    stage.finish([output], metrics)
    tracker.summary(metrics)
    if not shard:  # a shard's rows are logged once merged
        tracker.artifact(config, "generate", stage.fingerprint, [output])
    tracker.finish()
    if errors:
        log(f"generate: {len(errors)} prompts skipped (first: {errors[0][0]}: {errors[0][1]})")
    log(f"generate: wrote {output}")
    return output


def _teacher_identity(resolved: dict[str, Any]) -> dict[str, Any]:
    """What decides a teacher row besides its prompt (a resolved config, as manifests store it)."""
    teacher = {k: v for k, v in resolved["teacher"].items() if k not in ("chunk_size", "on_prompt_error", "ray")}
    teacher["engine"] = {k: v for k, v in teacher["engine"].items() if k != "server"}
    return {"seed": resolved["seed"], "teacher": teacher}


def reuse_previous(config: ExperimentConfig, stage: Stage, task: Task, examples: list[Example], partial: Path) -> int:
    """Start a fresh partial file with the previous run's rows that still hold.

    When only the prompt set changed (new rows in the data file, a larger split), the previous output's
    rows for prompts still present, with the same teacher prompt, teacher, sampling and seed, are copied
    in prompt order; only the new prompts are generated. Returns how many rows were reused.
    """
    previous, manifest = stage.dir / OUTPUT, stage.manifest()
    if not previous.is_file() or not manifest or "config" not in manifest:
        return 0
    if _teacher_identity(manifest["config"]) != _teacher_identity(resolved_dict(config)):
        return 0
    where: dict[str, tuple[int, int]] = {}  # prompt id -> (offset, length) of its line
    offset = 0
    with previous.open("rb") as fh:
        for line in fh:
            where[json.loads(line)["prompt_id"]] = (offset, len(line))
            offset += len(line)
    reused = 0
    with previous.open("rb") as source, partial.open("ab") as out:
        for example in examples:
            if example.id not in where:
                continue
            source.seek(where[example.id][0])
            line = source.read(where[example.id][1])
            row = json.loads(line)
            if row.get("error") or row["messages"] != task.messages(example, config.teacher.prompt_style):
                continue
            out.write(line)
            reused += 1
        out.flush()
        os.fsync(out.fileno())
    return reused


def run_generate_or_scale_out(config: ExperimentConfig, force: bool = False) -> Path:
    """The stage as the CLI and `distill run` call it: on Ray when `teacher.ray.workers` says so."""
    return run_generate_with_ray(config, force) if config.teacher.ray.workers else run_generate(config, force)


def run_generate_with_ray(config: ExperimentConfig, force: bool = False) -> Path:
    """`teacher.ray.workers` shards as Ray tasks (one engine each, on any node of the cluster), then the merge.

    Each task is `run_generate` on its shard, so a task that dies is retried by Ray and resumes its own
    partial file; finished shards are skipped on a rerun.
    """
    settings = config.teacher.ray
    stage = generate_stage(config)
    if not force and stage.is_fresh():
        log(f"generate: skipped, inputs and config unchanged ({stage.dir / OUTPUT})")
        return stage.dir / OUTPUT
    try:
        import ray
    except ImportError:
        raise PipelineError("teacher.ray.workers: ray is not installed (pip install 'distill-pipeline[ray]')") from None
    _train_examples(config)  # a bad task fails here, not in every worker
    model_for(config.teacher.model, config.teacher.engine)  # so does an unknown model (and a bundled one is cached)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=settings.address, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_gpus=settings.gpus_per_worker, num_cpus=settings.cpus_per_worker, max_retries=2)(
            run_generate
        )
        shards = [Shard(i, settings.workers) for i in range(settings.workers)]
        log(f"generate: {settings.workers} Ray workers")
        ray.get([remote.remote(config, force, shard) for shard in shards])
    finally:
        if started_here:
            ray.shutdown()
    return merge_shards(config, settings.workers)


def merge_shards(config: ExperimentConfig, num_shards: int) -> Path:
    """Put finished shards together into the stage's one output, in the task's prompt order.

    Streams: each shard file is in prompt order, so the merge walks the prompts once and takes the next
    row from the shard that holds each; every prompt must come exactly once.
    """
    stage = generate_stage(config)
    shards = [Shard(i, num_shards) for i in range(num_shards)]
    files = []
    for shard in shards:
        finished = shard_stage(config, shard)
        if not finished.is_fresh():
            raise PipelineError(
                f"generate: shard {shard.index} of {num_shards} is not finished under this config "
                f"(run: distill generate --config ... --shard {shard.index} --num-shards {num_shards})"
            )
        files.append(finished.dir / OUTPUT)
    stage.inputs |= {str(f): sha256_file(f) for f in files}  # recorded; the fingerprint stays the unsharded one
    output = stage.dir / OUTPUT
    readers = [f.open("rb") for f in files]
    counts = {"prompts": 0, "output_tokens": 0, "prompt_errors": 0}
    try:
        with atomic_path(output) as tmp, tmp.open("wb") as out:
            for ex in _train_examples(config):
                index = shard_of(ex.id, num_shards)
                line = readers[index].readline()
                row = json.loads(line) if line.strip() else {}
                if row.get("prompt_id") != ex.id:
                    raise PipelineError(
                        f"generate: {files[index]} has {row.get('prompt_id')!r} where {ex.id!r} belongs"
                    )
                out.write(line)
                counts["prompts"] += 1
                counts["output_tokens"] += row_output_tokens(row)
                counts["prompt_errors"] += bool(row.get("error"))
            for index, reader in enumerate(readers):
                if reader.readline().strip():
                    raise PipelineError(f"generate: {files[index]} holds prompts the task does not have")
    finally:
        for reader in readers:
            reader.close()
    stage.finish([output], counts | {"shards": num_shards})
    tracker = start_tracking(config, "generate")
    tracker.artifact(config, "generate", stage.fingerprint, [output])
    tracker.finish()
    log(f"generate: merged {num_shards} shards, {counts['prompts']} prompts, into {output}")
    return output


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


def _row(config: ExperimentConfig, ex: Example, conv: list[dict[str, str]], gen: Generation) -> dict[str, Any]:
    row = {
        "prompt_id": ex.id,
        "category": ex.category,
        "user": ex.user,
        "reference": ex.reference,
        "messages": conv,
        "completions": [_completion(c) for c in gen.completions],
        "prompt_tokens": gen.prompt_tokens,
        "teacher": config.teacher.model,
        "sampling": config.teacher.sampling.model_dump(),
    }
    if "usage" in gen.extra:
        row["usage"] = gen.extra["usage"]  # what the server reported, for cost accounting
    if gen.error:
        row["error"] = gen.error
    return row
