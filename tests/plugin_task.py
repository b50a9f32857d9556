"""A user-style task plug-in (selected in YAML as `tests.plugin_task:ParityTask`), used by stage tests."""

from __future__ import annotations

from pipeline.tasks.base import Example, Task, TaskError, TaskParams


class ParityParams(TaskParams):
    num_train: int = 10
    num_test: int = 4


class ParityTask(Task):
    """Say whether a number is even or odd; the answer must contain the right word."""

    name = "parity"
    Params = ParityParams

    def split(self, name: str) -> list[Example]:
        count, offset = (self.params.num_train, 0) if name == "train" else (self.params.num_test, 1000)
        return [
            Example(
                f"parity-{name}-{i}",
                f"Is {offset + i} even or odd?",
                {"answer": "even" if i % 2 == 0 else "odd"},
                "even" if i % 2 == 0 else "odd",
            )
            for i in range(count)
        ]

    def messages(self, example: Example, style: str) -> list[dict[str, str]]:
        if style not in self.prompt_styles:
            raise TaskError(f"unknown prompt style {style!r}")
        system = "Answer even or odd." if style == "short" else "You judge parity. Reply with one word: even or odd."
        return [{"role": "system", "content": system}, {"role": "user", "content": example.user}]

    def score(self, completion: str, example: Example) -> dict[str, bool]:
        return {"answer": example.reference["answer"] in completion.lower().split()}

    def failure_modes(self, completion: str, example: Example) -> dict[str, bool]:
        """Answers with the wrong parity word (a confident wrong answer, as against no answer)."""
        wrong = "odd" if example.reference["answer"] == "even" else "even"
        return {"off_label": wrong in completion.lower().split()}

    def leaks(self, completion: str) -> bool:
        return "parity" in completion.lower()
