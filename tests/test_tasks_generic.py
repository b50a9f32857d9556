"""The two generic tasks: label classification and short exact answers, from CSV or JSONL, no user code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.tasks import TaskError, build_task
from pipeline.tasks.exact_answer import extract_number, extract_string


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> Path:
    path.write_text(header + "\n" + "".join(f"{t},{label}\n" for t, label in rows))
    return path


ROWS = [
    (f"review number {i} was {'great' if i % 2 else 'awful'}", "positive" if i % 2 else "negative") for i in range(40)
]


def classification(tmp_path: Path, **params):
    return build_task("classification", {"path": "d.csv", **params}, seed=3, base_dir=tmp_path)


def test_classification_splits_are_deterministic_and_disjoint(tmp_path):
    write_csv(tmp_path / "d.csv", ROWS)
    a, b = classification(tmp_path), classification(tmp_path)
    assert a.split("train") == b.split("train")
    train, test = a.split("train"), a.split("test")
    assert (len(train), len(test)) == (32, 8)
    assert not {e.id for e in train} & {e.id for e in test}
    assert {e.category for e in train} == {"positive", "negative"}


def test_classification_reads_jsonl_and_a_separate_test_file(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": t, "y": label}) + "\n" for t, label in ROWS))
    write_csv(tmp_path / "t.csv", ROWS[:5], header="body,y")
    task = build_task(
        "classification",
        {"path": "d.jsonl", "test_path": "t.csv", "text_column": "body", "label_column": "y"},
        seed=0,
        base_dir=tmp_path,
    )
    assert len(task.split("train")) == 40 and len(task.split("test")) == 5


def test_classification_scoring_is_exact_after_normalisation(tmp_path):
    write_csv(tmp_path / "d.csv", ROWS)
    task = classification(tmp_path)
    example = next(e for e in task.split("test") if e.reference["target"] == "positive")
    assert task.score("Positive.", example) == {"label": True}
    assert task.score("  label: POSITIVE ", example) == {"label": True}
    assert task.score("positive sentiment", example) == {"label": False}
    assert task.score("negative", example) == {"label": False}


def test_classification_full_prompt_lists_labels_and_train_examples_only(tmp_path):
    write_csv(tmp_path / "d.csv", ROWS)
    task = classification(tmp_path, few_shot=3)
    example = task.split("test")[0]
    system = task.messages(example, "full")[0]["content"]
    assert "Allowed labels: negative, positive." in system
    assert system.count("Input: ") == 3
    assert all(e.user not in system for e in task.split("test"))
    assert task.messages(example, "short")[0]["content"] == "Classify the text. Answer with one label only."


@pytest.mark.parametrize(
    ("params", "files", "message"),
    [
        ({"path": "missing.csv"}, {}, "task.params.path: file not found: missing.csv"),
        ({"path": "d.csv", "text_column": "body"}, {"d.csv": "text,label\na,b\n"}, "no column 'body'"),
        ({"path": "d.csv"}, {"d.csv": "text,label\n"}, "has no rows"),
        ({"path": "d.csv", "labels": ["yes", "no"]}, {"d.csv": "text,label\na,maybe\nb,yes\n"}, "'maybe'"),
    ],
)
def test_classification_errors_name_the_key_file_or_column(tmp_path, params, files, message):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    with pytest.raises(TaskError, match=message.replace(".", r"\.").replace("(", r"\(")):
        build_task("classification", params, seed=0, base_dir=tmp_path).split("train")


def test_empty_test_split_is_an_error(tmp_path):
    write_csv(tmp_path / "d.csv", ROWS[:3])
    with pytest.raises(TaskError, match="test split is empty"):
        classification(tmp_path, test_fraction=0.0).split("test")


def test_number_and_string_extraction():
    assert extract_number("I think 3, no wait, the answer is -12.5") == -12.5
    assert extract_number("It costs 1,234 dollars") == 1234
    assert extract_number("no digits here") is None
    assert extract_string("Let me think.\nAnswer: Paris.") == "paris"
    assert extract_string("Berlin\nbecause it is the capital") == "berlin"


def test_exact_answer_scoring(tmp_path):
    (tmp_path / "q.jsonl").write_text(
        "".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(20))
    )
    task = build_task("exact_answer", {"path": "q.jsonl"}, seed=0, base_dir=tmp_path)
    example = task.split("test")[0]
    target = example.reference["target"]
    assert task.score(f"The sum is {target}.", example) == {"answer": True}
    assert task.score(f"{target} or maybe {int(target) + 1}", example) == {"answer": False}  # the last number counts
    strings = build_task("exact_answer", {"path": "q.jsonl", "answer_type": "string"}, seed=0, base_dir=tmp_path)
    assert strings.score(f"Answer: {target}", example) == {"answer": True}
