"""The task plug-in interface: prompts, references and a scorer, nothing stage-specific."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

Message = dict[str, str]


class TaskError(ValueError):
    """Bad task input (missing file, missing column, empty split); the message is shown as-is."""


class TaskParams(BaseModel):
    """Base for each task's own parameters; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Example:
    """One prompt of a task with its ground truth.

    `reference` is JSON-serialisable and holds whatever the scorer needs.
    `category` groups examples for balance reports (label, ticket kind, ...).
    """

    id: str
    user: str
    reference: dict[str, Any] = field(default_factory=dict)
    category: str = ""


class Task(ABC):
    """A task: a train and a test split, prompt styles, and a per-rule scorer.

    Prompt styles are named; every task offers at least "short" (what the student gets) and
    "full" (the expensive teacher configuration). The overall score of a completion is
    `all(score(...).values())`.
    """

    name: ClassVar[str]
    Params: ClassVar[type[TaskParams]] = TaskParams
    prompt_styles: ClassVar[tuple[str, ...]] = ("short", "full")
    # An open-ended task's `score` checks only the form of an answer (it is not empty): whether it is good is
    # for a judge model to say, and the benchmark's judge (`benchmark.judge`) runs for it by default.
    open_ended: ClassVar[bool] = False

    def __init__(self, params: TaskParams, seed: int, base_dir: Path) -> None:
        self.params = params
        self.seed = seed
        self.base_dir = base_dir  # relative data paths in params resolve against this

    @abstractmethod
    def split(self, name: str) -> list[Example]:
        """Deterministic examples of split "train" or "test" (disjoint by construction)."""

    @abstractmethod
    def messages(self, example: Example, style: str) -> list[Message]:
        """Chat messages (system + user) for one example in one prompt style."""

    @abstractmethod
    def score(self, completion: str, example: Example) -> dict[str, bool]:
        """Per-rule pass/fail of one completion."""

    def failure_modes(self, completion: str, example: Example) -> dict[str, bool]:
        """Named failures worth counting beyond pass/fail (True: it happened), e.g. an invented citation:
        the background note's "hallucinated fluency", fluent in form and wrong in fact. None by default."""
        return {}

    def read_answer(self, completion: str, example: Example) -> str | None:
        """What the scorer read from `completion` and what it expected ("read 42, reference 18"), shown with
        each answer the correctness filter drops; None where the scorer reads nothing simple."""
        return None

    def answer_reading(self) -> str | None:
        """How answers are read for scoring, naming the keys that set it. When the teacher's answers rarely
        pass, the filter's guard names this as a suspect beside the teacher: an extraction that reads the wrong
        thing looks exactly like a teacher that cannot do the task."""
        return None

    def labels(self) -> list[str] | None:
        """A label task's labels, each example's category naming its own; None: the task has none. The filter
        reports the labels no kept training example shows, which the student is never taught."""
        return None

    def answer_choices(self) -> list[str] | None:
        """The closed set every answer must be one of (a label task's labels), for constrained decoding; None:
        free text. The teacher is constrained to it at generate time, every system at benchmark time when
        `benchmark.constrained` is set."""
        return None

    def rubric(self) -> str | None:
        """What a good answer is, in words, for a judge model to grade against; None: the judge's generic one."""
        return None

    def vote_key(self, completion: str) -> str:
        """What samples of one prompt must share to count as agreeing (majority vote without a reference)."""
        return normalize_text(completion)

    def leaks(self, completion: str) -> bool:
        """Whether an answer to an unrelated prompt shows this task's behaviour (forgetting probe)."""
        return False

    def data_files(self) -> list[Path]:
        """Files the splits are read from. Their contents are part of each stage's fingerprint, so new rows
        in a data file rerun the stages (a generated task, like `support`, has none)."""
        return []


# A number not glued to a preceding word/number ("5-3" reads 5 and 3); thousands separators removed first.
NUMBER = re.compile(r"(?:(?<![\w.])-)?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def find_numbers(text: str) -> list[str]:
    """Every number in the text, in order, as written: negatives, decimals, and '1,234' read as 1234."""
    return NUMBER.findall(_THOUSANDS.sub("", text))


_PUNCTUATION = re.compile(r"[^\w\s.-]")
_EDGE_DOTS_AND_DASHES = re.compile(r"(?<!\w)[.-]+|[.-]+(?!\w)")


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation at the edges of words, collapse whitespace."""
    text = _PUNCTUATION.sub(" ", text.lower())
    return " ".join(_EDGE_DOTS_AND_DASHES.sub(" ", text).split())
