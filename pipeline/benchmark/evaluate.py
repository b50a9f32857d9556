"""One system on the offline engine: task accuracy (overall, per rule, per category, named failure modes) from
one batched run, latency from requests run one at a time, the forgetting probe; and the paired comparisons of
the tuned student with every other system. Every request becomes a record, so each number can be recomputed.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from msgspec import structs

from pipeline import names
from pipeline.benchmark.probe import probe_correct, probe_messages, summarize_probe
from pipeline.benchmark.results import (
    AccuracyFigures,
    Comparisons,
    KeptOfTeacher,
    OfflineThroughput,
    PairedComparison,
    ProbeSummary,
    SystemResult,
)
from pipeline.benchmark.stats import mcnemar, percentile, ratio_interval, wilson_interval
from pipeline.benchmark.systems import System
from pipeline.chat_templates import is_plain_template
from pipeline.config import BenchmarkConfig, SamplingConfig
from pipeline.console import PipelineError
from pipeline.engines import Engine, Generation, stops_for, timed_single_requests
from pipeline.files import read_jsonl
from pipeline.probe_questions import load_probe, load_probe_shots
from pipeline.tasks import Example, Task
from pipeline.tasks.base import normalize_text


def evaluate_system(
    system: System, engine: Engine, task: Task, examples: list[Example], bench: BenchmarkConfig
) -> tuple[SystemResult, list[dict[str, Any]]]:
    """Accuracy and throughput from one batched run; latency from requests run one at a time, warm (shared
    prompt prefixes may come from the engine's cache) and cold (cache cleared before each request)."""
    sampling = task_sampling(bench, task, system.constrained)
    conversations = [task.messages(ex, system.prompt_style) for ex in examples]
    start = time.perf_counter()
    generations = engine.generate(conversations, sampling, progress=f"benchmark {system.name}")
    wall = time.perf_counter() - start
    records = [_task_record(system, task, ex, gen) for ex, gen in zip(examples, generations, strict=True)]
    latencies: dict[str, list[float]] = {}
    single_tokens = 0  # output tokens of the warm single requests: their decode speed, prefill included
    for kind, cold in (("latency", False), ("latency_cold", True)):
        timed = timed_single_requests(engine, conversations[: bench.latency_requests], sampling, cold=cold)
        latencies[kind] = [g.latency_s for g in timed]
        if not cold:
            single_tokens = sum(g.completions[0].output_tokens or 0 for g in timed)
        for ex, gen in zip(examples, timed, strict=False):
            records.append(
                {
                    "system": system.name,
                    "kind": kind,
                    "id": ex.id,
                    "latency_s": gen.latency_s,
                    "prompt_tokens": gen.prompt_tokens,
                    "output_tokens": gen.completions[0].output_tokens,
                }
            )
    task_records = [r for r in records if r["kind"] == "task"]
    result = _system_result(system, task_records, latencies, wall)
    result.constrained = sampling.choices is not None
    result.single_request_output_tokens_per_s = single_tokens / sum(latencies["latency"])
    return result, records


def task_sampling(bench: BenchmarkConfig, task: Task, constrained: bool) -> SamplingConfig:
    """How a system answers the task: `benchmark.sampling`, constrained to the task's answer set (where it has
    one) for a system that answers constrained (systems.answers_constrained), with max_tokens raised to fit the
    longest answer as generate raises it (SamplingConfig.fitted_to_choices; the stage says so once)."""
    return bench.sampling.constrained_to(task.answer_choices() if constrained else None).fitted_to_choices()[0]


def _task_record(system: System, task: Task, example: Example, generation: Generation) -> dict[str, Any]:
    completion = generation.completions[0]
    rules = task.score(completion.text, example)
    return {
        "system": system.name,
        "kind": "task",
        "id": example.id,
        "category": example.category,
        "completion": completion.text,
        "finish_reason": completion.finish_reason,
        "rules": rules,
        "correct": all(rules.values()),
        "failures": task.failure_modes(completion.text, example),
        "prompt_tokens": generation.prompt_tokens,
        "output_tokens": completion.output_tokens,
    }


def _system_result(
    system: System, task_records: list[dict[str, Any]], latencies: dict[str, list[float]], wall: float
) -> SystemResult:
    """A system's row of report.json (before the load test and costs are added)."""
    n = len(task_records)
    output_tokens = sum(r["output_tokens"] for r in task_records)
    tokens_per_s = output_tokens / wall
    return SystemResult(
        **structs.asdict(accuracy_metrics(task_records)),
        model=system.model,
        serving="base + unmerged LoRA adapter" if system.adapter else "weights",
        prompt_style=system.prompt_style,
        latency_p50_s=percentile(latencies["latency"], 50),
        latency_p95_s=percentile(latencies["latency"], 95),
        latency_cold_p50_s=percentile(latencies["latency_cold"], 50),
        latency_cold_p95_s=percentile(latencies["latency_cold"], 95),
        latency_requests=len(latencies["latency"]),
        output_tokens_per_s=tokens_per_s,
        offline=OfflineThroughput(
            requests_per_s=n / wall,
            output_tokens_per_s=tokens_per_s,
            prompt_tokens_per_s=sum(r["prompt_tokens"] for r in task_records) / wall,
        ),
        mean_prompt_tokens=statistics.fmean(r["prompt_tokens"] for r in task_records),
        mean_output_tokens=output_tokens / n,
    )


def accuracy_metrics(task_records: list[dict[str, Any]]) -> AccuracyFigures:
    """Accuracy with its interval, per rule, per category and per failure mode, from a system's task records
    (recomputed after the judge has marked each answer pass or fail, for open-ended tasks)."""
    n = len(task_records)
    rule_names = sorted({rule for r in task_records for rule in r["rules"]})
    correct = sum(r["correct"] for r in task_records)
    return structs.replace(
        failure_and_category_metrics(task_records),
        n=n,
        accuracy=correct / n,
        accuracy_ci95=wilson_interval(correct, n),
        rule_accuracy={rule: sum(r["rules"][rule] for r in task_records) / n for rule in rule_names},
        rule_accuracy_ci95={
            rule: wilson_interval(sum(r["rules"][rule] for r in task_records), n) for rule in rule_names
        },
    )


def failure_and_category_metrics(task_records: list[dict[str, Any]]) -> AccuracyFigures:
    """Where a system fails, not only how often: the rate of each named failure mode (plus answers cut off at
    max_tokens, a student that never stops) and accuracy per example category, each with a Wilson interval.
    A category far below the teacher's is where the student's distribution cliff is."""
    n = len(task_records)
    counts = {"truncated": sum(r["finish_reason"] == "length" for r in task_records)}
    for mode in sorted({m for r in task_records for m in r.get("failures", {})}):
        counts[mode] = sum(r["failures"].get(mode, False) for r in task_records)
    categories: dict[str, list[bool]] = {}
    for r in sorted(task_records, key=lambda r: r["category"] or "all"):
        categories.setdefault(r["category"] or "all", []).append(r["correct"])
    return AccuracyFigures(
        failure_rates={mode: count / n for mode, count in counts.items()},
        failure_rates_ci95={mode: wilson_interval(count, n) for mode, count in counts.items()},
        category_accuracy={c: sum(v) / len(v) for c, v in categories.items()},
        category_accuracy_ci95={c: wilson_interval(sum(v), len(v)) for c, v in categories.items()},
        category_n={c: len(v) for c, v in categories.items()},
    )


def run_probe(
    system: System, engine: Engine, task: Task, bench: BenchmarkConfig
) -> tuple[ProbeSummary, list[dict[str, Any]]]:
    """The general probe (closed questions outside the task): accuracy, and leakage of task behaviour. An untuned
    base model is shown worked examples first (`benchmark.probe_shots`), as base models are evaluated; any model
    in the plain chat format is read up to the next turn it would write itself."""
    questions = load_probe()
    base_model = is_plain_template(getattr(engine, "chat_template", None)) and system.adapter is None
    shots = load_probe_shots()  # unset: all to an untuned base model, none otherwise (benchmark.probe_shots says why)
    if bench.probe_shots is not None or not base_model:
        shots = shots[: bench.probe_shots or 0]
    stop = stops_for(engine, bench.sampling.stop)
    sampling = bench.sampling.model_copy(update={"max_tokens": bench.probe_max_tokens, "n": 1, "stop": stop})
    asked = [probe_messages(q, shots) for q in questions]
    generations = engine.generate(asked, sampling, progress=f"probe {system.name}")
    texts = [g.completions[0].text for g in generations]
    records = [
        {
            "system": system.name,
            "kind": "probe",
            "id": q.id,
            "completion": t,
            "correct": probe_correct(t, q),
            "leak": task.leaks(t),
            "prompt_tokens": g.prompt_tokens,
        }
        for q, t, g in zip(questions, texts, generations, strict=True)
    ]
    summary = summarize_probe(texts, questions, task.leaks, bench.probe_task_categories)
    summary.shots = len(shots)
    if base_model:
        summary.plain_chat_template = True  # a base model, asked in a chat format it never learned
    return summary, records


def comparisons(results: dict[str, SystemResult], records: list[dict[str, Any]], seed: int) -> Comparisons:
    """Paired tests of the tuned student against every other system on the same test examples, and the
    share of the teacher's accuracy it keeps, with a bootstrap interval."""
    outcome = {name: task_outcomes(records, name) for name in results}
    ids = sorted(outcome[names.STUDENT_TUNED])
    tuned = [outcome[names.STUDENT_TUNED][i] for i in ids]
    tuned_accuracy = results[names.STUDENT_TUNED].accuracy
    tests = {}
    for other in results:
        if other != names.STUDENT_TUNED:
            theirs = [outcome[other][i] for i in ids]
            test = mcnemar(tuned, theirs)
            tests[other] = PairedComparison(
                accuracy_diff=tuned_accuracy - results[other].accuracy,
                tuned_only_correct=test["a_only"],
                other_only_correct=test["b_only"],
                p_value=test["p_value"],
            )
    teacher = [outcome[names.TEACHER][i] for i in ids]
    teacher_accuracy = results[names.TEACHER].accuracy
    return Comparisons(
        student_tuned_vs=tests,
        kept_of_teacher=KeptOfTeacher(
            ratio=tuned_accuracy / teacher_accuracy if teacher_accuracy else None,
            ci95=ratio_interval(tuned, teacher, seed),
        ),
    )


def task_outcomes(records: list[dict[str, Any]], system: str) -> dict[str, bool]:
    """One system's right/wrong per test example id, from its task records: what paired tests pair."""
    return {r["id"]: r["correct"] for r in records if r["system"] == system and r["kind"] == "task"}


def check_no_test_leak(train_file: Path, task: Task, examples: list[Example], prompt_style: str) -> None:
    """Refuse to score on test prompts the student trained on (the filter guards this; trust, but verify):
    `train_file` is the filter's train.jsonl, `prompt_style` the one the student trained with."""
    if not train_file.exists():
        return
    test_users = {normalize_text(task.messages(ex, prompt_style)[-1]["content"]): ex.id for ex in examples}
    for row in read_jsonl(train_file):
        user = next((m["content"] for m in reversed(row["messages"]) if m["role"] == "user"), "")
        if normalize_text(user) in test_users:
            raise PipelineError(
                f"benchmark: test prompt {test_users[normalize_text(user)]} is in the training data ({train_file}); "
                "the scores would be contaminated"
            )


def check_adapter_applied(records: list[dict[str, Any]]) -> None:
    """Refuse to report a tuned student whose answers equal the base student's: the adapter was not applied."""

    def answers(system: str) -> dict[str, str]:
        return {r["id"]: r["completion"] for r in records if r["system"] == system and r["kind"] == "task"}

    base, tuned = answers(names.STUDENT_BASE), answers(names.STUDENT_TUNED)
    if base and tuned and base == tuned:
        raise PipelineError(
            "benchmark: the tuned student answered exactly like the base student on every test "
            "example; the adapter was not applied (or training changed nothing)"
        )
