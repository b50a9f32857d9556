"""Label classification from a CSV or JSONL file with a text column and a label column (no user code).

Scored by exact label match after normalisation (case, surrounding punctuation, a 'Label:' prefix).
"""

from __future__ import annotations

from pipeline.tasks._tabular import TabularParams, TabularTask, normalize_answer
from pipeline.tasks.base import Example, TaskError


class ClassificationParams(TabularParams):
    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] | None = None  # allowed labels; inferred from the data when absent
    instruction: str = "Classify the text. Answer with one label only."


class ClassificationTask(TabularTask):
    name = "classification"
    Params = ClassificationParams

    @property
    def input_column(self) -> str:  # type: ignore[override]
        return self.params.text_column

    @property
    def target_column(self) -> str:  # type: ignore[override]
        return self.params.label_column

    def _category(self, target: str) -> str:
        return target

    def labels(self) -> list[str]:
        if self.params.labels:
            return list(self.params.labels)
        return sorted({e.reference["target"] for e in self.split("train")})

    def _load(self):
        train, test = super()._load()
        if self.params.labels:
            allowed = {normalize_answer(label) for label in self.params.labels}
            for example in train + test:
                if normalize_answer(example.reference["target"]) not in allowed:
                    raise TaskError(
                        f"task.params.labels: label {example.reference['target']!r} of {example.id} is not in the list"
                    )
        return train, test

    def system_prompt(self, style: str) -> str:
        if style == "short":
            return self.params.instruction
        shots = self.few_shot_block()
        prompt = f"{self.params.instruction}\nAllowed labels: {', '.join(self.labels())}."
        return prompt + (f"\n\nExamples:\n\n{shots}" if shots else "")

    def score(self, completion: str, example: Example) -> dict[str, bool]:
        return {"label": normalize_answer(completion) == normalize_answer(example.reference["target"])}
