"""Names several modules compare, defined once: the benchmark's systems and the models they run.

The config's default systems, the benchmark, the report's verdict, `distill compare` and the promotion gate
all import these, so grep for a name finds every place that makes or reads it. The names of report.json's
figures are the fields of pipeline/benchmark/results.py.
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
