"""Shared loading and splitting for the file-backed generic tasks (classification, exact answers)."""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

from pydantic import Field

from pipeline.tasks.base import Example, Message, Task, TaskError, TaskParams


class TabularParams(TaskParams):
    path: str
    test_path: str | None = None  # a separate test file; otherwise `test_fraction` of `path` is held out
    test_fraction: float = Field(0.2, ge=0, lt=1)
    few_shot: int = Field(4, ge=0)


def read_rows(base_dir: Path, key: str, value: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a CSV or JSONL file; errors name the config key, the file and the missing column."""
    path = Path(value) if Path(value).is_absolute() else base_dir / value
    if not path.is_file():
        raise TaskError(f"task.params.{key}: file not found: {value}")
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    elif path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise TaskError(f"task.params.{key}: {value}:{number}: malformed JSON line") from None
    else:
        raise TaskError(f"task.params.{key}: {value}: expected a .csv or .jsonl file")
    if not rows:
        raise TaskError(f"task.params.{key}: {value} has no rows")
    for column in columns:
        if column not in rows[0]:
            raise TaskError(f"task.params.{key}: {value} has no column {column!r} (columns: {', '.join(rows[0])})")
    return [{k: str(v) for k, v in row.items()} for row in rows]


def normalize_answer(text: str) -> str:
    """Lowercase, strip a leading 'label:'/'answer:' and surrounding punctuation and whitespace."""
    text = text.strip().lower()
    text = re.sub(r"^(label|answer)\s*:\s*", "", text)
    return re.sub(r"^[\W_]+|[\W_]+$", "", text)


class TabularTask(Task):
    """A task over a file of (input, target) rows; subclasses say which columns and how to score."""

    input_column: str
    target_column: str

    def _load(self) -> tuple[list[Example], list[Example]]:
        params = self.params
        columns = (self.input_column, self.target_column)
        rows = read_rows(self.base_dir, "path", params.path, columns)
        stem = Path(params.path).stem
        examples = [self._example(f"{stem}-{i}", row) for i, row in enumerate(rows)]
        if params.test_path:
            test_rows = read_rows(self.base_dir, "test_path", params.test_path, columns)
            test_stem = Path(params.test_path).stem
            return examples, [self._example(f"{test_stem}-test-{i}", row) for i, row in enumerate(test_rows)]
        order = list(range(len(examples)))
        random.Random(f"{self.name}-{self.seed}").shuffle(order)
        n_test = round(len(examples) * params.test_fraction)
        test_ids = set(order[:n_test])
        train = [e for i, e in enumerate(examples) if i not in test_ids]
        test = [e for i, e in enumerate(examples) if i in test_ids]
        return train, test

    def _example(self, example_id: str, row: dict[str, str]) -> Example:
        target = row[self.target_column].strip()
        return Example(example_id, row[self.input_column], {"target": target}, self._category(target))

    def _category(self, target: str) -> str:
        return ""

    def split(self, name: str) -> list[Example]:
        if not hasattr(self, "_splits"):
            self._splits = self._load()
        train, test = self._splits
        if name == "train":
            return list(train)
        if name == "test":
            if not test:
                raise TaskError("task.params: the test split is empty; raise test_fraction or give test_path")
            return list(test)
        raise TaskError(f"unknown split {name!r}; expected 'train' or 'test'")

    def system_prompt(self, style: str) -> str:
        raise NotImplementedError

    def messages(self, example: Example, style: str) -> list[Message]:
        if style not in self.prompt_styles:
            raise TaskError(f"unknown prompt style {style!r}; expected one of {self.prompt_styles}")
        return [{"role": "system", "content": self.system_prompt(style)}, {"role": "user", "content": example.user}]

    def few_shot_block(self) -> str:
        shots = self.split("train")[: self.params.few_shot]
        return "\n\n".join(f"Input: {e.user}\nAnswer: {e.reference['target']}" for e in shots)
