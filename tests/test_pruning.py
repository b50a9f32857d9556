"""A student derived from its teacher by depth pruning: the layer that changes nothing goes first, the pruned
model loads in transformers and vLLM with the layers asked for, trains with KD from its teacher, and bad input
stops with one line."""

from __future__ import annotations

import json

import pytest

from pipeline.config import validate_config
from pipeline.console import PipelineError
from pipeline.pruning import student_model
from tests.conftest import build_tiny_model, tiny_config

IDENTITY_LAYER = 1


@pytest.fixture(scope="module")
def four_layer_teacher(tmp_path_factory, tokenizer):
    """A 4-layer random Llama whose layer 1 is an identity map: its attention and MLP write zeros into the
    residual stream, so its output is its input (block influence 0)."""
    import torch
    from transformers import LlamaForCausalLM

    path = build_tiny_model(tmp_path_factory.mktemp("four-layer-teacher"), tokenizer, layers=4)
    model = LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        layer = model.model.layers[IDENTITY_LAYER]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(path, safe_serialization=True)
    return path


def pruned_config(tmp_path, teacher, keep_layers, **overrides):
    raw = tiny_config(tmp_path, teacher, **overrides)
    raw["student"] = {"prune": {"keep_layers": keep_layers, "calibration_examples": 4}}
    return validate_config(raw)


def test_the_layer_that_changes_nothing_is_dropped_and_the_model_computes_the_same(tmp_path, four_layer_teacher):
    import torch
    from transformers import AutoModelForCausalLM

    config = pruned_config(tmp_path, four_layer_teacher, keep_layers=0.75)  # 3 of 4
    assert config.student.model == str(four_layer_teacher)  # the source, filled in from the teacher
    folder = student_model(config)
    manifest = json.loads((config.layout.stage_dir("student") / "manifest.json").read_text())["metrics"]
    assert (manifest["layers_total"], manifest["layers_kept"], manifest["layers_dropped"]) == (4, 3, [IDENTITY_LAYER])
    importance = manifest["importance"]
    assert (
        importance[IDENTITY_LAYER] == pytest.approx(0.0, abs=1e-6)
        and min(value for index, value in enumerate(importance) if index != IDENTITY_LAYER) > 1e-3
    )
    pruned = AutoModelForCausalLM.from_pretrained(folder)
    original = AutoModelForCausalLM.from_pretrained(four_layer_teacher)
    assert pruned.config.num_hidden_layers == len(pruned.model.layers) == 3
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():  # the identity layer gone, the function is the same
        assert torch.allclose(pruned(ids).logits, original(ids).logits, atol=1e-4)
    stamp = (folder_path := config.layout.pruned_student).stat().st_mtime_ns
    assert student_model(config) == str(folder_path) and folder_path.stat().st_mtime_ns == stamp  # made once
    # Half the layers: the identity layer and the next least important one.
    halved = student_model(pruned_config(tmp_path / "half", four_layer_teacher, keep_layers=2))
    assert len(AutoModelForCausalLM.from_pretrained(halved).model.layers) == 2


@pytest.mark.parametrize(
    ("keep_layers", "message"),
    [
        (0, "student.prune.keep_layers: Input should be greater than 0"),
        (1.5, "student.prune.keep_layers: Value error, a fraction below 1"),
    ],
)
def test_a_size_that_is_no_size_is_a_config_error(tmp_path, tiny_model, keep_layers, message):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        pruned_config(tmp_path, tiny_model, keep_layers)


