"""The filter's LLM judge (`filter.judge`): the teacher grades each kept example against a rubric, 1 to 10,
in batches; a grade below the threshold, or one that cannot be read (pipeline/judging.py reads strictly), drops
the example. Every reply is kept in the filter's folder (`judge_grades.jsonl`), keyed by what shapes it, so a
killed filter's rerun, or one with another threshold, asks the judge only what it has not answered."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.config import SamplingConfig, TeacherConfig, engine_identity
from pipeline.files import read_jsonl
from pipeline.judging import grade_prompt, parse_grade

GRADES = "judge_grades.jsonl"  # the judge's replies, in the filter's folder


def judge_identity(teacher: TeacherConfig) -> dict[str, Any]:
    """What decides the judge's replies besides their prompts: the teacher and what its engine answers with (the
    filter's fingerprint holds it, and each cached reply's key)."""
    return {"model": teacher.model, "engine": engine_identity(teacher.engine.model_dump())}


class Judge:
    """The teacher grades kept examples in batches against `rubric`; its engine is loaded on the first request not
    yet answered. Replies are cached in `folder` (the filter stage's)."""

    def __init__(self, teacher: TeacherConfig, seed: int, rubric: str, folder: Path) -> None:
        self.teacher, self.seed, self.rubric = teacher, seed, rubric
        self.engine = None
        self.cache_path = folder / GRADES
        rows = read_jsonl(self.cache_path, on_malformed=lambda *_: None) if self.cache_path.is_file() else []
        self.replies = {row["key"]: row["reply"] for row in rows}  # a torn last line is skipped

    def _key(self, conversation: list[dict[str, str]]) -> str:
        shape = [judge_identity(self.teacher), self.seed, conversation]
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()

    def grade(self, items: list[tuple[list[dict[str, str]], str]]) -> list[tuple[int | None, str]]:
        from pipeline.engines import load_engine, model_for  # looked up at use: tests stand a grader in

        conversations = [
            grade_prompt(self.rubric, "\n\n".join(m["content"] for m in messages if m["role"] != "system"), response)
            for messages, response in items
        ]
        keys = [self._key(c) for c in conversations]
        missing = {k: c for k, c in zip(keys, conversations, strict=True) if k not in self.replies}
        if missing:
            if self.engine is None:
                teacher = self.teacher
                self.engine = load_engine(model_for(teacher.model, teacher.engine), teacher.engine, self.seed)
            sampling = SamplingConfig(temperature=0.0, max_tokens=8, seed=self.seed)
            generations = self.engine.generate(list(missing.values()), sampling, progress=False)
            texts = [g.completions[0].text if g.completions else "" for g in generations]
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with self.cache_path.open("a") as fh:
                for key, text in zip(missing, texts, strict=True):
                    fh.write(json.dumps({"key": key, "reply": text}) + "\n")
                    self.replies[key] = text
                fh.flush()
                os.fsync(fh.fileno())
        return [(parse_grade(self.replies[k]), self.replies[k]) for k in keys]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
