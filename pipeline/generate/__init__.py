"""Stage 1, generate: the teacher answers every training prompt of the task.

Reads the task's train split (and its data files). Writes `generate/teacher_outputs.jsonl`: one row per
prompt with the teacher's messages, its n completions (text, finish reason, token counts, optional top-k
logprobs), the teacher and its sampling; `manifest.json` beside it. Shards (`--shard`, Ray) write the same
under `generate/shards/<i>-of-<n>/` and are merged into the one output.
"""

from pipeline.generate.scale_out import merge_shards, run_generate_or_scale_out
from pipeline.generate.stage import Shard, run_generate, shard_of

__all__ = ["Shard", "merge_shards", "run_generate", "run_generate_or_scale_out", "shard_of"]
