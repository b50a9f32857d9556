"""Stage 4, benchmark: every declared system (teacher, untuned, prompted and tuned student) on the held-out
test split, and the answer to "was fine-tuning worth it here?".

Reads the task's test split, the teacher and student models, `train/merged/` (or `adapter/`), the forgetting
probe, and the generate and train manifests (their wall time is the one-off cost). Writes
`benchmark/report.json` (every number), `report.md` (the verdict first), `records.jsonl` (every request, so
each number can be recomputed), PNG plots and `manifest.json`.
"""

from pipeline.benchmark.stage import run_benchmark

__all__ = ["run_benchmark"]
