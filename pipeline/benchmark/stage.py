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
import hashlib
import json
from pathlib import Path
from typing import Any

import msgspec
from msgspec import UNSET, structs

from pipeline import names
from pipeline.benchmark.costs import Hardware, add_costs, break_even, one_off_cost, resolve_hardware
from pipeline.benchmark.evaluate import (
    accuracy_metrics,
    check_adapter_applied,
    check_no_test_leak,
    comparisons,
    evaluate_system,
    run_probe,
)
from pipeline.benchmark.judge import judge_enabled, judge_model, run_judge
from pipeline.benchmark.probe import forgetting_change, run_lm_eval
from pipeline.benchmark.report import write_report
from pipeline.benchmark.results import (
    REPORT_SCHEMA_VERSION,
    BreakEven,
    CategoryCoverage,
    Comparable,
    FilterSummary,
    Forgetting,
    JudgeSection,
    OtherRun,
    ProbeSummary,
    PrunedStudent,
    Recipe,
    Report,
    SystemResult,
    convert,
    present_or,
    read_report,
    to_builtins,
    write_report_json,
)
from pipeline.benchmark.roofline import add_roofline_shares
from pipeline.benchmark.serving import run_load_tests
from pipeline.benchmark.shared_units import with_shared_units
from pipeline.benchmark.systems import (
    System,
    copy_rows,
    engine_key,
    system_engine,
    systems_for,
    tuned_student_dir,
    twins,
)
from pipeline.benchmark.verdict import judge_cannot_rank, latency_p50
from pipeline.config import BenchmarkConfig, ExperimentConfig, TrainConfig
from pipeline.console import PipelineError, log
from pipeline.engines import Engine, load_engine
from pipeline.files import read_jsonl, sha256_file, write_jsonl
from pipeline.layout import read_filter_report
from pipeline.pruning import pruning_manifest, student_identity, student_model
from pipeline.runs import FinishedUnits, Stage, input_label
from pipeline.tasks import Example, Task, task_for


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
    judged = judge_enabled(config.benchmark.judge, task)
    if any(on_teacher_engine) or (judged and judge_model(config)[1] is config.teacher.engine):
        sections["teacher_engine"] = config.teacher.engine.model_dump()
    return Stage(config, "benchmark", sections, inputs=[tuned_student_dir(config), *task.data_files()])


