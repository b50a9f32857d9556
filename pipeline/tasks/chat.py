"""Open-ended chat from a JSONL (or CSV) file of prompts, reference answers optional: "answer this customer",
"summarise this ticket", "rewrite this politely". No scorer of its own: a judge model grades the answers at
benchmark time against the task's rubric (`benchmark.judge`), and reference answers, where given, are compared
by ROUGE-L and chrF.

Two row shapes, which may be mixed in one file:
- `{"messages": [{"role": "system", ...}?, {"role": "user", ...}, {"role": "assistant", ...}?]}`: one user turn,
  an optional system turn before it (that row's own instruction) and an optional assistant turn after it (the
  reference answer);
- named columns: `prompt_column` (the user turn) and, where present and non-empty, `reference_column`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pipeline.tasks._tabular import TabularParams, TabularTask, read_records, require_text
from pipeline.tasks.base import Example, TaskError


class ChatParams(TabularParams):
    """Where the prompts are, how the model is asked, and what a good answer is."""

    prompt_column: str = Field("prompt", description="The column that holds the request, in rows without messages.")
    reference_column: str = Field(
        "reference", description="The column that holds a reference answer; optional in each row."
    )
    instruction: str = Field(
        "You are a helpful assistant. Do what the user asks, clearly and concisely.",
        description='The system prompt of the "short" style, unless a row has its own system turn.',
    )
    rubric: str = Field(
        "The reply does what the user asked, is correct, and is clear and concise.",
        description='What a good answer is: in the "full" prompt, and what the judge grades against.',
    )
    few_shot: int = Field(2, description='Rows with a reference answer shown in the "full" prompt, held out of train.')


class ChatTask(TabularTask):
    """Answer each prompt; the benchmark's judge says how well."""

    name = "chat"
    Params = ChatParams
    params: ChatParams
    open_ended = True
    input_param, target_param = "prompt_column", "reference_column"

    def read_examples(self, key: str, value: str, id_prefix: str) -> list[Example]:
        examples = []
        for number, row in enumerate(read_records(self.base_dir, key, value), 1):
            if "messages" in row:
                system, user, reference = _turns(key, value, number, row["messages"])
            else:
                system = None
                user = require_text(key, value, number, row, self.params.prompt_column)
                reference = row.get(self.params.reference_column)
                reference = str(reference).strip() if reference is not None and str(reference).strip() else None
            examples.append(Example(f"{id_prefix}-{number - 1}", user.strip(), {"target": reference, "system": system}))
        return examples

    def system_prompt(self, style: str, example: Example) -> str:
        """A row's own system turn, else `instruction`; "full" adds the rubric and the few-shot examples."""
        instruction = example.reference.get("system") or self.params.instruction
        if style == "short":
            return instruction
        shots = self.few_shot_block()
        full = f"{instruction}\nA good reply: {self.params.rubric}"
        return full + (f"\n\nExamples:\n\n{shots}" if shots else "")

    def pick_few_shot(self, train: list[Example]) -> list[Example]:
        """The first `few_shot` train rows that have a reference answer."""
        return [e for e in train if e.reference["target"]][: self.params.few_shot]

    def score(self, completion: str, example: Example) -> dict[str, bool]:
        """Only the form: an answer was given. How good it is, the judge says."""
        return {"answered": bool(completion.strip())}

    def rubric(self) -> str | None:
        return self.params.rubric


def _turns(key: str, value: str, number: int, messages: Any) -> tuple[str | None, str, str | None]:
    """(system, user, reference) of a `messages` row, or a TaskError naming the row and what is wrong."""
    where = f"task.params.{key}: {value} row {number}: column 'messages'"
    if not isinstance(messages, list) or not messages:
        raise TaskError(f"{where}: expected a non-empty list of {{role, content}} turns")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) or "role" not in turn:
            raise TaskError(f"{where}: turn {i} is not a {{role, content}} object with text content")
    roles = [turn["role"] for turn in messages]
    if roles not in (["user"], ["system", "user"], ["user", "assistant"], ["system", "user", "assistant"]):
        raise TaskError(
            f"{where}: roles {roles}; expected an optional system turn, one user turn, an optional assistant turn"
        )
    by_role = {turn["role"]: turn["content"].strip() for turn in messages}
    if not by_role["user"]:
        raise TaskError(f"{where}: the user turn is empty")
    return by_role.get("system") or None, by_role["user"], by_role.get("assistant") or None
