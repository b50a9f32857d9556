"""Task registry: a task is selected by name in the YAML config, or as `module:Class`."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.tasks.base import Example, Task, TaskError, TaskParams

__all__ = ["Example", "Task", "TaskError", "TaskParams", "build_task", "task_for", "TASKS"]


# Registered tasks, imported only when selected.
TASKS = {
    "support": "pipeline.tasks.support:SupportTask",
    "classification": "pipeline.tasks.classification:ClassificationTask",
    "exact_answer": "pipeline.tasks.exact_answer:ExactAnswerTask",
    "chat": "pipeline.tasks.chat:ChatTask",
}


def build_task(name: str, params: dict[str, Any], seed: int, base_dir: Path) -> Task:
    """Instantiate a task by registry name or `package.module:ClassName`."""
    if ":" not in name and name not in TASKS:
        raise TaskError(f"task.name: unknown task {name!r}; choose one of {sorted(TASKS)} or 'module:Class'")
    module_name, _, class_name = TASKS.get(name, name).partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise TaskError(f"task.name: cannot import {name!r}: {exc}") from None
    try:
        typed = cls.Params.model_validate(params or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise TaskError(f"task.params.{loc}: {err['msg']}") from None
    return cls(typed, seed=seed, base_dir=base_dir)


def task_for(config: Any) -> Task:
    """The experiment's task (`task.name` with `task.params`, the run's seed, paths relative to the working
    directory): what every stage builds its prompts, splits and scores from. Every prompt style the config names
    must be one of the task's: a typo in a later stage's fails before the first stage, not after generation."""
    task = build_task(config.task.name, config.task.params, config.seed, config.base_dir)
    named = {"teacher.prompt_style": config.teacher.prompt_style, "student.prompt_style": config.student.prompt_style}
    named |= {f"benchmark.systems.{s.name}.prompt_style": s.prompt_style for s in config.benchmark.systems}
    for key, style in named.items():
        if style not in task.prompt_styles:
            raise TaskError(f"{key}: {style!r} is not a prompt style of this task; choose one of {task.prompt_styles}")
    return task