def run_benchmark(config: ExperimentConfig, force: bool = False) -> Path:
    task = task_for(config)
    layout = config.layout
    bench = config.benchmark
    with benchmark_stage(config, task) as stage:
        if stage.skip(force, layout.report_json):
            return layout.report_json
        if bench.engine.backend == "openai":
            raise PipelineError(
                "benchmark.engine.backend: the students run here on vllm or transformers; a system measured through "
                "a server names it in its own engine (benchmark.systems.<name>.engine)"
            )
        examples = task.split("test")
        if bench.max_test_examples:
            examples = examples[: bench.max_test_examples]
        if not examples:
            raise PipelineError("benchmark: the test split is empty")
        check_no_test_leak(layout.train_data, task, examples, config.student.prompt_style)
        student_model(config)  # a pruned student is made before anything loads it
        systems = systems_for(config, task)
        constrained = [s.name for s in systems if s.constrained]
        fitted, longest = bench.sampling.constrained_to(task.answer_choices()).fitted_to_choices()
        if constrained and longest is not None:
            log(
                f"benchmark: benchmark.sampling.max_tokens raised from {bench.sampling.max_tokens} to "
                f"{fitted.max_tokens} for the systems answering constrained ({', '.join(constrained)}), to fit the "
                f"longest label, {longest!r}"
            )
        units = FinishedUnits(stage, force)  # a killed benchmark resumes after its last finished system
        if bench.shared_units:
            tuned = input_label(config, tuned_student_dir(config))
            units = with_shared_units(units, stage, bench.shared_units, bench.systems, systems, tuned)

        results, probed, records = _evaluate_offline(bench, config.seed, systems, task, examples, units)
        check_adapter_applied(records)
        forgetting = Forgetting(probed)
        judged = None
        if judge_enabled(bench.judge, task):  # every answer graded; accuracy becomes the judge's pass rate
            judged, judge_records = run_judge(
                bench.judge, judge_model(config), config.seed, task, examples, records, units
            )
            records += judge_records
            for name in results:
                task_records = [r for r in records if r["kind"] == "task" and r["system"] == name]
                results[name] = structs.replace(results[name], **structs.asdict(accuracy_metrics(task_records)))
        if bench.lm_eval.tasks:
            both = (names.STUDENT_BASE, names.STUDENT_TUNED)
            students = {s.name: (s.model, s.adapter) for s in systems if s.name in both}
            forgetting.lm_eval = units.run("lm_eval", lambda: run_lm_eval(bench.lm_eval, students))
        if bench.load_test.enabled:
            summaries, load_records = run_load_tests(bench, config.seed, systems, task, examples, units)
            records += load_records
            for name, levels in summaries.items():
                results[name].load = levels
        hardware = resolve_hardware(bench)
        add_costs(hardware, bench, systems, results)
        add_roofline_shares(hardware, bench, systems, results)
        one_off = one_off_cost(layout, config.teacher.engine, bench, hardware)
        report = _report(config, hardware, one_off, systems, len(examples), results, forgetting, records, judged)
        if any(system.constrained for system in results.values()):
            report.answer_choices = task.answer_choices()
        filtered = read_filter_report(layout)
        report.filter = _filter_summary(filtered)
        report.recipe = recipe(config.train, config.student.prompt_style, filtered)
        word = "labels" if task.labels() is not None else "categories"
        report.coverage = category_coverage(layout.train_data, records, word)
        report.comparable = comparable_on(config, task, examples)
        pruned = pruning_manifest(config)
        report.pruned = convert(pruned, PrunedStudent) if pruned else None
        report.other_runs = other_runs_of_the_task(config.run_dir, report.comparable)

        write_jsonl(layout.records, records)
        write_report_json(layout.report_json, report)
        rendered = write_report(report, layout.report_md, bench.verdict)  # report.md and its plots
        outputs = [layout.report_json, layout.records, *rendered]
        floats = {name: _floats(system) for name, system in results.items()}
        for name, judged_system in (judged.systems if judged else {}).items():  # W&B: the judge's rates too
            floats[name] |= {f"judge_{k}": v for k, v in _floats(judged_system.vs_teacher or None).items()}
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


class Measured(msgspec.Struct, kw_only=True):
    """One system measured on the offline engine: its row, its probe (None: not probed) and its records. Saved
    as a finished unit, so a killed benchmark's rerun takes it instead of measuring it again."""

    results: SystemResult
    forgetting: ProbeSummary | None
    records: list[dict[str, Any]]


def _evaluate_offline(
    bench: BenchmarkConfig,
    seed: int,
    systems: list[System],
    task: Task,
    examples: list[Example],
    units: FinishedUnits,
) -> tuple[dict[str, SystemResult], dict[str, ProbeSummary], list[dict[str, Any]]]:
    """Every system on the offline engine, and the students on the probe: (results, probed, records).
    Systems that share weights share one engine (in the embedded default, teacher and base student). Each
    system's figures and records are saved as one unit as it finishes: a rerun after a kill takes them, and
    loads no engine for a group already done."""
    by_model: dict[tuple[str, str | None, str], list[System]] = {}
    for system in systems:
        engine_config = system.engine or bench.engine
        by_model.setdefault((system.model, system.adapter, engine_key(engine_config)), []).append(system)
    copied_from = twins(systems)

    def saved(name: str) -> Measured:
        return convert(units.get(offline_unit(name)), Measured)

    for (model, adapter, _), group in by_model.items():
        todo = [system for system in group if offline_unit(system.name) not in units]
        if not todo:
            continue
        engine = load_engine(model, group[0].engine or bench.engine, seed, adapter)
        try:
            for system in todo:
                source = copied_from.get(system.name)
                twin = saved(source) if source else None
                measured = _measure(bench, system, engine, task, examples, source, twin)
                units.save(offline_unit(system.name), to_builtins(measured))
        finally:
            engine.close()
    done = {system.name: saved(system.name) for group in by_model.values() for system in group}
    results = {name: unit.results for name, unit in done.items()}
    probed = {name: unit.forgetting for name, unit in done.items() if unit.forgetting is not None}
    return results, probed, [record for unit in done.values() for record in unit.records]


