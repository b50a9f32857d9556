"""The two generic tasks: label classification and short exact answers, from CSV or JSONL, no user code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.tasks import TaskError, build_task
from pipeline.tasks.classification import ClassificationTask
from pipeline.tasks.exact_answer import ExactAnswerTask, extract_number, extract_string

REPO = Path(__file__).resolve().parents[1]
ROWS = [
    (f"review number {i} was {'great' if i % 2 else 'awful'}", "positive" if i % 2 else "negative") for i in range(40)
]


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> Path:
    path.write_text(header + "\n" + "".join(f"{t},{label}\n" for t, label in rows))
    return path


def classification(tmp_path: Path, seed: int = 3, **params) -> ClassificationTask:
    return ClassificationTask(ClassificationTask.Params(path="d.csv", **params), seed=seed, base_dir=tmp_path)


def test_classification_splits_are_deterministic_disjoint_and_sized(tmp_path):
    write_csv(tmp_path / "d.csv", ROWS)
    a, b = classification(tmp_path), classification(tmp_path)
    assert a.split("train") == b.split("train") and a.split("test") == b.split("test")
    train, test, shots = a.split("train"), a.split("test"), a.few_shot_examples()
    assert (len(train), len(test), len(shots)) == (28, 8, 4)  # the 4 few-shot examples are in neither split
    ids = [{e.id for e in part} for part in (train, test, shots)]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    assert ids[0] | ids[1] | ids[2] == {f"d-{i}" for i in range(40)}
    assert all(e.user == ROWS[int(e.id.split("-")[1])][0] for e in train + test)  # id = row index in the file
    assert {e.category for e in train} == {"positive", "negative"}
    assert all(e.category == e.reference["target"] for e in train)
    other_seed = classification(tmp_path, seed=4)
    assert {e.id for e in other_seed.split("test")} != {e.id for e in test}
    assert (len(classification(tmp_path, test_fraction=0.5).split("test"))) == 20


def test_classification_reads_jsonl_and_a_separate_test_file(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": t, "y": label}) + "\n" for t, label in ROWS))
    write_csv(tmp_path / "t.csv", ROWS[:5], header="body,y")
    task = build_task(
        "classification",
        {"path": "d.jsonl", "test_path": "t.csv", "text_column": "body", "label_column": "y"},
        seed=0,
        base_dir=tmp_path,
    )
    train, test = task.split("train"), task.split("test")
    assert len(train) == 36 and len(test) == 5  # 4 rows of d.jsonl are the full prompt's examples
    assert [e.user for e in test] == [t for t, _ in ROWS[:5]]
    assert not {e.id for e in train} & {e.id for e in test}


def test_classification_scoring_is_exact_after_normalisation(tmp_path):
    write_csv(tmp_path / "d.csv", ROWS)
    task = classification(tmp_path)
    positive = next(e for e in task.split("test") if e.reference["target"] == "positive")
    negative = next(e for e in task.split("test") if e.reference["target"] == "negative")
    assert task.score("Positive.", positive) == {"label": True}
    assert task.score("  label: POSITIVE ", positive) == {"label": True}
    assert task.score("Label: negative", negative) == {"label": True}
    assert task.score("Answer: **negative**!", negative) == {"label": True}
    assert task.score("positive sentiment", positive) == {"label": False}
    assert task.score("negative", positive) == {"label": False}
    assert task.score("not positive", positive) == {"label": False}
    assert task.score("", positive) == {"label": False}


def test_classification_full_prompt_lists_labels_and_train_examples_only(tmp_path):
    write_csv(tmp_path / "d.csv", ROWS)
    task = classification(tmp_path, few_shot=3)
    example = task.split("test")[0]
    full = task.messages(example, "full")
    assert [m["role"] for m in full] == ["system", "user"] and full[1]["content"] == example.user
    system = full[0]["content"]
    assert "Allowed labels: negative, positive." in system
    shots = re.findall(r"Input: (.*)\nAnswer: (.*)", system)
    assert len(shots) == 3 and {label for _, label in shots} == {"negative", "positive"}
    assert [(e.user, e.reference["target"]) for e in task.few_shot_examples()] == shots
    # Shown with their answers, so held out of both splits: the teacher is never asked what its prompt answers.
    assert all(e.user not in system for e in task.split("train") + task.split("test"))
    short = task.messages(example, "short")
    assert short == [
        {"role": "system", "content": "Classify the text. Answer with one label only."},
        {"role": "user", "content": example.user},
    ]
    assert "Input:" not in classification(tmp_path, few_shot=0).messages(example, "full")[0]["content"]
    with pytest.raises(TaskError, match="prompt style"):
        task.messages(example, "verbose")


def test_classification_given_labels_are_listed_and_leaks_detect_answers_led_by_a_label(tmp_path):
    write_csv(tmp_path / "d.csv", ROWS)
    task = classification(tmp_path, labels=["positive", "negative", "neutral", "very good"])
    assert (
        "Allowed labels: positive, negative, neutral, very good."
        in task.messages(task.split("test")[0], "full")[0]["content"]
    )
    assert task.leaks("Neutral.") and not task.leaks("The capital of France is Paris.")
    # A tuned Gemma 3 270M answered "What is 14 plus 16?" with "positive 14": the label first, then an attempt.
    assert task.leaks("positive 14") and task.leaks("Negative: 4 plus 20") and task.leaks("very good, it is 45")
    assert not task.leaks("Positively, 45.") and not task.leaks("It is positive.") and not task.leaks("very")


def test_classification_category_is_the_label_as_configured(tmp_path):
    """An example's category is its label as `labels` spells it, in whatever case the data writes it, so the
    filter's count of labels without a training example matches categories to labels exactly."""
    write_csv(tmp_path / "d.csv", ROWS)
    task = classification(tmp_path, labels=["Positive", "NEGATIVE", "neutral"])
    assert task.labels() == ["Positive", "NEGATIVE", "neutral"]
    assert {(e.category, e.reference["target"]) for e in task.split("train")} == {
        ("Positive", "positive"),
        ("NEGATIVE", "negative"),
    }
    assert {e.category for e in classification(tmp_path).split("train")} == {"positive", "negative"}


