"""Every script in scripts/ runs in a test (untested scripts rot), on a tiny model with the transformers engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def run(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPTS / script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )


def run_python(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_in_process(script: str, *args: str) -> None:
    """Run a Python script as `__main__` in this process (print to stdout; capsys reads it; exit 0 or none).

    For the bench scripts, whose work is an engine or a trainer: here the modules (and vLLM's in-process engine,
    ~20 s to start the first time in a process) are already loaded by earlier tests; a subprocess paid for
    both again. The shell scripts, and the bench scripts' own `__main__` guard, still run as programs above."""
    import runpy
    from unittest import mock

    with (
        mock.patch.object(sys, "argv", [str(SCRIPTS / script), *args]),
        mock.patch.dict(os.environ, WANDB_MODE="disabled"),
    ):
        try:
            runpy.run_path(str(SCRIPTS / script), run_name="__main__")
        except SystemExit as exc:
            assert exc.code in (0, None), f"{script} exited {exc.code}"


@pytest.fixture
def tiny_env(tmp_path, tiny_model):
    raw = tiny_config(tmp_path, tiny_model)
    raw["task"] = {"name": "tests.plugin_task:ParityTask", "params": {"num_train": 10, "num_test": 4}}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "CONFIG": str(config), "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    return env, Path(raw["runs_dir"]) / raw["run_name"]


