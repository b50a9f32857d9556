"""What a judge model is asked and how its replies are read, shared by the filter's judge (grading kept
examples) and the benchmark's (grading every system's answers and comparing each with the teacher's).

Replies are read strictly: a grade is one integer from 1 to 10 ("7", "Score: 7", "7/10", "I would say 7."),
and a preference is A, B or tie ("A", "[[B]]", "Tie."). Anything else ("7 or 8", "11", "Both are good") is
unparseable and counted as such by the caller, never guessed at.
"""

from __future__ import annotations

import re

Conversation = list[dict[str, str]]

GRADES = [str(grade) for grade in range(1, 11)]  # what a constrained judge may answer when grading
PREFERENCES = ["A", "B", "tie"]  # ... and when comparing two replies
GENERIC_RUBRIC = "The reply does what the user asked, is correct, and is clear and concise."


def rubric_for(configured: str | None, task_rubric: str | None) -> str:
    """The rubric a judge grades against: the configured one, else the task's (`Task.rubric()`), else generic."""
    return configured or task_rubric or GENERIC_RUBRIC


_GRADE_SYSTEM = (
    "You grade assistant replies against a rubric. Answer with one integer from 1 (worst) to 10 (best) and "
    "nothing else."
)
_PAIR_SYSTEM = (
    "You compare two assistant replies to the same prompt against a rubric. Answer A if reply A is better, B if "
    "reply B is better, or tie, and nothing else."
)
_NUMBER = re.compile(r"-?\d+")
_OUT_OF_TEN = re.compile(r"(\d+)\s*/\s*10\b")
_PREFERENCE = re.compile(r"^\W*(?:\[\[)?\s*(a|b|tie)\s*(?:\]\])?\W*$", re.IGNORECASE)


def grade_prompt(rubric: str, prompt: str, reply: str) -> Conversation:
    """Ask for a 1-10 grade of `reply` to `prompt` against `rubric`."""
    return [
        {"role": "system", "content": _GRADE_SYSTEM},
        {"role": "user", "content": f"Rubric: {rubric}\n\nPrompt:\n{prompt}\n\nReply:\n{reply}\n\nScore (1-10):"},
    ]


def parse_grade(text: str) -> int | None:
    """The grade in a judge's reply: its one integer, which must be 1-10 ("x/10" read as x); None otherwise."""
    numbers = _NUMBER.findall(_OUT_OF_TEN.sub(r"\1", text))
    if len(numbers) != 1:
        return None
    grade = int(numbers[0])
    return grade if 1 <= grade <= 10 else None


def pair_prompt(rubric: str, prompt: str, reply_a: str, reply_b: str) -> Conversation:
    """Ask which of two replies to `prompt` is better against `rubric`: A, B or tie."""
    return [
        {"role": "system", "content": _PAIR_SYSTEM},
        {
            "role": "user",
            "content": f"Rubric: {rubric}\n\nPrompt:\n{prompt}\n\nReply A:\n{reply_a}\n\nReply B:\n{reply_b}\n\n"
            "Which reply is better (A, B or tie)?",
        },
    ]


def parse_preference(text: str) -> str | None:
    """ "A", "B" or "tie" from a judge's reply that says exactly one of them; None otherwise."""
    found = _PREFERENCE.match(text.strip())
    if not found:
        return None
    choice = found.group(1).lower()
    return "tie" if choice == "tie" else choice.upper()
