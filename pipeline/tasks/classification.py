"""Label classification from a CSV or JSONL file with a text column and a label column (no user code).

Scored by exact label match after normalisation (case, punctuation, whitespace, a 'Label:' prefix).
"""

from __future__ import annotations

from functools import cached_property

from pydantic import Field

from pipeline.tasks._tabular import TabularParams, TabularTask, normalize_answer
from pipeline.tasks.base import Example, TaskError


class ClassificationParams(TabularParams):
    """Where the texts and labels are, and how the model is asked."""

    text_column: str = Field("text", description="The column that holds the text to classify.")
    label_column: str = Field("label", description="The column that holds its label.")
    labels: list[str] | None = Field(None, description="The allowed labels; null: every label in the data, sorted.")
    instruction: str = Field(
        "Classify the text. Answer with one label only.",
        description='The system prompt of the "short" style, and the start of the "full" one.',
    )
    # Constrained, the teacher cannot answer conversationally, run past max_tokens or invent a label. Free, the
    # filters drop what is not a label.
    constrained: bool = Field(True, description="The teacher answers through constrained decoding to the labels.")


class ClassificationTask(TabularTask):
    """Answer each text with exactly one label."""

    name = "classification"
    Params = ClassificationParams
    params: ClassificationParams
    input_param, target_param = "text_column", "label_column"

    def category(self, target: str) -> str:
        """The label as `labels` spells it (the data may write it in another case), else as the data writes it."""
        return self._spelled.get(normalize_answer(target), target)

    @cached_property
    def _spelled(self) -> dict[str, str]:
        return {normalize_answer(label): label for label in self.params.labels or []}

    def validate(self, train: list[Example], test: list[Example]) -> None:
        """With `labels` given, every label in the data must be one of them."""
        if self.params.labels is None:
            return
        allowed = {normalize_answer(label) for label in self.params.labels}
        for example in train + test:
            if normalize_answer(example.reference["target"]) not in allowed:
                raise TaskError(
                    f"task.params.labels: label {example.reference['target']!r} of {example.id} is not one of "
                    f"{self.params.labels}"
                )

    def labels(self) -> list[str]:
        """The allowed labels: as configured, else sorted-unique over the data (both splits and the few-shot rows)."""
        if self.params.labels:
            return list(self.params.labels)
        train, test, shots = self.splits()
        return sorted({e.reference["target"] for e in train + test + shots})

    def full_instruction(self) -> str:
        return f"{self.params.instruction}\nAllowed labels: {', '.join(self.labels())}."

    def answer_choices(self) -> list[str] | None:
        return self.labels() if self.params.constrained else None

    def score(self, completion: str, example: Example) -> dict[str, bool]:
        return {"label": normalize_answer(completion) == normalize_answer(example.reference["target"])}

    def read_answer(self, completion: str, example: Example) -> str | None:
        target = normalize_answer(example.reference["target"])
        return f"read {normalize_answer(completion)[:40]!r}, reference {target!r}"

    def answer_reading(self) -> str | None:
        return (
            f"the whole answer is compared with column task.params.label_column={self.params.label_column!r} "
            "after normalisation"
        )

    def failure_modes(self, completion: str, example: Example) -> dict[str, bool]:
        """`invalid_label`: the answer is none of the labels (a sentence, a truncated or an invented label)."""
        return {"invalid_label": not self._is_label(completion)}

    def _is_label(self, completion: str) -> bool:
        return normalize_answer(completion) in self._normalized_labels()

    def leaks(self, completion: str) -> bool:
        """A general question answered with a label of this task: bare, or leading the answer as whole words
        (a tuned Gemma 3 270M answered "What is 14 plus 16?" with "positive 14")."""
        answer = normalize_answer(completion)
        return any(answer == label or answer.startswith(f"{label} ") for label in self._normalized_labels())

    def _normalized_labels(self) -> set[str]:
        return {normalize_answer(label) for label in self.labels()}