@pytest.mark.integration
def test_stage_scripts_then_the_demo_reruns_only_what_an_override_reaches(tiny_env):
    """The four stage scripts run the pipeline; then demo.sh = setup.sh (idempotent here, the venv exists) +
    run_all.sh skips every stage whose inputs and config are unchanged, and an override on its command line
    reaches the config: the benchmark it changes runs again. (One test: the demo alone took ~55 s here.)"""
    env, run_dir = tiny_env
    for script in ("01_generate.sh", "02_filter.sh", "03_train.sh", "04_benchmark.sh"):
        result = run(script, env)
        assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((run_dir / "benchmark" / "report.json").read_text())
    assert set(report["systems"]) == {"teacher", "student_base", "student_prompted", "student_tuned"}
    # gpu_check.sh's summary of its whole-pipeline step reads this run (its runs/ folder), benches or none.
    summary = run_python("gpu_check_summary.py", str(run_dir.parents[1]), "bench_05b")
    assert summary.returncode == 0, summary.stderr[-2000:]
    steps = json.loads((run_dir / "train" / "train_metrics.json").read_text())["steps"]
    assert f"whole pipeline, QLoRA train stage: {steps} steps, " in summary.stdout
    assert f"benchmark on {report['hardware']['device']} x" in summary.stdout
    assert all(f"\n  {name}: decode " in summary.stdout for name in report["systems"])
    assert "bench_05b unpacked: no figures" in summary.stdout

    again = run("demo.sh", env, "benchmark.latency_requests=1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "setup: ready" in again.stdout
    for stage in ("generate", "filter", "train"):
        assert f"{stage}: skipped, inputs and config unchanged" in again.stderr
    assert "benchmark: skipped" not in again.stderr
    rerun = json.loads((run_dir / "benchmark" / "manifest.json").read_text())
    assert rerun["config"]["benchmark"]["latency_requests"] == 1
    assert f"Report: {run_dir}/benchmark/report.md" in again.stdout


def test_stage_script_reports_bad_config_in_one_line(tmp_path):
    env = {**os.environ, "CONFIG": str(tmp_path / "nope.yaml")}
    result = run("02_filter.sh", env)
    assert result.returncode == 2
    assert result.stderr.strip() == f"distill: error: config file not found: {tmp_path / 'nope.yaml'}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/demo.sh" in readme
    assert "bash scripts/test.sh" in ci


@pytest.mark.integration
def test_filter_benchmark_script_prints_rates():
    result = run_python("bench_filter.py", "--rows", "400")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    rules = next(line for line in lines if line.startswith("rules+exact_dedup"))
    near = next(line for line in lines if line.startswith("near_dedup"))
    assert "400 rows in" in rules and "rows/s" in rules and "'exact_dedup'" in rules and "'truncated'" in rules
    assert "400 rows in" in near and "'near_dedup'" in near


def test_slurm_array_script_generates_its_shard_and_queues_the_merge(tmp_path, tiny_model):
    """The sbatch file run as Slurm would run it: two array tasks, then the merge it queued (a stand-in
    `sbatch` records the submission, since there is no Slurm here)."""
    raw = tiny_config(tmp_path, tiny_model)
    raw["teacher"]["sampling"] = {"n": 1, "temperature": 0.0, "max_tokens": 8}
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    submissions = tmp_path / "sbatch.log"
    (bin_dir / "sbatch").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> {submissions}\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CONFIG": str(config_file),
        "WANDB_MODE": "disabled",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_ARRAY_JOB_ID": "4242",
        "SLURM_ARRAY_TASK_COUNT": "2",
        "SLURM_ARRAY_TASK_MIN": "0",
    }
    for task_id in ("0", "1"):
        result = run("slurm/generate_sharded.sbatch", {**env, "SLURM_ARRAY_TASK_ID": task_id})
        assert result.returncode == 0, result.stderr[-2000:]
    submitted = submissions.read_text().splitlines()
    assert "--dependency=afterok:4242" in submitted  # queued once, by the first task, after the whole array
    wrap = submitted[submitted.index("--wrap") + 1]
    assert "--merge-shards 2" in wrap
    merged = subprocess.run(["bash", "-c", wrap], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr[-2000:]
    run_dir = Path(raw["runs_dir"]) / raw["run_name"]
    rows = [json.loads(line) for line in (run_dir / "generate" / "teacher_outputs.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["prompt_id"] for r in rows}) == 12


@pytest.mark.integration
def test_generate_benchmark_script_prints_the_ratio(capsys):
    """bench_generate.py on the bundled model, shrunk to 4 prompts and 8 tokens: runs both sides, prints a ratio."""
    run_in_process("bench_generate.py", "--prompts", "4", "teacher.sampling.max_tokens=8")
    stdout = capsys.readouterr().out
    assert "[0] raw :" in stdout and "[0] ours:" in stdout
    ratio = float(stdout.strip().splitlines()[-1].rsplit("=", 1)[1])
    assert ratio > 0


@pytest.mark.integration
def test_train_benchmark_script_prints_both_ratios(tmp_path, capsys):
    """bench_train.py on the bundled model, one short step each way, in two rounds: both sides run, ratios and
    MFU print, the ratio is the median of the rounds' (scripts/gpu_check.sh takes turns this way on a GPU).

    An empty runs_dir makes it build its rows from the task, as on a fresh clone with no demo run yet. The JSON
    (scripts/gpu_check.sh's table) holds the figures printed, written after each mode."""
    import statistics

    figures = tmp_path / "figures.json"
    run_in_process(
        "bench_train.py",
        *("--steps", "2", "--warmup", "1", "--rounds", "2", "--peak-tflops", "1", "--json", str(figures)),
        # The short prompt: the default's retrieved one (~120 tokens) does not fit max_length 64.
        *("student.prompt_style=short", "train.max_length=64", "train.per_device_train_batch_size=2"),
        f"runs_dir={tmp_path}",
    )
    stdout = capsys.readouterr().out
    for name in ("unpacked", "packed  "):
        assert f"{name} ratio ours/plain = " in stdout and f"{name} model FLOPs utilisation" in stdout
    assert "packing: " in stdout
    written = json.loads(figures.read_text())
    for mode in ("unpacked", "packed"):
        figures = written[mode]
        assert len(figures["round_ratios"]) == 2 and figures["ratio"] == statistics.median(figures["round_ratios"])
        assert f"{mode:<8} ratio ours/plain = {figures['ratio']:.3f} (median of 2 rounds: " in stdout
        assert f"{mode:<8} ours : " in stdout and "(round 2 of 2)" in stdout

    # gpu_check.sh's summary reads these figures: its table, floors and rules, here on copies made to miss a floor
    # and to beat the default's rule (a bench that did not run gets a row saying so).
    check = tmp_path / "check"
    check.mkdir()
    (check / "bench_05b.json").write_text(json.dumps(written))
    slow = json.loads(json.dumps(written))
    slow["packed"].update(ratio=0.5, round_ratios=[0.4, 0.5, 0.6], mfu=0.3)
    (check / "bench_15b.json").write_text(json.dumps(slow))
    (check / "fused_head.json").write_text(json.dumps({**written, "packed": slow["packed"] | {"ratio": 9.0}}))
    result = run_python("gpu_check_summary.py", str(check), "bench_05b", "bench_15b", "liger_unpacked", "fused_head")
    assert result.returncode == 0, result.stderr[-2000:]
    unpacked = written["unpacked"]
    row = f"| unpacked | {unpacked['ours_tok_s']:,.0f} | {unpacked['plain_tok_s']:,.0f} | {unpacked['ratio']:.2f} ("
    assert row in result.stdout and "| liger_unpacked | (no result: liger_unpacked.log, if it ran) |" in result.stdout
    assert "| packed | " in result.stdout and " (fused_head) | packed | " in result.stdout
    met = "met" if unpacked["ratio"] >= 0.9 else "MISSED"
    assert f"bench_05b unpacked: ours/plain {unpacked['ratio']:.2f} {met} (>= 0.9)" in result.stdout
    assert "bench_15b packed: ours/plain 0.50 MISSED (>= 0.9)" in result.stdout
    assert "bench_15b packed: MFU 30.0% met (>= 20%)" in result.stdout
    assert "fused LM head, 0.5B packed: 9.00 with" in result.stdout and "NOT borne out" in result.stdout


def test_the_host_bound_train_benchmark_trains_a_deep_narrow_stand_in_one_example_a_step(tmp_path, capsys):
    """`--host-bound`: the 28-layer, 32-wide stand-in at batch 1, both sides on the same single-example batches."""
    figures = tmp_path / "figures.json"
    run_in_process(
        "bench_train.py",
        *("--host-bound", "--only", "unpacked", "--steps", "3", "--warmup", "1", "--json", str(figures)),
        *("student.prompt_style=short", "train.max_length=64", f"runs_dir={tmp_path}"),
    )
    assert "unpacked ratio ours/plain = " in capsys.readouterr().out
    written = json.loads(figures.read_text())
    assert written["model"] == "host-bound stand-in" and set(written) == {"device", "model", "unpacked"}
    assert 0 < written["unpacked"]["tokens_per_step"] <= 64  # one example, cut at max_length


@pytest.mark.integration
def test_constrained_benchmark_script_prints_free_and_constrained_rows(tmp_path, capsys):
    """bench_constrained.py on the bundled teacher, transformers engine, 4 prompts per data set: with the
    constraint no answer is an invalid label, whatever the free answers were."""
    out = tmp_path / "rows.json"
    run_in_process("bench_constrained.py", "--backend", "transformers", "--limit", "4", "--json", str(out))
    rows = json.loads(out.read_text())
    assert [(r["data"], r["constrained"]) for r in rows] == [
        ("sentiment example", False),
        ("sentiment example", True),
        ("synthetic 30 labels", False),
        ("synthetic 30 labels", True),
    ]
    assert all(r["n"] == 4 and r["invalid_labels"] == 0 and r["truncated"] == 0 for r in rows if r["constrained"])
    assert "| sentiment example | 2 | constrained | 4 |" in capsys.readouterr().out