def test_classification_constrains_answers_and_names_invalid_labels(tmp_path):
    write_csv(tmp_path / "d.csv", ROWS)
    task = classification(tmp_path, labels=["positive", "negative", "neutral"])
    example = task.split("test")[0]
    assert task.answer_choices() == ["positive", "negative", "neutral"]
    assert classification(tmp_path, constrained=False).answer_choices() is None
    assert task.failure_modes("Neutral.", example) == {"invalid_label": False}
    assert task.failure_modes("Here's a step-by-step solution", example) == {"invalid_label": True}
    assert task.failure_modes("posit", example) == {"invalid_label": True}  # cut at max_tokens


def test_the_teacher_is_measured_as_it_taught_and_the_students_constrained_only_when_asked(tmp_path):
    """The teacher generated constrained to the labels, so the benchmark asks it that way too; the students answer
    freely unless `benchmark.constrained`; a system may set its own (a free teacher row beside the taught one)."""
    from pipeline.benchmark.evaluate import task_sampling
    from pipeline.benchmark.systems import answers_constrained
    from pipeline.config import validate_config

    write_csv(tmp_path / "d.csv", ROWS)
    raw = {
        "run_name": "x",
        "task": {"name": "classification", "params": {"path": str(tmp_path / "d.csv")}},
        "teacher": {"model": "m"},
        "student": {"model": "m"},
    }
    task = build_task("classification", raw["task"]["params"], seed=0, base_dir=tmp_path)

    def constrained(config) -> dict[str, bool]:
        return {s.name: answers_constrained(config, s) for s in config.benchmark.systems}

    default = validate_config(raw)
    assert constrained(default) == {
        "teacher": True,
        "student_base": False,
        "student_prompted": False,
        "student_tuned": False,
    }
    assert task_sampling(default.benchmark, task, constrained=False).choices is None
    raw["benchmark"] = {"constrained": True, "sampling": {"max_tokens": 7}}
    every = validate_config(raw)
    assert set(constrained(every).values()) == {True}
    sampling = task_sampling(every.benchmark, task, constrained=True)  # max_tokens fitted to the longest label
    assert sampling.choices == ["negative", "positive"] and sampling.max_tokens == len("negative") + 1
    assert task_sampling(every.benchmark, task, constrained=False).max_tokens == 7
    raw["benchmark"] = {
        "systems": [
            {"name": "teacher", "model": "teacher"},
            {"name": "teacher_free", "model": "teacher", "constrained": False},
            {"name": "student_base", "model": "student"},
            {"name": "student_tuned", "model": "tuned"},
        ]
    }
    assert constrained(validate_config(raw))["teacher_free"] is False


@pytest.mark.parametrize(
    ("params", "files", "message"),
    [
        ({"path": "missing.csv"}, {}, "task.params.path: file not found: missing.csv"),
        ({"path": "d.csv", "test_path": "nope.jsonl"}, {"d.csv": "text,label\na,b\n"}, "task.params.test_path: file "),
        ({"path": "d.csv", "text_column": "body"}, {"d.csv": "text,label\na,b\n"}, "no column 'body' (columns: 'text'"),
        (
            {"path": "d.jsonl"},
            {"d.jsonl": '{"text": "a", "label": "b"}\n{"text": "c"}\n'},
            "row 2 has no column 'label'",
        ),
        ({"path": "d.csv"}, {"d.csv": "text,label\n"}, "task.params.path: d.csv has no rows"),
        ({"path": "d.csv"}, {"d.csv": ""}, "task.params.path: d.csv has no rows"),
        ({"path": "d.txt"}, {"d.txt": "x"}, "expected a .csv or .jsonl file"),
        (
            {"path": "d.csv", "labels": ["yes", "no"]},
            {"d.csv": "text,label\na,maybe\nb,yes\n"},
            "labels: label 'maybe'",
        ),
    ],
)
def test_classification_errors_name_the_key_file_or_column(tmp_path, params, files, message):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    with pytest.raises(TaskError, match=re.escape(message)) as info:
        build_task("classification", params, seed=0, base_dir=tmp_path).split("train")
    assert "\n" not in str(info.value)


