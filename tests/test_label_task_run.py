"""A label task run end to end as a new user runs one (issue 48's intent case, in small): many labels, one of them
longer than `teacher.sampling.max_tokens`, and fewer kept examples than labels. The teacher is a tiny random model
on the transformers engine, constrained to the labels as the classification task asks by default."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import run_pipeline
from pipeline.config import validate_config
from pipeline.files import read_jsonl
from tests.conftest import tiny_config

LONG_LABEL = "card payment declined at a foreign merchant terminal overnight"
LABELS = [f"intent {chr(ord('a') + i)}" for i in range(11)] + [LONG_LABEL]


@pytest.mark.integration
def test_a_label_task_reports_the_teacher_as_it_taught_and_the_labels_never_shown(tmp_path, tiny_model, tokenizer):
    rows = [(f"message number {i} about thing {i % 7}", LABELS[i % len(LABELS)]) for i in range(48)]
    data = tmp_path / "intents.csv"
    data.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    assert len(tokenizer(LONG_LABEL)["input_ids"]) > 4  # longer than max_tokens below
    raw = tiny_config(
        tmp_path,
        tiny_model,
        **{
            "teacher.sampling.max_tokens": 4,
            "filter.correctness.enabled": True,  # kept answers are the right label: few of them, from a random model
            "benchmark.probe": False,
        },
    )
    raw["task"] = {"name": "classification", "params": {"path": str(data), "test_fraction": 0.25, "few_shot": 2}}
    config = validate_config(raw)
    run_pipeline(config)

    # Generation fitted max_tokens to the longest label: no constrained answer was cut short.
    outputs = list(read_jsonl(config.layout.teacher_outputs))
    reasons = {c["finish_reason"] for row in outputs for c in row["completions"]}
    assert "length" not in reasons, reasons
    report = json.loads(config.layout.report_json.read_text())
    systems = report["systems"]
    # The teacher is measured as it taught, constrained; the students answer freely (benchmark.constrained off).
    assert systems["teacher"]["constrained"] is True
    assert systems["student_base"]["constrained"] is False and systems["student_tuned"]["constrained"] is False
    assert systems["teacher"]["failure_rates"]["invalid_label"] == 0.0
    markdown = config.layout.report_md.read_text()
    assert "`teacher` answered constrained to the task's 12 labels (the teacher as it generated the training data)" in (
        markdown
    )
    # Fewer kept examples than labels: some test labels were never shown, and the report scores them apart.
    kept = {row["category"] for row in read_jsonl(config.layout.train_data)}
    assert len(kept) < len(LABELS)
    coverage = report["coverage"]
    assert coverage["word"] == "labels" and coverage["untrained"] and set(coverage["untrained"]).isdisjoint(kept)
    assert f"Its training data showed {coverage['categories'] - len(coverage['untrained'])} of the " in markdown
    assert report["comparable"]["task"] == "classification"
