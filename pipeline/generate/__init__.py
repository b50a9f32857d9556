"""Stage 1, generate: the teacher answers every training prompt of the task."""

from pipeline.generate.stage import Shard, merge_shards, run_generate, run_generate_or_scale_out

__all__ = ["Shard", "merge_shards", "run_generate", "run_generate_or_scale_out"]
