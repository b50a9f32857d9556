"""The benchmark stage: teacher vs untuned student vs tuned student on the held-out test split.

    distill benchmark --config configs/smollm2_support.yaml

Per system (evaluate.py): task accuracy (overall, per rule, per category, named failure modes), latency p50/p95
of requests run one at a time, warm (shared prompt prefixes may come from vLLM's prefix cache) and cold (cache
cleared before each request), output tokens/s of the batched run. Then every system through a real `vllm serve`
at each concurrency level (serving.py), serving cost from each machine's $/hour and break-even (costs.py), the
general probe for forgetting (probe.py), paired tests (stats.py), and report.md with its verdict (report.py,
verdict.py). Per-request records are kept in `records.jsonl`, so every number in the report can be recomputed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pipeline import names
from pipeline.benchmark.costs import Hardware, add_costs, break_even, resolve_hardware
from pipeline.benchmark.evaluate import (
    accuracy_metrics,
    check_adapter_applied,
    check_no_test_leak,
    comparisons,
    evaluate_system,
    run_probe,
    task_sampling,
)
from pipeline.benchmark.judge import judge_enabled, judge_model, run_judge
from pipeline.benchmark.probe import paired_probe_tests, run_lm_eval
from pipeline.benchmark.report import write_report
from pipeline.benchmark.roofline import add_roofline_shares
from pipeline.benchmark.serving import run_load_tests
from pipeline.benchmark.systems import (
    System,
    copy_rows,
    engine_key,
    system_engine,
    systems_for,
    tuned_student_dir,
    twins,
)
from pipeline.benchmark.verdict import latency_p50
from pipeline.config import ExperimentConfig
from pipeline.console import PipelineError, log
from pipeline.engines import Engine, load_engine
from pipeline.files import write_json, write_jsonl
from pipeline.runs import FinishedUnits, Stage
from pipeline.tasks import Example, Task, task_for

REPORT_SCHEMA_VERSION = 3  # report.json's layout; README "report.json" documents it


def benchmark_stage(config: ExperimentConfig, task: Task) -> Stage:
    teacher: dict[str, Any] = {"model": config.teacher.model, "prompt_style": config.teacher.prompt_style}
    if config.teacher.engine.chat_template is not None:  # the teacher is measured with it (system_engine)
        teacher["chat_template"] = config.teacher.engine.chat_template
    sections = {
        "seed": config.seed,
        "task": config.task.model_dump(),
        "teacher": teacher,
        "student": config.student.model_dump(),
        "benchmark": config.benchmark.model_dump(),
    }
    # The teacher's engine reaches the benchmark when a system (a hosted teacher) or the judge runs on it.
    on_teacher_engine = [system_engine(config, s) is config.teacher.engine for s in config.benchmark.systems]
    if any(on_teacher_engine) or (judge_enabled(config, task) and judge_model(config)[1] is config.teacher.engine):
        sections["teacher_engine"] = config.teacher.engine.model_dump()
    return Stage(config, "benchmark", sections, inputs=[tuned_student_dir(config), *task.data_files()])


def run_benchmark(config: ExperimentConfig, force: bool = False) -> Path:
    task = task_for(config)
    layout = config.layout
    with benchmark_stage(config, task) as stage:
        if stage.skip(force, layout.report_json):
            return layout.report_json
        if config.benchmark.engine.backend == "openai":
            raise PipelineError(
                "benchmark.engine.backend: the students run here on vllm or transformers; a system measured through "
                "a server names it in its own engine (benchmark.systems.<name>.engine)"
            )
        examples = task.split("test")
        if config.benchmark.max_test_examples:
            examples = examples[: config.benchmark.max_test_examples]
        if not examples:
            raise PipelineError("benchmark: the test split is empty")
        check_no_test_leak(config, task, examples)
        systems = systems_for(config)
        units = FinishedUnits(stage, force)  # a killed benchmark resumes after its last finished system

        results, forgetting, records = _evaluate_offline(config, systems, task, examples, units)
        check_adapter_applied(records)
        judged = None
        if judge_enabled(config, task):  # every answer graded; accuracy becomes the judge's pass rate
            judged, judge_records = run_judge(config, task, examples, records, units)
            records += judge_records
            for name in results:
                results[name].update(
                    accuracy_metrics([r for r in records if r["kind"] == "task" and r["system"] == name])
                )
        if config.benchmark.lm_eval.tasks:
            both = (names.STUDENT_BASE, names.STUDENT_TUNED)
            students = {s.name: (s.model, s.adapter) for s in systems if s.name in both}
            forgetting["lm_eval"] = units.run("lm_eval", lambda: run_lm_eval(config.benchmark.lm_eval, students))
        if config.benchmark.load_test.enabled:
            summaries, load_records = run_load_tests(config, systems, task, examples, units)
            records += load_records
            for name, levels in summaries.items():
                results[name]["load"] = levels
        hardware = resolve_hardware(config)
        add_costs(hardware, config, results)
        add_roofline_shares(hardware, config, systems, results)
        report = _report(config, hardware, systems, len(examples), results, forgetting, records)
        report["answer_choices"] = task_sampling(config, task).choices  # None: every system answered freely
        report["judge"] = judged  # None: the task's own scorer decided every answer
        report["filter"] = _filter_summary(config)
        report["recipe"] = recipe(config)
        report["other_runs"] = other_runs_of_the_task(config)

        write_jsonl(layout.records, records)
        write_json(layout.report_json, report)
        rendered = write_report(report, layout.report_md, config.benchmark.verdict)  # report.md and its plots
        outputs = [layout.report_json, layout.records, *rendered]
        floats = {name: {k: v for k, v in m.items() if isinstance(v, float)} for name, m in results.items()}
        for name, judged_system in (judged or {}).get("systems", {}).items():  # W&B: the judge's rates too
            versus = judged_system.get("vs_teacher") or {}
            floats[name] |= {f"judge_{k}": v for k, v in versus.items() if isinstance(v, float)}
        stage.finish(
            outputs,
            floats,
            summary={f"{name}/{k}": v for name, m in floats.items() for k, v in m.items()},
            tables=[_systems_table(results)],
        )
        units.clear()
    log(f"benchmark: report at {layout.report_md}")
    return layout.report_json


def offline_unit(system: str) -> str:
    """The finished-unit key of a system's offline figures and records (runs.FinishedUnits)."""
    return f"offline:{system}"