def _measure(
    bench: BenchmarkConfig,
    system: System,
    engine: Engine,
    task: Task,
    examples: list[Example],
    source: str | None,
    twin: Measured | None,
) -> Measured:
    """One system on the test split, and on the probe when it is probed. A system with the weights and prompt of
    an earlier `source` (see `twins`) takes that one's figures and rows (`twin`) instead of a second run."""
    if source and twin:
        log(f"benchmark: {system.name} is {source}'s model with its prompt: measured once, rows copied")
        results = structs.replace(copy.deepcopy(twin.results), measured_as=source)
        records = copy_rows(twin.records, source, system.name, kinds=("task", "latency", "latency_cold"))
    else:
        log(f"benchmark: {system.name} ({system.prompt_style} prompt) on {len(examples)} test examples")
        results, records = evaluate_system(system, engine, task, examples, bench)
        if system.on_server and system.engine is not None:
            results.server = system.engine.server.base_url  # latency over the network, its weights elsewhere
    probed = None
    if system.probe and bench.probe:
        if twin and twin.forgetting is not None:
            probed = copy.deepcopy(twin.forgetting)
            records += copy_rows(twin.records, source, system.name, kinds=("probe",))
        else:
            probed, probe_records = run_probe(system, engine, task, bench)
            records += probe_records
    return Measured(results=results, forgetting=probed, records=records)


def recipe(train: TrainConfig, prompt_style: str, filter_report: dict[str, Any] | None) -> Recipe:
    """The training knobs that move forgetting, as this run set them, and the prompt the student trained with
    (other runs differ in it too): the verdict names them. With the replay rows the filter really added, and how
    many were wanted (a base student answering itself may add none): a fraction alone can mislead."""
    replayed = (filter_report or {}).get("replay") or {}
    return Recipe(
        replay_fraction=train.replay.fraction,
        replay_source=train.replay.source,
        replay_rows=replayed.get("kept"),
        replay_wanted=replayed.get("wanted"),
        learning_rate=train.learning_rate,
        lora_r=train.lora.r if train.method != "full" else None,
        num_train_epochs=train.num_train_epochs,
        prompt_style=prompt_style,
    )


def comparable_on(config: ExperimentConfig, task: Task, examples: list[Example]) -> Comparable:
    """What another run must share for its figures to sit beside this one's: the task's name and params, a data
    file by its content rather than its path, the student model, and the test examples answered."""
    data_files = {path.resolve(): sha256_file(path) for path in task.data_files()}
    params = {}
    for key, value in config.task.params.items():
        path = (config.base_dir / str(value)).resolve() if isinstance(value, str) else None
        params[key] = f"sha256:{data_files[path]}" if path in data_files else value
    test = [[ex.user, ex.reference] for ex in examples]  # by content: ids carry the file's name
    return Comparable(
        task=config.task.name,
        task_params=_digest(params),
        student_model=student_identity(config),
        test_split=_digest(test),
    )


def category_coverage(train_data: Path, records: list[dict[str, Any]], word: str) -> CategoryCoverage | None:
    """The tuned student's accuracy on test examples whose category (a label task's label) had kept training
    examples, against those whose had none; None when every test category had some, or without training data here
    (a benchmark of an outside student)."""
    if not train_data.is_file():
        return None
    trained = {row.get("category") for row in read_jsonl(train_data)}
    tuned = [r for r in records if r["kind"] == "task" and r["system"] == names.STUDENT_TUNED]
    tested = sorted({r["category"] for r in tuned})
    untrained = [category for category in tested if category not in trained]
    if not untrained:
        return None
    seen = [r["correct"] for r in tuned if r["category"] in trained]
    unseen = [r["correct"] for r in tuned if r["category"] not in trained]
    return CategoryCoverage(
        word=word,
        categories=len(tested),
        untrained=untrained,
        trained_n=len(seen),
        trained_accuracy=sum(seen) / len(seen) if seen else None,
        untrained_n=len(unseen),
        untrained_accuracy=sum(unseen) / len(unseen),
    )


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def other_runs_of_the_task(run_dir: Path, comparable: Comparable) -> list[OtherRun]:
    """Forgetting measured by the other finished runs of this task in the same runs folder as `run_dir`, with their
    recipes: the figures behind "which knob moves it", when there are any. Only runs comparable with this one
    count (`comparable_on`); a report written before runs recorded it is not cited, since nothing says it is."""
    found = []
    for path in sorted(run_dir.parent.glob("*/benchmark/report.json")):
        run = path.parent.parent
        if run == run_dir:
            continue
        try:
            other = read_report(path)
        except PipelineError:  # unreadable, or not a report: not a run to cite
            continue
        change = other.forgetting.change
        if other.comparable != comparable or not change or other.recipe is None:
            continue
        found.append(
            OtherRun(
                run=run.name,
                recipe=other.recipe,
                tuned_accuracy=other.systems[names.STUDENT_TUNED].accuracy,
                probe_change=present_or(change.accuracy, None),
                leakage_change=present_or(change.leakage_rate, None),
            )
        )
    return found


