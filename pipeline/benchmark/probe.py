"""General-capability probe: closed questions outside any task, to measure forgetting and leakage.

Probe accuracy on the untuned vs the tuned student shows lost base capability (catastrophic forgetting);
the leakage rate counts general answers that drift into the task's behaviour (the task's `leaks`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from msgspec import UNSET, UnsetType, structs

from pipeline import names
from pipeline.benchmark.results import ForgettingChange, McNemarCounts, ProbeSummary
from pipeline.benchmark.stats import mcnemar
from pipeline.chat_templates import worked_example_turns
from pipeline.console import PipelineError, log
from pipeline.hardware import release_memory
from pipeline.probe_questions import ProbeQuestion, load_probe
from pipeline.tasks.base import NUMBER, find_numbers

if TYPE_CHECKING:
    from pipeline.config import LmEvalConfig

PROBE_SYSTEM = "You are a helpful assistant."


def probe_messages(question: ProbeQuestion, shots: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """A neutral system prompt, the worked examples as earlier turns, and the question: no task instruction."""
    system = {"role": "system", "content": PROBE_SYSTEM}
    return [system, *worked_example_turns(shots), {"role": "user", "content": question.question}]


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def _numbers(text: str) -> set[float]:
    return {float(n) for n in find_numbers(text)}


def probe_correct(completion: str, question: ProbeQuestion) -> bool:
    """Whether an accepted answer appears as whole words in the completion (numeric answers compare as numbers)."""
    words, numbers = _words(completion), _numbers(completion)
    for answer in question.answers:
        if NUMBER.fullmatch(answer.strip()):
            if float(answer) in numbers:
                return True
        elif _words(answer).strip() and _words(answer) in words:
            return True
    return False


def summarize_probe(
    completions: Sequence[str],
    questions: Sequence[ProbeQuestion],
    leaks: Callable[[str], bool],
    task_categories: Collection[str] = (),
) -> ProbeSummary:
    """Accuracy, leakage rate (share of completions where `leaks` is true) and n over the questions outside
    `task_categories` (the categories the task itself trains), and accuracy and n per category (all of them)."""
    correct = [probe_correct(c, q) for c, q in zip(completions, questions, strict=True)]
    by_category: dict[str, list[bool]] = defaultdict(list)
    for ok, q in zip(correct, questions, strict=True):
        by_category[q.category].append(ok)
    general = [
        (ok, c) for ok, c, q in zip(correct, completions, questions, strict=True) if q.category not in task_categories
    ]
    n = len(general)
    return ProbeSummary(
        accuracy=sum(ok for ok, _ in general) / n if n else float("nan"),
        leakage_rate=sum(bool(leaks(c)) for _, c in general) / n if n else float("nan"),
        n=n,
        per_category={cat: sum(v) / len(v) for cat, v in sorted(by_category.items())},
        per_category_n={cat: len(v) for cat, v in sorted(by_category.items())},
        task_categories=sorted(task_categories) if task_categories else UNSET,
    )


def paired_probe_tests(
    records: Sequence[dict[str, Any]], base: str, tuned: str, task_categories: Collection[str] = ()
) -> ForgettingChange:
    """Exact McNemar tests of `tuned` against `base` on the same probe questions (outside `task_categories`):
    is its change in probe accuracy, and in leakage, beyond what those questions' noise allows?"""
    category = {q.id: q.category for q in load_probe()}
    rows = [r for r in records if r["kind"] == "probe" and category.get(r["id"]) not in task_categories]
    by_system = {name: {r["id"]: r for r in rows if r["system"] == name} for name in (base, tuned)}
    ids = sorted(by_system[base].keys() & by_system[tuned].keys())

    def paired(key: str) -> McNemarCounts:
        test = mcnemar([bool(by_system[tuned][i][key]) for i in ids], [bool(by_system[base][i][key]) for i in ids])
        return McNemarCounts(tuned_only=test["a_only"], base_only=test["b_only"], p_value=test["p_value"])

    return ForgettingChange(accuracy_test=paired("correct"), leakage_rate_test=paired("leak"))


def forgetting_change(
    probed: dict[str, ProbeSummary],
    records: Sequence[dict[str, Any]],
    task_categories: Collection[str] = (),
    against: str = names.STUDENT_BASE,
) -> ForgettingChange | UnsetType:
    """The tuned student against `against` (the untuned student; the teacher, for a student pruned from it) on the
    probe, with the paired tests; UNSET unless both took it."""
    if names.STUDENT_TUNED not in probed or against not in probed:
        return UNSET
    tuned, base = probed[names.STUDENT_TUNED], probed[against]
    return structs.replace(
        paired_probe_tests(records, against, names.STUDENT_TUNED, task_categories),
        accuracy=tuned.accuracy - base.accuracy,
        leakage_rate=tuned.leakage_rate - base.leakage_rate,
    )


def run_lm_eval(config: LmEvalConfig, students: dict[str, tuple[str, str | None]]) -> dict[str, Any]:
    """lm-evaluation-harness scores of each student ({name: (model folder, LoRA adapter or None)}).

    A known failure of that harness is an adapter silently not applied; so the per-sample results of the
    tuned and untuned student are compared, and identical ones are an error, not a report."""
    try:
        import lm_eval
    except ImportError:
        log("benchmark.lm_eval: lm-eval is not installed (pip install lm-eval); skipped")
        return {"skipped": "lm-eval is not installed"}
    scores: dict[str, Any] = {}
    samples: dict[str, list[Any]] = {}
    for name, (model, adapter) in students.items():
        args = f"pretrained={model}" + (f",peft={adapter}" if adapter else "")
        try:
            out = lm_eval.simple_evaluate(
                model="hf",
                model_args=args,
                tasks=config.tasks,
                limit=config.limit,
                batch_size=config.batch_size,
                log_samples=True,
            )
        except Exception as exc:  # noqa: BLE001 - most often no hub to fetch the task data from
            log(f"benchmark.lm_eval: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
            return {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        finally:
            release_memory()  # the harness's model, before the next one and the load test's `vllm serve`
        scores[name] = {
            task: {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            for task, metrics in out["results"].items()
        }
        samples[name] = [[s.get("resps") for s in rows] for _, rows in sorted(out.get("samples", {}).items())]
    if len(samples) > 1 and all(v == next(iter(samples.values())) for v in samples.values()):
        raise PipelineError(
            "benchmark.lm_eval: the tuned and untuned students gave identical responses on every lm-eval "
            "sample; the adapter was not applied"
        )
    return scores
