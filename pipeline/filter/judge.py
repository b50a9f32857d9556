"""The filter's LLM judge (`filter.judge`): the teacher grades each kept example against a rubric, 1 to 10,
in batches; a grade below the threshold, or one that cannot be read (pipeline/judging.py reads strictly), drops
the example."""

from __future__ import annotations

from pipeline.config import ExperimentConfig, SamplingConfig
from pipeline.judging import grade_prompt, parse_grade, rubric_for
from pipeline.tasks import task_for


class Judge:
    """The teacher grades kept examples in batches; loaded on first use."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.engine = None
        self.rubric = ""  # set with the engine, on first use

    def grade(self, items: list[tuple[list[dict[str, str]], str]]) -> list[tuple[int | None, str]]:
        from pipeline.engines import load_engine, model_for  # looked up at use: tests stand a grader in

        if self.engine is None:
            teacher = self.config.teacher
            self.engine = load_engine(model_for(teacher.model, teacher.engine), teacher.engine, self.config.seed)
            self.rubric = rubric_for(self.config.filter.judge.rubric, task_for(self.config).rubric())
        conversations = [
            grade_prompt(self.rubric, "\n\n".join(m["content"] for m in messages if m["role"] != "system"), response)
            for messages, response in items
        ]
        sampling = SamplingConfig(temperature=0.0, max_tokens=8, seed=self.config.seed)
        generations = self.engine.generate(conversations, sampling, progress=False)
        return [(parse_grade(g.completions[0].text), g.completions[0].text) for g in generations]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
