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

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.benchmark.probe import load_probe, probe_correct, probe_messages, run_lm_eval, summarize_probe
from pipeline.benchmark.report import latency_p50, write_report
from pipeline.benchmark.stats import mcnemar, percentile, ratio_interval, wilson_interval
from pipeline.config import ExperimentConfig
from pipeline.engines import Engine, load_engine, timed_single_requests
from pipeline.models import resolve_model
from pipeline.runs import PipelineError, Stage, log, read_jsonl, write_json, write_jsonl
from pipeline.tasks import Example, Task, build_task, task_files
from pipeline.tasks.base import normalize_text
from pipeline.tracking import start_tracking

REPORT_SCHEMA_VERSION = 2  # report.json's layout; README "report.json" documents it


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
    """The systems of `benchmark.systems`, their model names resolved ("teacher", "student", "tuned")."""
    tuned = tuned_student_dir(config)
    lora = config.benchmark.student_serving == "lora"
    if lora and config.train.method == "full":
        raise PipelineError("benchmark.student_serving: lora needs an adapter; train.method is full")
    wants_tuned = any(s.model == "tuned" for s in config.benchmark.systems)
    if wants_tuned and lora and not (tuned / "adapter_config.json").exists():
        raise PipelineError(f"benchmark: no adapter at {tuned}; run train first")
    if wants_tuned and not lora and not (tuned / "config.json").exists():
        raise PipelineError(f"benchmark: no merged student at {tuned}; run train with train.merge=true")
    base_student = resolve_model(config.student.model)
    models = {"teacher": resolve_model(config.teacher.model), "student": base_student}
    systems = []
    for declared in config.benchmark.systems:
        adapter = None
        if declared.model == "tuned":
            model, adapter = (base_student, str(tuned)) if lora else (str(tuned), None)
        else:
            model = models.get(declared.model) or resolve_model(declared.model)
        systems.append(System(declared.name, model, declared.prompt_style, declared.probe, adapter))
    return systems


def cost_per_1m_tokens(usd_per_hour: float, tokens_per_s: float) -> float:
    return usd_per_hour / (tokens_per_s * 3600) * 1e6 if tokens_per_s > 0 else float("inf")


def serving_costs(usd_per_hour: float, throughput: dict[str, float]) -> dict[str, float]:
    """What the machine's hour buys at a measured throughput: $ per 1M input tokens, per 1M output tokens
    (each charging the whole machine to that one kind of token) and per 1,000 requests."""
    return {
        "cost_per_1m_input_tokens": cost_per_1m_tokens(usd_per_hour, throughput["prompt_tokens_per_s"]),
        "cost_per_1m_output_tokens": cost_per_1m_tokens(usd_per_hour, throughput["output_tokens_per_s"]),
        "cost_per_1k_requests": cost_per_1m_tokens(usd_per_hour, throughput["requests_per_s"]) / 1000,
    }


