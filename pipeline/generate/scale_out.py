"""Generation on many workers: shards as Ray tasks, or as separate jobs (a Slurm array), then one merge.

distill generate --config ... --shard 3 --num-shards 8     # one worker's slice
distill generate --config ... --merge-shards 8             # the slices, merged in prompt order
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ExperimentConfig
from pipeline.console import PipelineError, log
from pipeline.engines import model_for
from pipeline.files import atomic_path, parse_json_object, sha256_file
from pipeline.generate.stage import (
    Shard,
    generate_stage,
    row_output_tokens,
    run_generate,
    shard_of,
    shard_stage,
    train_examples,
)
from pipeline.layout import TEACHER_OUTPUTS
from pipeline.runs import input_label
from pipeline.tasks import task_for


def run_generate_or_scale_out(config: ExperimentConfig, force: bool = False) -> Path:
    """The stage as the CLI and `distill run` call it: on Ray when `teacher.ray.workers` says so."""
    return run_generate_with_ray(config, force) if config.teacher.ray.workers else run_generate(config, force)


def run_generate_with_ray(config: ExperimentConfig, force: bool = False) -> Path:
    """`teacher.ray.workers` shards as Ray tasks (one engine each, on any node of the cluster), then the merge.

    Each task is `run_generate` on its shard, so a task that dies is retried by Ray and resumes its own
    partial file; finished shards are skipped on a rerun.
    """
    settings = config.teacher.ray
    task = task_for(config)
    with generate_stage(config, task) as stage:
        if stage.skip(force, stage.dir / TEACHER_OUTPUTS):
            return stage.dir / TEACHER_OUTPUTS
        try:
            import ray
        except ImportError:
            raise PipelineError(
                "teacher.ray.workers: ray is not installed (pip install 'distill-pipeline[ray]')"
            ) from None
        train_examples(task)  # a bad task fails here, not in every worker
        model_for(config.teacher.model, config.teacher.engine)  # so does an unknown model (a bundled one is cached)
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
    task = task_for(config)
    files = []
    for shard in (Shard(i, num_shards) for i in range(num_shards)):
        finished = shard_stage(config, task, shard)
        if not finished.is_fresh():
            raise PipelineError(
                f"generate: shard {shard.index} of {num_shards} is not finished under this config "
                f"(run: distill generate --config ... --shard {shard.index} --num-shards {num_shards})"
            )
        files.append(finished.dir / TEACHER_OUTPUTS)
    with generate_stage(config, task) as stage:
        # The shard files are recorded as inputs; the fingerprint stays the unsharded one.
        stage.inputs |= {input_label(config, f): sha256_file(f) for f in files}
        output = stage.dir / TEACHER_OUTPUTS
        readers = [f.open("rb") for f in files]
        counts = {"prompts": 0, "output_tokens": 0, "prompt_errors": 0}
        try:
            with atomic_path(output) as tmp, tmp.open("wb") as out:
                for ex in train_examples(task):
                    index = shard_of(ex.id, num_shards)
                    line = readers[index].readline()
                    row = parse_json_object(line) if line.strip() else {}
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
    log(f"generate: merged {num_shards} shards, {counts['prompts']} prompts, into {output}")
    return output
