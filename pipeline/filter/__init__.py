"""Stage 2, filter: teacher outputs become JSONL chat examples; every dropped sample keeps its reason."""

from pipeline.filter.stage import run_filter

__all__ = ["run_filter"]
