"""Stage 2, filter: teacher outputs become JSONL chat examples; every dropped sample keeps its reason.

Reads `generate/teacher_outputs.jsonl`, the task's test split and the forgetting probe (neither may reach
training). Writes `filter/train.jsonl` and `val.jsonl` (`{"messages": [...]}` with the student's prompt, plus
provenance), `drops.jsonl` (every dropped sample, its filter and why), `filter_report.json`, the dataset card
`DATASET.md` with `response_lengths.png`, and `manifest.json`.
"""

from pipeline.filter.stage import run_filter

__all__ = ["run_filter"]
