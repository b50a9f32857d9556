"""Names several modules compare, defined once: the benchmark's systems, the models they run, metric keys.

The config's default systems, the benchmark, the report's verdict, `distill compare` and the promotion gate
all import these, so grep for a name finds every place that makes or reads it.
"""

from __future__ import annotations

# Systems of the benchmark (`benchmark.systems[].name`): the verdict compares the tuned student with the others.
TEACHER = "teacher"
STUDENT_BASE = "student_base"  # the untuned student with its short prompt
STUDENT_PROMPTED = "student_prompted"  # "try prompting first": the untuned student given the teacher's prompt
STUDENT_TUNED = "student_tuned"
REQUIRED_SYSTEMS = (TEACHER, STUDENT_BASE, STUDENT_TUNED)  # what the verdict cannot do without

# Models a system may name (`benchmark.systems[].model`), besides any model folder or HF id.
TEACHER_MODEL = "teacher"  # teacher.model
STUDENT_MODEL = "student"  # student.model, untuned
TUNED_MODEL = "tuned"  # the train stage's output

# Latency under load, per system and concurrency level in report.json: `<measure>_p<q>_s`.
LATENCY_MEASURES = ("ttft", "tpot", "e2e")  # time to first token, per output token after it, end to end
LATENCY_PERCENTILES = (50, 95, 99)


def latency_key(measure: str, q: int) -> str:
    """`latency_key("e2e", 95)` is "e2e_p95_s", the key of that percentile in a load level's summary."""
    return f"{measure}_p{q}_s"


# report.json's `cost_basis` of a system priced by its tokens at a hosted API's list price (`price`), not by a
# machine's hour and its measured throughput.
LIST_PRICE_BASIS = "list price per token"