def run_load_tests(
    config: ExperimentConfig, systems: list[System], task: Task, examples: list[Example]
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Every system through `vllm serve` at each concurrency level; one server per base model, its systems'
    adapters served beside it. Returns per-system level summaries and the per-request records."""
    from pipeline.benchmark.serving import load_test, summarize_level, vllm_server

    bench = config.benchmark
    by_model: dict[str, list[System]] = {}
    for system in systems:
        by_model.setdefault(system.model, []).append(system)
    summaries: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    for model, group in by_model.items():
        names = {s.name: f"adapter-{i}" if s.adapter else "base" for i, s in enumerate(group)}
        adapters = {names[s.name]: s.adapter for s in group if s.adapter}
        log(f"benchmark: vllm serve {model} for {', '.join(s.name for s in group)}")
        with vllm_server(model, bench.engine, config.seed, adapters, bench.load_test.startup_timeout_s) as url:
            for system in group:
                conversations = [task.messages(ex, system.prompt_style) for ex in examples]
                rows = load_test(url, names[system.name], conversations, bench.sampling, bench.load_test)
                records += [{"system": system.name, "kind": "load", **row} for row in rows]
                levels = sorted({row["concurrency"] for row in rows})
                summaries[system.name] = {
                    str(level): summarize_level([r for r in rows if r["concurrency"] == level]) for level in levels
                }
    return summaries, records


def add_costs(config: ExperimentConfig, results: dict[str, dict[str, Any]]) -> None:
    """$ per 1M input/output tokens and per 1k requests for each system, from the server's throughput at the
    cost concurrency (or, without a load test, the offline batched run)."""
    bench = config.benchmark
    level = str(bench.load_test.cost_concurrency or max(bench.load_test.concurrency))
    for declared in bench.systems:
        metrics = results[declared.name]
        hardware, usd_per_hour = bench.hardware_for(declared)
        load = metrics.get("load", {})
        if level in load:
            throughput, basis = load[level], f"vllm serve at concurrency {level}"
        else:
            throughput, basis = metrics["offline"], "offline engine, batched"
        metrics.update(serving_costs(usd_per_hour, throughput))
        metrics.update({"hardware": hardware, "usd_per_hour": usd_per_hour, "cost_basis": basis})


def comparisons(results: dict[str, dict[str, Any]], records: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Paired tests of the tuned student against every other system on the same test examples, and the
    share of the teacher's accuracy it keeps, with a bootstrap interval."""
    outcome = {
        name: {r["id"]: r["correct"] for r in records if r["system"] == name and r["kind"] == "task"}
        for name in results
    }
    ids = sorted(outcome["student_tuned"])
    tuned = [outcome["student_tuned"][i] for i in ids]
    tests = {}
    for other in results:
        if other != "student_tuned":
            theirs = [outcome[other][i] for i in ids]
            test = mcnemar(tuned, theirs)
            tests[other] = {
                "accuracy_diff": results["student_tuned"]["accuracy"] - results[other]["accuracy"],
                "tuned_only_correct": test["a_only"],
                "other_only_correct": test["b_only"],
                "p_value": test["p_value"],
            }
    teacher = [outcome["teacher"][i] for i in ids]
    teacher_accuracy = results["teacher"]["accuracy"]
    return {
        "student_tuned_vs": tests,
        "kept_of_teacher": {
            "ratio": results["student_tuned"]["accuracy"] / teacher_accuracy if teacher_accuracy else None,
            "ci95": ratio_interval(tuned, teacher, seed),
        },
    }


def break_even(config: ExperimentConfig, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Requests (and days at benchmark.requests_per_day) after which distilling has paid for itself: the
    one-off cost (generate + train wall time on pipeline_hardware) over the per-request saving."""
    bench = config.benchmark
    walls = {}
    for stage in ("generate", "train"):
        manifest = config.run_dir / stage / "manifest.json"
        walls[stage] = json.loads(manifest.read_text())["wall_s"] if manifest.is_file() else 0.0
    usd_per_hour = bench.hardware_profiles[bench.pipeline_hardware].usd_per_hour
    one_off = sum(walls.values()) / 3600 * usd_per_hour

    def against(baseline: str) -> dict[str, Any]:
        saving = (results[baseline]["cost_per_1k_requests"] - results["student_tuned"]["cost_per_1k_requests"]) / 1000
        requests = one_off / saving if saving > 0 else None
        return {
            "saving_per_1k_requests_usd": saving * 1000,
            "requests": requests,
            "days": requests / bench.requests_per_day if requests is not None else None,
        }

    even = {
        "one_off_usd": one_off,
        "one_off_wall_s": walls,
        "pipeline_hardware": bench.pipeline_hardware,
        **against("teacher"),
        "requests_per_day": bench.requests_per_day,
    }
    if "student_prompted" in results:
        # The "try prompting first" baseline: what fine-tuning saves over serving the untuned student its long prompt.
        even["vs_prompted"] = against("student_prompted")
    return even


def failure_and_category_metrics(task_records: list[dict[str, Any]]) -> dict[str, Any]:
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
    return {
        "failure_rates": {mode: count / n for mode, count in counts.items()},
        "failure_rates_ci95": {mode: wilson_interval(count, n) for mode, count in counts.items()},
        "category_accuracy": {c: sum(v) / len(v) for c, v in categories.items()},
        "category_accuracy_ci95": {c: wilson_interval(sum(v), len(v)) for c, v in categories.items()},
        "category_n": {c: len(v) for c, v in categories.items()},
    }


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
                "failures": task.failure_modes(completion.text, ex),
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
    correct = sum(r["correct"] for r in task_records)
    metrics = {
        "model": system.model,
        "serving": "base + unmerged LoRA adapter" if system.adapter else "weights",
        "prompt_style": system.prompt_style,
        "n": len(task_records),
        "accuracy": correct / len(task_records),
        "accuracy_ci95": wilson_interval(correct, len(task_records)),
        "rule_accuracy": {rule: sum(r["rules"][rule] for r in task_records) / len(task_records) for rule in rule_names},
        "rule_accuracy_ci95": {
            rule: wilson_interval(sum(r["rules"][rule] for r in task_records), len(task_records)) for rule in rule_names
        },
        **failure_and_category_metrics(task_records),
        "latency_p50_s": percentile(latencies["latency"], 50),
        "latency_p95_s": percentile(latencies["latency"], 95),
        "latency_cold_p50_s": percentile(latencies["latency_cold"], 50),
        "latency_cold_p95_s": percentile(latencies["latency_cold"], 95),
        "latency_requests": len(latencies["latency"]),
        # The offline engine's batched run over the whole test split.
        "output_tokens_per_s": tokens_per_s,
        "offline": {
            "requests_per_s": len(task_records) / wall,
            "output_tokens_per_s": tokens_per_s,
            "prompt_tokens_per_s": sum(r["prompt_tokens"] for r in task_records) / wall,
        },
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
    if config.benchmark.lm_eval.tasks:
        students = {s.name: (s.model, s.adapter) for s in systems if s.name in ("student_base", "student_tuned")}
        forgetting["lm_eval"] = run_lm_eval(config.benchmark.lm_eval, students)
    if config.benchmark.load_test.enabled:
        summaries, load_records = run_load_tests(config, systems, task, examples)
        records += load_records
        for name, levels in summaries.items():
            results[name]["load"] = levels
    add_costs(config, results)
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "run_name": config.run_name,
        "task": config.task.name,
        "test_examples": len(examples),
        "hardware_profiles": {k: v.usd_per_hour for k, v in config.benchmark.hardware_profiles.items()},
        "systems": {s.name: results[s.name] for s in systems},
        "comparisons": comparisons(results, records, config.seed),
        "latency_cdf": {
            name: {
                str(level): sorted(r["e2e_s"] for r in records if r["system"] == name and r.get("concurrency") == level)
                for level in config.benchmark.load_test.concurrency
            }
            for name in results
            if "load" in results[name]
        },
        "break_even": break_even(config, results),
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
    columns = ["system", "accuracy", "ci_low", "ci_high", "cost_per_1k_requests", "latency_p50_s", "mean_prompt_tokens"]
    tracker.table(
        "systems",
        columns,
        [
            [
                name,
                m["accuracy"],
                *m["accuracy_ci95"],
                m["cost_per_1k_requests"],
                latency_p50(m),
                m["mean_prompt_tokens"],
            ]
            for name, m in results.items()
        ],
    )
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
