"""Short exact answers from a CSV or JSONL file: a number or a string extracted from the completion."""

from __future__ import annotations

import re
from typing import Literal

from pipeline.tasks._tabular import TabularParams, TabularTask, normalize_answer
from pipeline.tasks.base import Example

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_number(text: str) -> float | None:
    """The last number in the text ('1,234' reads as 1234)."""
    found = NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", text))
    return float(found[-1]) if found else None


def extract_string(text: str) -> str:
    """Text after the last 'answer:' if any, else the first line."""
    parts = re.split(r"answer\s*:", text, flags=re.IGNORECASE)
    chosen = parts[-1] if len(parts) > 1 else text.strip().splitlines()[0] if text.strip() else ""
    return normalize_answer(chosen)


class ExactAnswerParams(TabularParams):
    question_column: str = "question"
    answer_column: str = "answer"
    answer_type: Literal["number", "string"] = "number"
    instruction: str = "Answer the question. Give only the final answer."


class ExactAnswerTask(TabularTask):
    name = "exact_answer"
    Params = ExactAnswerParams

    @property
    def input_column(self) -> str:  # type: ignore[override]
        return self.params.question_column

    @property
    def target_column(self) -> str:  # type: ignore[override]
        return self.params.answer_column

    def system_prompt(self, style: str) -> str:
        if style == "short":
            return self.params.instruction
        shots = self.few_shot_block()
        return self.params.instruction + (f"\n\nExamples:\n\n{shots}" if shots else "")

    def score(self, completion: str, example: Example) -> dict[str, bool]:
        target = example.reference["target"]
        if self.params.answer_type == "number":
            got, want = extract_number(completion), extract_number(target)
            return {"answer": got is not None and want is not None and abs(got - want) < 1e-6}
        return {"answer": extract_string(completion) == normalize_answer(target)}
