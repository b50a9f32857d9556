"""Short exact answers from a CSV or JSONL file: a number or a string extracted from the completion."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field

from pipeline.tasks._tabular import TabularParams, TabularTask, normalize_answer
from pipeline.tasks.base import Example, TaskError, find_numbers

_ANSWER = re.compile(r"answer\s*(?:is)?\s*:", re.IGNORECASE)
TOLERANCE = 1e-6


def extract_number(text: str) -> float | None:
    """The last number in the text: negatives, decimals, and '1,234' read as 1234; None without any."""
    found = find_numbers(text.replace("\u2212", "-"))
    return float(found[-1]) if found else None


def extract_string(text: str) -> str:
    """Normalised first line after the last 'answer:' if any, else of the whole completion."""
    parts = _ANSWER.split(text)
    chosen = parts[-1] if len(parts) > 1 else text
    lines = [line for line in chosen.splitlines() if line.strip()]
    return normalize_answer(lines[0]) if lines else ""


class ExactAnswerParams(TabularParams):
    """Where the questions and answers are, their type, and how the model is asked."""

    question_column: str = Field("question", description="The column that holds the question.")
    answer_column: str = Field("answer", description="The column that holds the reference answer.")
    answer_type: Literal["number", "string"] = Field(
        "number",
        description="number: the answer's last number, equal within 1e-6; string: the first line after the last "
        "'answer:', or of the whole answer.",
    )
    instruction: str = Field(
        "Answer the question. Give only the final answer.",
        description='The system prompt of the "short" style, and the start of the "full" one.',
    )


class ExactAnswerTask(TabularTask):
    """Answer each question with a short final answer, compared exactly (numbers within 1e-6)."""

    name = "exact_answer"
    Params = ExactAnswerParams
    params: ExactAnswerParams
    input_param, target_param = "question_column", "answer_column"

    def validate(self, train: list[Example], test: list[Example]) -> None:
        """In number mode every reference answer must hold a number."""
        if self.params.answer_type != "number":
            return
        for example in train + test:
            if extract_number(example.reference["target"]) is None:
                raise TaskError(
                    f"task.params.answer_column: {self.params.answer_column!r} of {example.id} is not a number: "
                    f"{example.reference['target']!r} (set answer_type: string for text answers)"
                )

    def read_answer(self, completion: str, example: Example) -> str | None:
        target = example.reference["target"]
        if self.params.answer_type == "number":
            got, want = extract_number(completion), extract_number(target)
            return f"read {'no number' if got is None else f'{got:g}'}, reference {want:g}"
        return f"read {extract_string(completion)!r}, reference {normalize_answer(target)!r}"

    def answer_reading(self) -> str | None:
        how = (
            "the last number of each answer"
            if self.params.answer_type == "number"
            else "the first line after the last 'answer:'"
        )
        return (
            f"task.params.answer_type={self.params.answer_type} reads {how}, compared with column "
            f"task.params.answer_column={self.params.answer_column!r}"
        )

    def score(self, completion: str, example: Example) -> dict[str, bool]:
        target = example.reference["target"]
        if self.params.answer_type == "number":
            got, want = extract_number(completion), extract_number(target)
            return {"answer": got is not None and want is not None and abs(got - want) <= TOLERANCE}
        return {"answer": extract_string(completion) == normalize_answer(target)}