def test_keeping_every_layer_or_an_unknown_architecture_stops_with_one_line(tmp_path, four_layer_teacher, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.cli import main

    with pytest.raises(PipelineError, match=r"^student.prune.keep_layers: 4 keeps 4 of the teacher's 4 layers"):
        student_model(pruned_config(tmp_path, four_layer_teacher, keep_layers=4))
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=len(tokenizer))).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    with pytest.raises(
        PipelineError, match="^student.prune: the pruner drops layers of a decoder stack at model.layers"
    ):
        student_model(pruned_config(tmp_path / "g", gpt2, keep_layers=1))
    with pytest.raises(ValueError, match="student.model: a pruned student is derived from teacher.model"):
        raw = tiny_config(tmp_path, gpt2)
        raw["student"] = {"model": "other", "prune": {"keep_layers": 1}}
        validate_config(raw)
    # Through the CLI: one line, exit 2.
    raw = tiny_config(tmp_path / "cli", four_layer_teacher)
    raw["student"] = {"prune": {"keep_layers": 4}}
    path = tmp_path / "cli.json"
    path.write_text(json.dumps(raw))
    assert main(["train", "--config", str(path)]) == 2


@pytest.mark.integration
def test_a_pruned_student_trains_with_kd_from_its_teacher_and_vllm_serves_it(tmp_path, four_layer_teacher):
    """generate (vLLM, the 4-layer teacher's top-5 logprobs) -> filter -> train with objective kd on the student
    pruned to 2 layers: the KL term trains it, and vLLM loads the pruned folder."""
    from pipeline.cli import run_pipeline
    from pipeline.config import EngineConfig, SamplingConfig
    from pipeline.engines import load_engine

    config = pruned_config(tmp_path, four_layer_teacher, keep_layers=2)
    raw = config.model_dump()
    raw["teacher"]["engine"] = {"backend": "vllm", "max_model_len": 1024}
    raw["teacher"]["sampling"].update({"n": 1, "logprobs": 5})
    raw["train"].update({"objective": "kd", "max_steps": 2, "merge": False})
    config = validate_config(raw)
    run_pipeline(config, stages=("generate", "filter", "train"))
    metrics = json.loads((config.run_dir / "train" / "train_metrics.json").read_text())
    logged = [entry for entry in metrics["log_history"] if "kd_kl" in entry]
    assert metrics["base_model"] == f"{four_layer_teacher} pruned to keep_layers=2" and logged
    assert all(entry["kd_kl"] > 0 for entry in logged)
    engine = load_engine(str(config.layout.pruned_student), EngineConfig(max_model_len=512), seed=0)
    try:
        answer = engine.generate([[{"role": "user", "content": "hi"}]], SamplingConfig(max_tokens=4), progress=False)
        assert answer[0].completions[0].output_tokens > 0
    finally:
        engine.close()


def test_a_pruned_students_report_says_what_was_dropped_and_what_it_gives_up_against_the_teacher(tmp_path):
    """report.json keeps the pruning and the probe against the teacher beside the usual one; the verdict says the
    general ability given up, report.md how the student was made, with its layer-importance plot."""
    from pipeline.benchmark.report import write_report
    from pipeline.benchmark.results import Report, convert, read_report, to_builtins, write_report_json
    from pipeline.benchmark.verdict import verdict
    from tests.test_hardware import report_numbers

    numbers = report_numbers("vllm")
    numbers["forgetting"] = {
        "change": {"accuracy": 0.05, "leakage_rate": -0.02},
        "change_vs_teacher": {"accuracy": -0.12, "leakage_rate": 0.04, "accuracy_test": {"p_value": 0.003}},
    }
    numbers["pruned"] = {
        "source": "teacher-model",
        "layers_total": 4,
        "layers_kept": 2,
        "layers_dropped": [1, 3],
        "importance": [0.3, 0.0, 0.2, 0.01],
        "parameters": 12_000_000,
    }
    report = convert(numbers, Report)
    path = tmp_path / "report.json"
    write_report_json(path, report)
    again = read_report(path)
    assert to_builtins(again.forgetting.change_vs_teacher) == to_builtins(report.forgetting.change_vs_teacher)
    assert again.pruned.layers_dropped == [1, 3]
    assert (
        "Against the teacher it replaces (the student is pruned from it), the tuned student's probe accuracy differs "
        "by -12.0% (paired McNemar p = 0.003) and its leakage rate by +4.0%: the general ability this deployment "
        "gives up." in verdict(report)
    )
    # A 12-point probe loss against the teacher breaks benchmark.verdict.max_probe_accuracy_drop (0.05), though the
    # tuned student gained on its untuned, pruned self: judged against what it replaces, it is not worth it as is.
    assert (
        "Verdict: not worth it as trained — the pruned student does the task, but against the teacher it replaces it "
        "gives up base capabilities (probe accuracy fell 0.120 > benchmark.verdict.max_probe_accuracy_drop 0.05)"
        in verdict(report)
    )
    written = write_report(report, tmp_path / "report.md")
    markdown = (tmp_path / "report.md").read_text()
    assert (
        "The student is the teacher's model pruned from 4 to 2 decoder layers, 12M parameters: those with the lowest "
        "block influence on the task's train prompts were dropped (1, 3; `layer_importance.png`)" in markdown
    )
    assert tmp_path / "layer_importance.png" in written and (tmp_path / "layer_importance.png").stat().st_size > 1000


