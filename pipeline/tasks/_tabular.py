"""Shared loading, splitting and prompting for the file-backed generic tasks (classification, exact answers)."""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from pipeline.tasks.base import Example, Message, Task, TaskError, TaskParams, normalize_text

_PREFIX = re.compile(r"^\W*(?:final\s+)?(?:label|answer)\W*?:\s*", re.IGNORECASE)


class TabularParams(TaskParams):
    """Parameters common to tasks read from a CSV or JSONL file."""

    path: str = Field(description="The data file, CSV or JSONL, relative to the working directory.")
    test_path: str | None = Field(None, description="A separate test file; null: test_fraction of `path` is held out.")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="Share of `path`'s rows held out for the test split.")
    few_shot: int = Field(
        4, ge=0, description='Rows shown with their answers in the "full" prompt, held out of the train split.'
    )
    instruction: str = Field(description='The system prompt of the "short" style, and the start of the "full" one.')


def resolve(base_dir: Path, value: str) -> Path:
    """A params path, relative ones resolved against `base_dir`."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def read_records(base_dir: Path, key: str, value: str) -> list[dict[str, Any]]:
    """The rows of a CSV or JSONL file (by extension) as read, JSON values kept; errors name the config key, the
    file and the line."""
    path = resolve(base_dir, value)
    where = f"task.params.{key}"
    if not path.is_file():
        raise TaskError(f"{where}: file not found: {value} (looked for {path})")
    suffix = path.suffix.lower()
    rows: list[Any]
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    elif suffix in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise TaskError(f"{where}: {value} line {number}: malformed JSON") from None
            if not isinstance(row, dict):
                raise TaskError(f"{where}: {value} line {number}: expected a JSON object")
            rows.append(row)
    else:
        raise TaskError(f"{where}: {value}: expected a .csv or .jsonl file")
    if not rows:
        raise TaskError(f"{where}: {value} has no rows")
    return rows


def require_text(key: str, value: str, number: int, row: dict[str, Any], column: str) -> str:
    """Row `number`'s `column` as non-empty text, else a TaskError naming the row, the column and those there are."""
    where = f"task.params.{key}"
    if column not in row:
        available = ", ".join(repr(str(c)) for c in row)
        raise TaskError(f"{where}: {value} row {number} has no column {column!r} (columns: {available})")
    if row[column] is None or not str(row[column]).strip():
        raise TaskError(f"{where}: {value} row {number}: column {column!r} is empty")
    return str(row[column])


