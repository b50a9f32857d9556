"""Configs validate on load with errors that name the key; the CLI turns bad input into one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import ConfigError, load_config, parse_overrides, validate_config
from pipeline.models import ModelError, resolve_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates_and_builds_its_task(path, monkeypatch):
    from pipeline.tasks import build_task

    monkeypatch.chdir(ROOT)
    config = load_config(path)
    task = build_task(config.task.name, config.task.params, config.seed, config.base_dir)
    assert config.teacher.prompt_style in task.prompt_styles and config.student.prompt_style in task.prompt_styles


def test_at_least_the_embedded_default_and_a_gpu_config_ship():
    names = {p.name for p in CONFIGS}
    assert "smollm2_support.yaml" in names and "qwen7b_to_qwen0.5b.yaml" in names


SYSTEMS_ON_X = [
    {"name": "teacher", "model": "teacher", "prompt_style": "full", "hardware": "x"},
    {"name": "student_base", "model": "student", "prompt_style": "short"},
    {"name": "student_tuned", "model": "tuned", "prompt_style": "short"},
]


def _minimal(**extra):
    return {"run_name": "x", "task": {"name": "support"}, "teacher": {"model": "m"}, "student": {"model": "m"}, **extra}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_minimal(train={"learning_rate": "fast"}), "train.learning_rate: Input should be a valid number"),
        (_minimal(train={"lr": 1e-4}), "train.lr: unknown key"),
        ({"run_name": "x", "task": {"name": "support"}, "student": {"model": "m"}}, "teacher: Field required"),
        (_minimal(teacher={"model": "m", "sampling": {"temperature": -1}}), "teacher.sampling.temperature"),
        (_minimal(teacher={"model": "m", "sampling": {"choices": []}}), "teacher.sampling.choices: Value error, needs"),
        (_minimal(benchmark={"hardware_profiles": {"mine": {}}}), "benchmark.hardware_profiles.mine.usd_per_hour: Fi"),
        (
            _minimal(benchmark={"hardware_profiles": {"mine": {"usd_per_hour": 1, "memory_gbps": 0}}}),
            "benchmark.hardware_profiles.mine.memory_gbps: Input should be greater than 0",
        ),
        (
            _minimal(benchmark={"hardware_profiles": {"h100": {"usd_per_hour": 2, "peak_tflops": -1}}}),
            "benchmark.hardware_profiles.h100.peak_tflops: Input should be greater than 0",
        ),
        (_minimal(train={"replay": {"source": "dataset"}}), "train.replay: Value error, dataset: source dataset needs"),
        (
            _minimal(train={"replay": {"dataset": "x.jsonl"}}),
            "train.replay: Value error, dataset: given with source 'self'",
        ),
        (
            _minimal(train={"objective": "kd", "replay": {"fraction": 0.2}}),
            "train: Value error, replay: replay rows have no teacher logprobs",
        ),
        (_minimal(benchmark={"serving_hardware": "tpu"}), "benchmark: Value error, serving_hardware: 'tpu' is not in"),
        (
            _minimal(benchmark={"systems": SYSTEMS_ON_X}),
            "benchmark: Value error, systems.teacher.hardware: 'x' is not in hardware_profiles",
        ),
        (_minimal(benchmark={"sampling": {"choices": ["a", "a"]}}), "benchmark.sampling.choices: Value error, a"),
        (
            _minimal(benchmark={"probe_task_categories": ["arithmetic", "maths"]}),
            "benchmark.probe_task_categories: Value error, unknown probe categories: maths; the probe has arithmetic,",
        ),
        (
            _minimal(teacher={"model": "m", "sampling": {"choices": ["a"], "json_schema": {"type": "object"}}}),
            "teacher.sampling: Value error, choices and json_schema",
        ),
        (
            _minimal(promote={"max_probe_accuracy_drop": 0.1}),
            "promote.max_probe_accuracy_drop: moved to benchmark.verdict.max_probe_accuracy_drop",
        ),
        (
            _minimal(promote={"max_leakage_rate": 0.02}),
            "promote.max_leakage_rate: removed: the gate judges leakage as the verdict does, by benchmark.verdict.max",
        ),
    ],
)
def test_bad_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate_config(raw)


def test_overrides_reach_nested_keys_and_parse_values(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_minimal()))
    config = load_config(path, ["train.lora.r=4", "seed=9", "teacher.sampling.temperature=0.5"])
    assert (config.train.lora.r, config.seed, config.teacher.sampling.temperature) == (4, 9, 0.5)
    assert parse_overrides(["a.b=hello"]) == {"a": {"b": "hello"}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_unknown_models_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="bundled:nope"):
        resolve_model("bundled:nope")
    with pytest.raises(ModelError, match="no-such-org/no-such-model"):
        resolve_model("no-such-org/no-such-model")
    with pytest.raises(ModelError, match="not a local folder"):
        resolve_model("./missing/model/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))


def _write(tmp_path, raw) -> Path:
    path = tmp_path / f"exp{len(list(tmp_path.glob('exp*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    cases = [
        (["filter", "--config", str(tmp_path / "missing.yaml")], "config file not found"),
        (["generate", "--config", str(_write(tmp_path, _minimal(bogus=1)))], "bogus: unknown key"),
        (
            ["generate", "--config", str(_write(tmp_path, _minimal(teacher={"model": "no-org/no-model"})))],
            "no-org/no-model",
        ),
        (
            [
                "generate",
                "--config",
                str(_write(tmp_path, _minimal(task={"name": "classification", "params": {"path": "absent.csv"}}))),
            ],
            "absent.csv",
        ),
        (["filter", "--config", str(_write(tmp_path, _minimal()))], "teacher_outputs.jsonl"),
        (  # a later stage's typo fails `run` before it generates (the filter's is the first to read it)
            ["run", "--config", str(_write(tmp_path, _minimal(student={"model": "m", "prompt_style": "retreived"})))],
            "student.prompt_style: 'retreived' is not a prompt style of this task; choose one of ('short', 'full', ",
        ),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err
        assert err.startswith("distill: error:") and expected in err, err
        assert len(err.splitlines()) == 1, err


def test_classification_missing_column_names_the_column(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("body,label\nhello,a\nbye,b\n" * 10)
    path = _write(tmp_path, _minimal(task={"name": "classification", "params": {"path": "d.csv"}}))
    assert main(["generate", "--config", str(path)]) == 2
    assert "text" in capsys.readouterr().err


def test_console_script_is_installed_and_shows_every_stage():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ("generate", "filter", "train", "benchmark", "run"):
        assert name in out.stdout


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_cleared(tmp_path, tiny_model, capsys):
    import json
    import platform

    from tests.conftest import tiny_config

    raw = tiny_config(tmp_path, tiny_model)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    lock = tmp_path / "runs" / raw["run_name"] / ".lock"
    lock.parent.mkdir(parents=True)

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": platform.node(), "started": "earlier"}))
        assert main(["filter", "--config", str(config_file)]) == 75  # EX_TEMPFAIL: a scheduler retries later
        assert f"locked by pid {holder.pid}" in capsys.readouterr().err
        assert lock.exists()  # not ours to remove
    finally:
        holder.kill()
        holder.wait()

    # The holder is dead now: its lock is stale, so the run takes over (and then fails for its own reason).
    assert main(["filter", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "removing a stale lock" in err and "input file not found" in err
    assert not lock.exists()  # released on the way out


def test_json_logs_for_log_systems(tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.setenv("DISTILL_LOG_FORMAT", "json")
    from pipeline.console import log

    log("filter: 3/4 samples kept")
    record = json.loads(capsys.readouterr().err)
    assert record["stage"] == "filter" and record["message"] == "filter: 3/4 samples kept" and record["time"]


def test_the_tuned_student_is_served_the_prompt_it_trains_on():
    """student.prompt_style is the one setting for the prompt of training and of serving the tuned student."""
    systems = {s.name: s.prompt_style for s in validate_config(_minimal()).benchmark.systems}
    assert systems == {"teacher": "full", "student_base": "short", "student_prompted": "full", "student_tuned": "short"}
    retrieved = validate_config(_minimal(student={"model": "m", "prompt_style": "retrieved"}))
    assert {s.name: s.prompt_style for s in retrieved.benchmark.systems}["student_tuned"] == "retrieved"
    mismatch = [*SYSTEMS_ON_X[:2], {"name": "student_tuned", "model": "tuned", "prompt_style": "full"}]
    mismatch[0] = {**mismatch[0], "hardware": None}
    with pytest.raises(ConfigError, match=r"benchmark\.systems\.student_tuned\.prompt_style: 'full' is not student"):
        validate_config(_minimal(benchmark={"systems": mismatch}))
    # Another system may serve the tuned student another prompt: the two recipes side by side.
    other = [*mismatch[:2], {"name": "student_tuned", "model": "tuned"}, {**mismatch[2], "name": "tuned_full"}]
    assert validate_config(_minimal(benchmark={"systems": other})).benchmark.systems[3].prompt_style == "full"
