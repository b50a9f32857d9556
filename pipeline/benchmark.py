"""Stage 4, benchmark: teacher vs untuned student vs tuned student on the held-out test split.

    distill benchmark --config configs/smollm2_support.yaml

Per system: task accuracy (overall and per rule), latency p50/p95 of requests run one at a time,
warm (shared prompt prefixes may come from vLLM's prefix cache) and cold (cache cleared before each
request: every prompt token computed), output tokens/s of the batched run, and serving cost in $ per
1M output tokens from the configured $/hour and that throughput. The students are also asked a general
probe of closed questions outside the task, to measure forgetting (probe accuracy) and leakage (task
behaviour in general answers).
Per-request records are kept in `records.jsonl`, so every number in the report can be recomputed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig
from pipeline.engines import Engine, load_engine, timed_single_requests
from pipeline.models import resolve_model
from pipeline.probe import load_probe, probe_correct, probe_messages, summarize_probe
from pipeline.report import write_report
from pipeline.runs import PipelineError, Stage, log, read_jsonl, write_json, write_jsonl
from pipeline.tasks import Example, Task, build_task, task_files
from pipeline.tasks.base import normalize_text
from pipeline.tracking import start_tracking


@dataclass(frozen=True)
class System:
    name: str
    model: str  # resolved path or HF id
    prompt_style: str
    probe: bool  # students get the forgetting probe
    adapter: str | None = None  # a LoRA adapter served unmerged on top of `model`


def benchmark_stage(config: ExperimentConfig) -> Stage:
    sections = {
        "seed": config.seed,
        "task": config.task.model_dump(),
        "teacher": {"model": config.teacher.model, "prompt_style": config.teacher.prompt_style},
        "student": config.student.model_dump(),
        "benchmark": config.benchmark.model_dump(),
    }
    return Stage(config, "benchmark", sections, inputs=[tuned_student_dir(config), *task_files(config)])


def tuned_student_dir(config: ExperimentConfig) -> Path:
    lora = config.benchmark.student_serving == "lora"
    return config.run_dir / "train" / ("adapter" if lora else "merged")


def systems_for(config: ExperimentConfig) -> list[System]:
    tuned = tuned_student_dir(config)
    base_student = resolve_model(config.student.model)
    if config.benchmark.student_serving == "lora":
        if config.train.method == "full":
            raise PipelineError("benchmark.student_serving: lora needs an adapter; train.method is full")
        if not (tuned / "adapter_config.json").exists():
            raise PipelineError(f"benchmark: no adapter at {tuned}; run train first")
        student = System("student_tuned", base_student, config.student.prompt_style, probe=True, adapter=str(tuned))
    else:
        if not (tuned / "config.json").exists():
            raise PipelineError(f"benchmark: no merged student at {tuned}; run train with train.merge=true")
        student = System("student_tuned", str(tuned), config.student.prompt_style, probe=True)
    return [
        System("teacher", resolve_model(config.teacher.model), config.teacher.prompt_style, probe=False),
        System("student_base", base_student, config.student.prompt_style, probe=True),
        student,
    ]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def cost_per_1m_tokens(usd_per_hour: float, tokens_per_s: float) -> float:
    return usd_per_hour / (tokens_per_s * 3600) * 1e6 if tokens_per_s > 0 else float("inf")


def evaluate_system(
    system: System, engine: Engine, task: Task, config: ExperimentConfig, examples
) -> tuple[dict, list]:
    """Accuracy and throughput from one batched run; latency from requests run one at a time."""
    bench = config.benchmark
    conversations = [task.messages(ex, system.prompt_style) for ex in examples]
    start = time.perf_counter()
    generations = engine.generate(conversations, bench.sampling)
    wall = time.perf_counter() - start
    records = []
    for ex, gen in zip(examples, generations, strict=True):
        completion = gen.completions[0]
        rules = task.score(completion.text, ex)
        records.append(
            {
                "system": system.name,
                "kind": "task",
                "id": ex.id,
                "category": ex.category,
                "completion": completion.text,
                "finish_reason": completion.finish_reason,
                "rules": rules,
                "correct": all(rules.values()),
                "prompt_tokens": gen.prompt_tokens,
                "output_tokens": completion.output_tokens,
            }
        )
    latencies: dict[str, list[float]] = {}
    for kind, cold in (("latency", False), ("latency_cold", True)):
        timed = timed_single_requests(engine, conversations[: bench.latency_requests], bench.sampling, cold=cold)
        latencies[kind] = [g.latency_s for g in timed]
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
    output_tokens = sum(r["output_tokens"] for r in records if r["kind"] == "task")
    tokens_per_s = output_tokens / wall
    rule_names = sorted({rule for r in records if r["kind"] == "task" for rule in r["rules"]})
    task_records = [r for r in records if r["kind"] == "task"]
    metrics = {
        "model": system.model,
        "serving": "base + unmerged LoRA adapter" if system.adapter else "weights",
        "prompt_style": system.prompt_style,
        "n": len(task_records),
        "accuracy": sum(r["correct"] for r in task_records) / len(task_records),
        "rule_accuracy": {rule: sum(r["rules"][rule] for r in task_records) / len(task_records) for rule in rule_names},
        "latency_p50_s": percentile(latencies["latency"], 50),
        "latency_p95_s": percentile(latencies["latency"], 95),
        "latency_cold_p50_s": percentile(latencies["latency_cold"], 50),
        "latency_cold_p95_s": percentile(latencies["latency_cold"], 95),
        "latency_requests": len(latencies["latency"]),
        "output_tokens_per_s": tokens_per_s,
        "cost_per_1m_output_tokens": cost_per_1m_tokens(bench.hardware.usd_per_hour, tokens_per_s),
        "mean_prompt_tokens": statistics.fmean(r["prompt_tokens"] for r in task_records),
        "mean_output_tokens": output_tokens / len(task_records),
    }
    return metrics, records


def run_probe(system: System, engine: Engine, task: Task, config: ExperimentConfig) -> tuple[dict, list]:
    questions = load_probe()
    sampling = config.benchmark.sampling.model_copy(update={"max_tokens": config.benchmark.probe_max_tokens, "n": 1})
    generations = engine.generate([probe_messages(q) for q in questions], sampling)
    texts = [g.completions[0].text for g in generations]
    records = [
        {
            "system": system.name,
            "kind": "probe",
            "id": q.id,
            "completion": t,
            "correct": probe_correct(t, q),
            "leak": task.leaks(t),
        }
        for q, t in zip(questions, texts, strict=True)
    ]
    return summarize_probe(texts, questions, task.leaks), records


def run_benchmark(config: ExperimentConfig, force: bool = False) -> Path:
    stage = benchmark_stage(config)
    report_path = stage.dir / "report.json"
    if not force and stage.is_fresh():
        log(f"benchmark: skipped, inputs and config unchanged ({report_path})")
        return report_path
    if config.benchmark.engine.backend == "openai":
        raise PipelineError("benchmark.engine.backend: the benchmark runs the vllm or transformers backend for now")
    task = build_task(config.task.name, config.task.params, config.seed, config.base_dir)
    examples = task.split("test")
    if config.benchmark.max_test_examples:
        examples = examples[: config.benchmark.max_test_examples]
    if not examples:
        raise PipelineError("benchmark: the test split is empty")
    check_no_test_leak(config, task, examples)
    systems = systems_for(config)

    results: dict[str, dict[str, Any]] = {}
    forgetting: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    # Systems that share weights share one engine (in the embedded default, teacher and base student).
    by_model: dict[tuple[str, str | None], list[System]] = {}
    for system in systems:
        by_model.setdefault((system.model, system.adapter), []).append(system)
    for (model, adapter), group in by_model.items():
        engine = load_engine(model, config.benchmark.engine, config.seed, adapter)
        try:
            for system in group:
                log(f"benchmark: {system.name} ({system.prompt_style} prompt) on {len(examples)} test examples")
                results[system.name], system_records = evaluate_system(system, engine, task, config, examples)
                records += system_records
                if system.probe and config.benchmark.probe:
                    forgetting[system.name], probe_records = run_probe(system, engine, task, config)
                    records += probe_records
        finally:
            engine.close()

    check_adapter_applied(records)
    report = {
        "schema_version": 1,
        "run_name": config.run_name,
        "task": config.task.name,
        "test_examples": len(examples),
        "hardware": config.benchmark.hardware.model_dump(),
        "systems": {s.name: results[s.name] for s in systems},
        "forgetting": forgetting,
    }
    if "student_tuned" in forgetting and "student_base" in forgetting:
        report["forgetting"]["change"] = {
            key: forgetting["student_tuned"][key] - forgetting["student_base"][key]
            for key in ("accuracy", "leakage_rate")
        }
    write_jsonl(stage.dir / "records.jsonl", records)
    write_json(report_path, report)
    outputs = [report_path, stage.dir / "records.jsonl", *write_report(report, stage.dir)]
    stage.finish(outputs, {name: {k: v for k, v in m.items() if isinstance(v, float)} for name, m in results.items()})
    tracker = start_tracking(config, "benchmark")
    tracker.summary({f"{name}/{k}": v for name, m in results.items() for k, v in m.items() if isinstance(v, float)})
    tracker.artifact(config, "benchmark", stage.fingerprint, outputs)
    tracker.finish()
    log(f"benchmark: report at {stage.dir / 'report.md'}")
    return report_path


def check_no_test_leak(config: ExperimentConfig, task: Task, examples: list[Example]) -> None:
    """Refuse to score on test prompts the student trained on (the filter guards this; trust, but verify)."""
    train_file = config.run_dir / "filter" / "train.jsonl"
    if not train_file.exists():
        return
    test_users = {
        normalize_text(task.messages(ex, config.student.prompt_style)[-1]["content"]): ex.id for ex in examples
    }
    for row in read_jsonl(train_file):
        user = next((m["content"] for m in reversed(row["messages"]) if m["role"] == "user"), "")
        if normalize_text(user) in test_users:
            raise PipelineError(
                f"benchmark: test prompt {test_users[normalize_text(user)]} is in the training data ({train_file}); "
                "the scores would be contaminated"
            )


def check_adapter_applied(records: list[dict[str, Any]]) -> None:
    """Refuse to report a tuned student whose answers equal the base student's: the adapter was not applied."""
    base = {r["id"]: r["completion"] for r in records if r["system"] == "student_base" and r["kind"] == "task"}
    tuned = {r["id"]: r["completion"] for r in records if r["system"] == "student_tuned" and r["kind"] == "task"}
    if base and tuned and base == tuned:
        raise PipelineError(
            "benchmark: the tuned student answered exactly like the base student on every test "
            "example; the adapter was not applied (or training changed nothing)"
        )