def read_rows(base_dir: Path, key: str, value: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a CSV or JSONL file, every value as text, each of `columns` present and non-empty."""
    rows = read_records(base_dir, key, value)
    for number, row in enumerate(rows, 1):
        for column in columns:
            require_text(key, value, number, row, column)
    return [{str(k): "" if v is None else str(v) for k, v in row.items()} for row in rows]


def normalize_answer(text: str) -> str:
    """Lowercase, drop a leading 'label:'/'answer:' and punctuation around words, collapse whitespace."""
    return normalize_text(_PREFIX.sub("", text.strip()))


class TabularTask(Task):
    """A task over a file of (input, target) rows; subclasses name the params that hold the two column names,
    and give the full prompt's instruction and the scoring."""

    params: TabularParams
    input_param: ClassVar[str]  # the params field naming the column that holds the user prompt
    target_param: ClassVar[str]  # ... and the one holding the reference answer

    @property
    def input_column(self) -> str:
        return getattr(self.params, self.input_param)

    @property
    def target_column(self) -> str:
        return getattr(self.params, self.target_param)

    def full_instruction(self) -> str:
        """The "full" prompt's instruction, before its few-shot examples."""
        return self.params.instruction

    def system_prompt(self, style: str, example: Example) -> str:
        """The system message of a prompt style for `example`: the instruction alone ("short"), or the full
        instruction and the few-shot examples ("full")."""
        if style == "short":
            return self.params.instruction
        shots = self.few_shot_block()
        return self.full_instruction() + (f"\n\nExamples:\n\n{shots}" if shots else "")

    def category(self, target: str) -> str:
        """Balance group of an example with this target."""
        return ""

    def validate(self, train: list[Example], test: list[Example]) -> None:
        """Subclass hook: reject bad data with a TaskError."""

    def _example(self, example_id: str, row: dict[str, str]) -> Example:
        target = row[self.target_column].strip()
        return Example(example_id, row[self.input_column].strip(), {"target": target}, self.category(target))

    def read_examples(self, key: str, value: str, id_prefix: str) -> list[Example]:
        """The examples of one data file (`task.params.<key>` = `value`), ids `<id_prefix>-<row index>`."""
        rows = read_rows(self.base_dir, key, value, (self.input_column, self.target_column))
        return [self._example(f"{id_prefix}-{i}", row) for i, row in enumerate(rows)]

    def _read_splits(self) -> tuple[list[Example], list[Example]]:
        """The data file(s) as (train, test), before the few-shot examples are taken out of train."""
        params = self.params
        examples = self.read_examples("path", params.path, Path(params.path).stem)
        if params.test_path:
            test_prefix = f"{Path(params.test_path).stem}-test"
            train, test = examples, self.read_examples("test_path", params.test_path, test_prefix)
        else:
            order = list(range(len(examples)))
            random.Random(self.seed).shuffle(order)
            held_out = set(order[: round(len(examples) * params.test_fraction)])
            train = [e for i, e in enumerate(examples) if i not in held_out]
            test = [e for i, e in enumerate(examples) if i in held_out]
        self.validate(train, test)
        return train, test

    def data_files(self) -> list[Path]:
        paths = [self.params.path, *([self.params.test_path] if self.params.test_path else [])]
        return [resolve(self.base_dir, value) for value in paths]

    def splits(self) -> tuple[list[Example], list[Example], list[Example]]:
        """(train, test, few-shot examples), read once. The few-shot examples are rows of the train part that the
        full prompt shows with their answers; they are held out of the train split, as the support task's are, so
        the teacher is never asked a question its own prompt answers (a copied answer would pass the filter's
        correctness check and count as the teacher doing the task)."""
        if not hasattr(self, "_splits"):
            train, test = self._read_splits()
            shots = self.pick_few_shot(train)
            shown = {e.id for e in shots}
            self._splits = ([e for e in train if e.id not in shown], test, shots)
        return self._splits

    def split(self, name: str) -> list[Example]:
        """Train or test examples in file order; the test split is a seeded sample unless `test_path` is set, and
        the few-shot examples are in neither."""
        if name not in ("train", "test"):
            raise TaskError(f"unknown split {name!r}; expected 'train' or 'test'")
        train, test, shots = self.splits()
        if name == "test" and not test:
            raise TaskError(
                f"task.params.test_fraction: the test split is empty ({len(train)} rows, "
                f"test_fraction={self.params.test_fraction}); raise test_fraction or set test_path"
            )
        if name == "train" and not train:
            raise TaskError(
                f"task.params.test_fraction: the train split is empty ({len(test)} rows held out for test, "
                f"{len(shots)} shown as few-shot examples); lower test_fraction or few_shot, or add rows"
            )
        return list(train if name == "train" else test)

    def messages(self, example: Example, style: str) -> list[Message]:
        """System prompt of the style, then the example's input as the user turn."""
        if style not in self.prompt_styles:
            raise TaskError(f"unknown prompt style {style!r}; expected one of {', '.join(self.prompt_styles)}")
        return [
            {"role": "system", "content": self.system_prompt(style, example)},
            {"role": "user", "content": example.user},
        ]

    def few_shot_examples(self) -> list[Example]:
        return self.splits()[2]

    def pick_few_shot(self, train: list[Example]) -> list[Example]:
        """Up to `few_shot` of the train rows, taken round-robin over categories so labels are balanced."""
        by_category: dict[str, list[Example]] = {}
        for example in train:
            by_category.setdefault(example.category, []).append(example)
        queues = [by_category[c] for c in sorted(by_category)]
        shots: list[Example] = []
        for i in range(max(map(len, queues), default=0)):
            shots += [q[i] for q in queues if i < len(q)]
        return shots[: self.params.few_shot]

    def few_shot_block(self) -> str:
        """The few-shot examples as 'Input:/Answer:' pairs ('' when few_shot is 0)."""
        return "\n\n".join(f"Input: {e.user}\nAnswer: {e.reference['target']}" for e in self.few_shot_examples())
