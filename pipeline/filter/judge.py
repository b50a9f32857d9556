"""The filter's LLM judge (`filter.judge`): the teacher grades each kept example against a rubric, 1 to 10,
in batches; a grade below the threshold, or one that cannot be read, drops the example."""

from __future__ import annotations

import re

from pipeline.config import ExperimentConfig, SamplingConfig

_SCORE = re.compile(r"\b(10|[1-9])\b")


def judge_prompt(rubric: str, messages: list[dict[str, str]], response: str) -> list[dict[str, str]]:
    question = "\n\n".join(m["content"] for m in messages if m["role"] != "system")
    return [
        {
            "role": "system",
            "content": "You grade assistant replies. "
            "Answer with one integer from 1 (worst) to 10 (best) and nothing else.",
        },
        {
            "role": "user",
            "content": f"Rubric: {rubric}\n\nPrompt:\n{question}\n\nReply:\n{response}\n\nScore (1-10):",
        },
    ]


def parse_judge_score(text: str) -> int | None:
    found = _SCORE.search(text)
    return int(found.group(1)) if found else None


class Judge:
    """The teacher grades kept examples in batches; loaded on first use."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.engine = None

    def grade(self, items: list[tuple[list[dict[str, str]], str]]) -> list[tuple[int | None, str]]:
        from pipeline.engines import load_engine, model_for  # looked up at use: tests stand a grader in

        if self.engine is None:
            teacher = self.config.teacher
            self.engine = load_engine(model_for(teacher.model, teacher.engine), teacher.engine, self.config.seed)
        rubric = self.config.filter.judge.rubric
        conversations = [judge_prompt(rubric, messages, response) for messages, response in items]
        sampling = SamplingConfig(temperature=0.0, max_tokens=8, seed=self.config.seed)
        generations = self.engine.generate(conversations, sampling, progress=False)
        return [(parse_judge_score(g.completions[0].text), g.completions[0].text) for g in generations]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