def _filter_summary(filter_report: dict[str, Any] | None) -> FilterSummary | None:
    """What the filter made of the teacher's training answers, for a verdict that must say why a teacher
    failed; None where the filter did not run here (a benchmark of an outside dataset)."""
    if filter_report is None:
        return None
    return FilterSummary(
        samples_in=filter_report.get("samples_in"),
        samples_kept=filter_report.get("samples_kept"),
        train=filter_report.get("train"),
        dropped=filter_report.get("dropped"),
        teacher_verified=filter_report.get("teacher_verified"),
        teacher_verified_rate=filter_report.get("teacher_verified_rate"),
    )


def _report(
    config: ExperimentConfig,
    hardware: Hardware,
    one_off: BreakEven,
    systems: list[System],
    test_examples: int,
    results: dict[str, SystemResult],
    forgetting: Forgetting,
    records: list[dict[str, Any]],
    judged: JudgeSection | None,
) -> Report:
    """report.json: every system's numbers, the paired comparisons, latency CDFs, break-even, forgetting and the
    judge (None: the task's own scorer decided every answer)."""
    bench = config.benchmark
    paired = comparisons(results, records, config.seed)
    cannot_rank = judge_cannot_rank(judged, bench.verdict)
    forgetting.change = forgetting_change(forgetting.systems, records, bench.probe_task_categories)
    if config.student.prune:
        forgetting.change_vs_teacher = forgetting_change(
            forgetting.systems, records, bench.probe_task_categories, against=names.TEACHER
        )
    return Report(
        schema_version=REPORT_SCHEMA_VERSION,
        run_name=config.run_name,
        task=config.task.name,
        test_examples=test_examples,
        hardware_profiles={k: v.usd_per_hour for k, v in hardware.profiles.items()},
        hardware=hardware.record(),
        engine=bench.engine.backend,
        systems={s.name: results[s.name] for s in systems},
        comparisons=paired,
        latency_cdf={
            name: {
                str(level): sorted(r["e2e_s"] for r in records if r["system"] == name and r.get("concurrency") == level)
                for level in bench.load_test.concurrency
            }
            for name in results
            if results[name].load is not UNSET
        },
        break_even=break_even(bench, one_off, results, paired.student_tuned_vs, cannot_rank),
        judge=judged,
        forgetting=forgetting,
    )


def _floats(figures: msgspec.Struct | None) -> dict[str, float]:
    """The float fields of a part of the report, by name: what W&B's summary takes."""
    if figures is None:
        return {}
    return {name: value for name, value in structs.asdict(figures).items() if isinstance(value, float)}


def _systems_table(results: dict[str, SystemResult]) -> tuple[str, list[str], list[list[Any]]]:
    """The W&B table of systems: accuracy with its interval, cost, latency, prompt length."""
    columns = ["system", "accuracy", "ci_low", "ci_high", "cost_per_1k_requests", "latency_p50_s", "mean_prompt_tokens"]
    rows = [
        [name, m.accuracy, *m.accuracy_ci95, m.cost_per_1k_requests, latency_p50(m), m.mean_prompt_tokens]
        for name, m in results.items()
    ]
    return "systems", columns, rows