@pytest.mark.parametrize(("source", "one_filter"), [("teacher", True), ("self", False)])
def test_a_prune_level_makes_its_own_filter_output_only_where_the_student_answers_its_replay(
    tmp_path, tiny_model, source, one_filter
):
    """A sweep over prune levels shares one filter output when the teacher answers replay: the filter reads the
    student's prompt style and tokenizer, which pruning keeps. Answering its own replay, each level is a filter."""
    from pipeline.filter.stage import filter_stage
    from pipeline.tasks import task_for

    fingerprints = set()
    for keep_layers in (0.5, 0.75):
        raw = tiny_config(tmp_path, tiny_model)
        raw["student"] = {"prune": {"keep_layers": keep_layers, "calibration_examples": 4}}
        raw["train"]["replay"] = {"fraction": 0.2, "source": source}
        config = validate_config(raw)
        fingerprints.add(filter_stage(config, task_for(config)).fingerprint)
    assert len(fingerprints) == (1 if one_filter else 2)


def test_a_sweep_over_prune_levels_measures_the_teacher_once_and_each_untuned_student_apart(
    tmp_path, four_layer_teacher
):
    """benchmark.shared_units: the teacher's figures do not depend on the student, so two prune levels read one
    teacher measurement; each level's untuned student is its own. Unpruned, the teacher takes no probe: another."""
    import shutil

    from pipeline.benchmark.shared_units import with_shared_units
    from pipeline.benchmark.stage import benchmark_stage
    from pipeline.benchmark.systems import systems_for, tuned_student_dir
    from pipeline.runs import input_label
    from pipeline.tasks import task_for

    def stores(prune: dict | None) -> dict[str, str]:
        shared = {
            "benchmark.shared_units": str(tmp_path / "shared"),
            "run_name": f"keep-{prune and prune['keep_layers']}",
        }
        raw = tiny_config(tmp_path, four_layer_teacher, **shared)
        if prune:
            raw["student"] = {"prune": prune}
        config = validate_config(raw)
        student_model(config)  # the pruned student, as the benchmark makes it before anything loads it
        tuned = tuned_student_dir(config)
        if not tuned.is_dir():  # the trained student the benchmark would serve: its files are not read here
            shutil.copytree(four_layer_teacher, tuned)
        stage = benchmark_stage(config, task_for(config))
        units = with_shared_units(
            None,
            stage,
            str(tmp_path / "shared"),
            config.benchmark.systems,
            systems_for(config),
            input_label(config, tuned),
        )
        return {name: store.path.name for name, store in units.shared.items()}

    half, three_quarters, whole = (
        stores({"keep_layers": keep, "calibration_examples": 4}) if keep else stores(None) for keep in (0.5, 0.75, None)
    )
    assert set(half) == {"teacher", "student_base", "student_prompted"}  # the tuned student is never shared
    assert half["teacher"] == three_quarters["teacher"]
    assert half["student_base"] != three_quarters["student_base"]
    assert half["student_base"] == half["student_prompted"] != half["teacher"]
    assert whole["teacher"] != half["teacher"]  # a pruned student has the teacher probed