def _evaluate_offline(
    config: ExperimentConfig, systems: list[System], task: Task, examples: list[Example], units: FinishedUnits
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Every system on the offline engine, and the students on the probe: (metrics, forgetting, records).
    Systems that share weights share one engine (in the embedded default, teacher and base student). Each
    system's figures and records are saved as one unit as it finishes: a rerun after a kill takes them, and
    loads no engine for a group already done."""
    by_model: dict[tuple[str, str | None, str], list[System]] = {}
    for system in systems:
        engine_config = system.engine or config.benchmark.engine
        by_model.setdefault((system.model, system.adapter, engine_key(engine_config)), []).append(system)
    copied_from = twins(systems)
    for (model, adapter, _), group in by_model.items():
        todo = [system for system in group if offline_unit(system.name) not in units]
        if not todo:
            continue
        engine = load_engine(model, group[0].engine or config.benchmark.engine, config.seed, adapter)
        try:
            for system in todo:
                source = copied_from.get(system.name)
                twin = units.get(offline_unit(source)) if source else None
                units.save(offline_unit(system.name), _measure(config, system, engine, task, examples, source, twin))
        finally:
            engine.close()
    done = {system.name: units.get(offline_unit(system.name)) for group in by_model.values() for system in group}
    results = {name: unit["results"] for name, unit in done.items()}
    forgetting = {name: unit["forgetting"] for name, unit in done.items() if unit["forgetting"] is not None}
    return results, forgetting, [record for unit in done.values() for record in unit["records"]]


def _measure(
    config: ExperimentConfig,
    system: System,
    engine: Engine,
    task: Task,
    examples: list[Example],
    source: str | None,
    twin: dict[str, Any] | None,
) -> dict[str, Any]:
    """One system on the test split, and on the probe when it is probed: {results, forgetting, records}. A
    system with the weights and prompt of an earlier `source` (see `twins`) takes that one's figures and rows
    (`twin`) instead of a second run."""
    if source and twin:
        log(f"benchmark: {system.name} is {source}'s model with its prompt: measured once, rows copied")
        results = {**copy.deepcopy(twin["results"]), "measured_as": source}
        records = copy_rows(twin["records"], source, system.name, kinds=("task", "latency", "latency_cold"))
    else:
        log(f"benchmark: {system.name} ({system.prompt_style} prompt) on {len(examples)} test examples")
        results, records = evaluate_system(system, engine, task, config, examples)
        if system.on_server and system.engine is not None:
            results["server"] = system.engine.server.base_url  # latency over the network, its weights elsewhere
    probed = None
    if system.probe and config.benchmark.probe:
        if twin and twin["forgetting"] is not None:
            probed = copy.deepcopy(twin["forgetting"])
            records += copy_rows(twin["records"], source, system.name, kinds=("probe",))
        else:
            probed, probe_records = run_probe(system, engine, task, config)
            records += probe_records
    return {"results": results, "forgetting": probed, "records": records}


def recipe(config: ExperimentConfig) -> dict[str, Any]:
    """The training knobs that move forgetting, as this run set them, and the prompt the student trained with
    (other runs differ in it too): the verdict names them. With the replay rows the filter really added, and how
    many were wanted (a base student answering itself may add none): a fraction alone can mislead."""
    train = config.train
    replayed = (_filter_report(config) or {}).get("replay") or {}
    return {
        "replay_fraction": train.replay.fraction,
        "replay_source": train.replay.source,
        "replay_rows": replayed.get("kept"),
        "replay_wanted": replayed.get("wanted"),
        "learning_rate": train.learning_rate,
        "lora_r": train.lora.r if train.method != "full" else None,
        "num_train_epochs": train.num_train_epochs,
        "prompt_style": config.student.prompt_style,
    }


def other_runs_of_the_task(config: ExperimentConfig) -> list[dict[str, Any]]:
    """Forgetting measured by the other finished runs of this task in the same runs folder, with their recipes:
    the figures behind "which knob moves it", when there are any."""
    found = []
    for path in sorted(config.run_dir.parent.glob("*/benchmark/report.json")):
        run = path.parent.parent
        if run == config.run_dir:
            continue
        try:
            other = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        change = other.get("forgetting", {}).get("change")
        if other.get("task") != config.task.name or not change or "recipe" not in other:
            continue
        tuned = other["systems"][names.STUDENT_TUNED]
        found.append(
            {
                "run": run.name,
                "recipe": other["recipe"],
                "tuned_accuracy": tuned["accuracy"],
                "probe_change": change.get("accuracy"),
                "leakage_change": change.get("leakage_rate"),
            }
        )
    return found


def _filter_report(config: ExperimentConfig) -> dict[str, Any] | None:
    """The filter stage's filter_report.json; None where the filter did not run here."""
    path = config.layout.filter_report
    return json.loads(path.read_text()) if path.is_file() else None


def _filter_summary(config: ExperimentConfig) -> dict[str, Any] | None:
    """What the filter made of the teacher's training answers, for a verdict that must say why a teacher
    failed; None where the filter did not run here (a benchmark of an outside dataset)."""
    report = _filter_report(config)
    if report is None:
        return None
    keys = ("samples_in", "samples_kept", "train", "dropped", "teacher_verified", "teacher_verified_rate")
    return {key: report.get(key) for key in keys}


def _report(
    config: ExperimentConfig,
    hardware: Hardware,
    systems: list[System],
    test_examples: int,
    results: dict[str, dict[str, Any]],
    forgetting: dict[str, dict[str, Any]],
    records: list[dict[str, Any]],
) -> dict[str, Any]:
    """report.json: every system's numbers, the paired comparisons, latency CDFs, break-even and forgetting."""
    paired = comparisons(results, records, config.seed)
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "run_name": config.run_name,
        "task": config.task.name,
        "test_examples": test_examples,
        "hardware_profiles": {k: v.usd_per_hour for k, v in hardware.profiles.items()},
        "hardware": hardware.record(),
        "engine": config.benchmark.engine.backend,
        "systems": {s.name: results[s.name] for s in systems},
        "comparisons": paired,
        "latency_cdf": {
            name: {
                str(level): sorted(r["e2e_s"] for r in records if r["system"] == name and r.get("concurrency") == level)
                for level in config.benchmark.load_test.concurrency
            }
            for name in results
            if "load" in results[name]
        },
        "break_even": break_even(config, hardware, results, paired["student_tuned_vs"]),
        "forgetting": forgetting,
    }
    if names.STUDENT_TUNED in forgetting and names.STUDENT_BASE in forgetting:
        tuned, base = forgetting[names.STUDENT_TUNED], forgetting[names.STUDENT_BASE]
        forgetting["change"] = {key: tuned[key] - base[key] for key in ("accuracy", "leakage_rate")}
        forgetting["change"] |= paired_probe_tests(
            records, names.STUDENT_BASE, names.STUDENT_TUNED, config.benchmark.probe_task_categories
        )
    return report


def _systems_table(results: dict[str, dict[str, Any]]) -> tuple[str, list[str], list[list[Any]]]:
    """The W&B table of systems: accuracy with its interval, cost, latency, prompt length."""
    columns = ["system", "accuracy", "ci_low", "ci_high", "cost_per_1k_requests", "latency_p50_s", "mean_prompt_tokens"]
    rows = [
        [name, m["accuracy"], *m["accuracy_ci95"], m["cost_per_1k_requests"], latency_p50(m), m["mean_prompt_tokens"]]
        for name, m in results.items()
    ]
    return "systems", columns, rows
