"""Stage 4, benchmark: teacher vs untuned and tuned student on the held-out test split, and the report."""

from pipeline.benchmark.stage import run_benchmark

__all__ = ["run_benchmark"]