def test_empty_test_split_is_an_error_that_says_how_to_fix_it(tmp_path):
    write_csv(tmp_path / "d.csv", ROWS[:3])
    with pytest.raises(TaskError, match="test split is empty.*(test_fraction|test_path)"):
        classification(tmp_path, test_fraction=0.0).split("test")
    with pytest.raises(TaskError, match="test split is empty"):
        classification(tmp_path, test_fraction=0.1).split("test")  # rounds to 0 of 3 rows
    assert len(classification(tmp_path, test_fraction=0.0, few_shot=1).split("train")) == 2
    with pytest.raises(TaskError, match=r"train split is empty \(0 rows held out for test, 3 shown as few-shot"):
        classification(tmp_path, test_fraction=0.0, few_shot=3).split("train")


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("I think 3, no wait, the answer is -12.5", -12.5),
        ("It costs 1,234 dollars", 1234),
        ("Total: 1,234,567.5", 1234567.5),
        ("x = -7", -7),
        ("10 - 3 = 7.", 7),
        ("from 5-3 we get", 3),
        ("0.25", 0.25),
        ("The answer is 42.", 42),
    ],
)
def test_number_extraction_takes_the_last_number(text, number):
    assert extract_number(text) == number


def test_number_and_string_extraction_edge_cases():
    assert extract_number("no digits here") is None
    assert extract_number("") is None
    assert extract_string("Let me think.\nAnswer: Paris.") == "paris"
    assert extract_string("answer: Rome\nanswer: Paris\nbecause it is the capital") == "paris"
    assert extract_string("Berlin\nbecause it is the capital") == "berlin"
    assert extract_string("  \n") == ""


def qa_file(tmp_path: Path) -> Path:
    rows = [{"question": f"What is {i} plus 1000?", "answer": f"{i + 1000:,}"} for i in range(20)]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_exact_answer_number_scoring(tmp_path):
    qa_file(tmp_path)
    task = ExactAnswerTask(ExactAnswerTask.Params(path="q.jsonl"), seed=0, base_dir=tmp_path)
    example = task.split("test")[0]
    value = int(example.reference["target"].replace(",", ""))
    assert task.score(f"The sum is {value}.", example) == {"answer": True}
    assert task.score(f"The sum is {value:,}.0", example) == {"answer": True}
    assert task.score(f"{value} or maybe {value + 1}", example) == {"answer": False}  # the last number counts
    assert task.score(f"{value + 1e-3}", example) == {"answer": False}
    assert task.score("I do not know", example) == {"answer": False}
    system = task.messages(example, "full")[0]["content"]
    assert system.startswith("Answer the question. Give only the final answer.") and system.count("Input: ") == 4


def test_exact_answer_string_mode(tmp_path):
    (tmp_path / "c.csv").write_text("q,a\nCapital of France?,Paris\nCapital of Italy?,Rome\n" * 5)
    task = build_task(
        "exact_answer",
        {"path": "c.csv", "question_column": "q", "answer_column": "a", "answer_type": "string", "test_fraction": 0.5},
        seed=0,
        base_dir=tmp_path,
    )
    example = next(e for e in task.split("test") if e.reference["target"] == "Paris")
    assert task.score("Answer: paris.", example) == {"answer": True}
    assert task.score("Paris\nIt is the largest city.", example) == {"answer": True}
    assert task.score("I believe it is Paris", example) == {"answer": False}
    assert task.score("Rome", example) == {"answer": False}


def test_exact_answer_number_mode_rejects_non_numeric_answers(tmp_path):
    (tmp_path / "c.csv").write_text("question,answer\nCapital of France?,Paris\n")
    with pytest.raises(TaskError, match="answer_column.*not a number.*'Paris'"):
        build_task("exact_answer", {"path": "c.csv"}, seed=0, base_dir=tmp_path).split("train")


def test_bundled_example_files_load_and_score_their_references():
    sentiment = build_task("classification", {"path": "data/examples/sentiment.csv", "test_fraction": 0.25}, 1, REPO)
    assert len(sentiment.split("train")) + len(sentiment.split("test")) >= 100
    assert sentiment.labels() == ["negative", "positive"]
    arithmetic = build_task("exact_answer", {"path": "data/examples/arithmetic.jsonl", "test_fraction": 0.25}, 1, REPO)
    examples = arithmetic.split("train") + arithmetic.split("test")
    assert len(examples) >= 100
    assert all(arithmetic.score(e.reference["target"], e) == {"answer": True} for e in examples)
