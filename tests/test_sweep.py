"""`distill sweep`: one teacher generation shared by every trial, a study the workers share through its database, and
the pick. The sweeps run the real stages and the real Optuna study on the tiny model (transformers engine); the pick's
rules are checked on fixture reports, where the figures can be set exactly."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline import names
from pipeline.benchmark.results import Report, convert
from pipeline.cli import main
from pipeline.config import VerdictConfig
from pipeline.layout import RunLayout, read_manifest
from pipeline.sweep import SweepPlan
from pipeline.sweep.plan import Trial
from pipeline.sweep.results import TrialResult, bars_missed, pick
from tests.conftest import kill_midway, tiny_config, wandb_records

ROOT = Path(__file__).resolve().parents[1]


def sweep_config(tmp_path: Path, model: Path, knobs: dict, overrides: dict | None = None, **sweep: object) -> Path:
    """A tiny experiment with a sweep section, written as a YAML file (what `distill sweep --config` reads)."""
    raw = tiny_config(tmp_path, model, **{"benchmark.probe": False, "train.max_steps": 2, **(overrides or {})})
    raw["sweep"] = {"knobs": knobs, "heartbeat_s": 1, **sweep}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def complete_trials(plan: SweepPlan) -> list:
    import optuna

    study = optuna.load_study(study_name=plan.study_name(False), storage=plan.storage_url)
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


@pytest.mark.xdist_group("sweep")
def test_a_killed_sweep_resumes_and_every_trial_shares_one_generation(tmp_path, tiny_model):
    """A 2x2 sweep (a train knob by a filter knob), SIGKILLed once its first trial has finished: the rerun finishes the
    rest without redoing the first, the teacher generated once, and the filter ran once per filter setting."""
    knobs = {"train.learning_rate": [0.05, 0.01], "filter.val_fraction": [0.25, 0.2]}
    path = sweep_config(tmp_path, tiny_model, knobs)
    plan = SweepPlan(path)
    first = RunLayout(plan.trials_dir / plan.trials(cheap=False)[0].key)
    kill_midway(["sweep", "--config", str(path)], first.report_json.is_file, "the first trial", timeout=300)
    first_train = read_manifest(first.stage_dir("train"))

    assert main(["sweep", "--config", str(path)]) == 0

    keys = [t.user_attrs["key"] for t in complete_trials(plan)]
    assert sorted(keys) == sorted(t.key for t in plan.trials(cheap=False))  # each trial finished, and only once
    assert read_manifest(first.stage_dir("train")) == first_train  # the finished trial was not trained again
    shared = sorted(p.name.split("-")[0] for p in plan.shared_dir.iterdir())
    assert shared == ["benchmark", "filter", "filter", "generate"]  # one generation; a filter per filter setting
    # The systems that do not serve the tuned student were measured by the first trial only, for all four: the
    # teacher in a file of its own, since it does not depend on the student.
    files = sorted((plan.shared_dir / "benchmark").iterdir())
    units = sorted(sorted(json.loads(line)["unit"] for line in path.read_text().splitlines()) for path in files)
    assert units == [["offline:student_base", "offline:student_prompted"], ["offline:teacher"]]
    for trial in plan.trials(cheap=False):
        layout = RunLayout(plan.trials_dir / trial.key)
        assert layout.stage_dir("generate").is_symlink() and layout.teacher_outputs.is_file()
        assert layout.report_json.is_file()
    report = json.loads((plan.dir / "report.json").read_text())
    assert len(report["trials"]) == 4 and (plan.dir / "pareto.png").stat().st_size > 0
    assert {row["key"] for row in report["trials"]} == set(keys)
    assert "Train + benchmark time" in (plan.dir / "report.md").read_text()


@pytest.mark.xdist_group("sweep")
def test_two_workers_of_the_slurm_array_split_the_trials(tmp_path, tiny_model):
    """scripts/slurm/sweep.sbatch run as two array tasks at once on one study: each takes trials of its own, no
    trial runs twice, and the teacher generates once (the second worker waits for the first's generation)."""
    path = sweep_config(tmp_path, tiny_model, {"train.learning_rate": [0.05, 0.02, 0.01, 0.005]})
    env = {**os.environ, "CONFIG": str(path), "WANDB_MODE": "disabled", "SLURM_SUBMIT_DIR": str(ROOT)}
    workers = [
        subprocess.Popen(
            ["bash", str(ROOT / "scripts/slurm/sweep.sbatch")],
            cwd=ROOT,
            env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-2000:]
    plan = SweepPlan(path)
    trials = complete_trials(plan)
    by_worker: dict[str, set[str]] = {}
    for trial in trials:
        by_worker.setdefault(trial.user_attrs["worker"], set()).add(trial.user_attrs["key"])
    assert len(trials) == 4 and len({t.user_attrs["key"] for t in trials}) == 4
    assert len(by_worker) == 2, by_worker  # both workers took trials
    assert [p.name.split("-")[0] for p in plan.shared_dir.iterdir()].count("generate") == 1
    assert json.loads((plan.dir / "report.json").read_text())["pick"] is None  # a random teacher scores 0


# The pick, on fixture reports.


def fixture_result(
    key: str,
    accuracy: float,
    cost: float,
    *,
    probe: float = 0.0,
    leakage: float = 0.0,
    teacher: float = 0.9,
    right: int | None = None,
    n: int = 60,
) -> TrialResult:
    """A finished trial with these figures: the tuned student's accuracy (its first `right` test answers right,
    default accuracy * n), its cost per 1k requests against the teacher's 1.0, and its probe and leakage change."""
    right = round(accuracy * n) if right is None else right
    raw = {
        "systems": {
            names.TEACHER: {"accuracy": teacher, "cost_per_1k_requests": 1.0},
            names.STUDENT_BASE: {"accuracy": 0.1, "cost_per_1k_requests": cost},
            names.STUDENT_TUNED: {"accuracy": accuracy, "cost_per_1k_requests": cost},
        },
        "forgetting": {"change": {"accuracy": probe, "leakage_rate": leakage}},
    }
    report = convert(raw, Report)
    outcomes = {f"t{i}": i < right for i in range(n)}
    result = TrialResult(Trial({"train.learning_rate": key}), Path(key), report, outcomes, 1.0)
    result.misses = bars_missed(result, VerdictConfig())
    return result


def test_of_two_trials_tied_in_accuracy_the_cheaper_is_picked():
    accurate = fixture_result("a", 0.95, cost=0.6)
    tied_cheaper = fixture_result("b", 0.93, cost=0.3)
    picked = pick([accurate, tied_cheaper], VerdictConfig())
    assert picked.chosen is tied_cheaper
    assert "is as accurate as" in picked.sentence and "0.50x its serving cost" in picked.sentence


def test_a_cost_within_the_noise_band_is_no_saving_so_forgetting_less_decides():
    forgets = fixture_result("a", 0.95, cost=0.50, probe=-0.04)
    keeps = fixture_result("b", 0.95, cost=0.55, probe=0.0)
    picked = pick([forgets, keeps], VerdictConfig())
    assert picked.chosen is keeps and "forgets less" in picked.sentence


def test_a_significantly_more_accurate_trial_wins_over_a_cheaper_one():
    best = fixture_result("a", 0.95, cost=0.6, teacher=0.7, right=57)
    worse = fixture_result("b", 0.65, cost=0.2, teacher=0.7, right=39)  # 93% of the teacher: it clears the bars
    picked = pick([best, worse], VerdictConfig())
    assert picked.chosen is best and "less accurate" in picked.sentence


def test_a_trial_that_breaks_a_bar_is_never_picked():
    forgetful = fixture_result("a", 1.0, cost=0.1, probe=-0.20)
    leaky = fixture_result("b", 1.0, cost=0.1, leakage=0.5)
    expensive = fixture_result("c", 1.0, cost=0.95)
    fine = fixture_result("d", 0.85, cost=0.5, right=51)
    picked = pick([forgetful, leaky, expensive, fine], VerdictConfig())
    assert picked.chosen is fine
    assert "the only trial that does" in picked.sentence


def test_when_no_trial_clears_the_report_names_the_bars_missed_and_by_how_much():
    forgetful = fixture_result("a", 1.0, cost=0.1, probe=-0.20)
    weak = fixture_result("b", 0.45, cost=0.5)
    picked = pick([forgetful, weak], VerdictConfig())
    assert picked.chosen is None
    assert picked.sentence.startswith("No trial clears every bar.")
    probe_miss = (
        "benchmark.verdict.max_probe_accuracy_drop (probe accuracy fell 20.0 points, 15.0 more than the 5 allowed)"
    )
    assert probe_miss in picked.sentence
    assert "benchmark.verdict.min_kept_of_teacher (keeps 50% of the teacher's accuracy, 40 points under 90%)" in (
        picked.sentence
    )


@pytest.mark.parametrize(
    ("knobs", "said"),
    [
        ({"train.learning_rte": [1e-4]}, "train.learning_rte: unknown key"),
        ({"train.learning_rate": []}, "train.learning_rate: an empty list of values"),
        ({"tracking.project": ["a", "b"]}, "tracking.project: no stage reads it"),
        (
            {"train.learning_rate": [-1.0]},
            "sweep trial train.learning_rate=-1: train.learning_rate: Input should be greater",
        ),
    ],
)
def test_bad_sweep_input_is_one_line_and_exit_2(tmp_path, tiny_model, capsys, knobs, said):
    path = sweep_config(tmp_path, tiny_model, knobs)
    assert main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err, err
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_the_cheap_rung_cannot_set_a_knob_and_a_config_without_a_sweep_says_so(tmp_path, tiny_model, capsys):
    path = sweep_config(
        tmp_path, tiny_model, {"train.max_steps": [2, 4]}, search="halving", halving={"cheap": {"train.max_steps": 1}}
    )
    assert main(["sweep", "--config", str(path)]) == 2
    assert "sweep.halving.cheap.train.max_steps: also a knob" in capsys.readouterr().err
    raw = yaml.safe_load(path.read_text())
    del raw["sweep"]
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", "--config", str(path)]) == 2
    assert "sweep: this config has no sweep section" in capsys.readouterr().err


def test_halving_keeps_the_best_third_of_the_cheap_rung_in_full(tmp_path, tiny_model, monkeypatch):
    """Successive halving on the real study, with each trial's run replaced by fixture figures (the stages are the
    other tests' business): six recipes cheap, the best two in full, and the pick among those two."""
    import pipeline.sweep.study as study_module

    path = sweep_config(
        tmp_path,
        tiny_model,
        {"train.learning_rate": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]},
        {"tracking.wandb": True, "tracking.mode": "offline"},
        search="halving",
        halving={"cheap": {"benchmark.max_test_examples": 2}},
    )
    monkeypatch.delenv("WANDB_MODE", raising=False)
    plan = SweepPlan(path)
    ran: list[Trial] = []
    accuracy = {0.1: 0.5, 0.2: 0.95, 0.3: 0.6, 0.4: 0.97, 0.5: 0.4, 0.6: 0.3}

    def fake_result(plan_: SweepPlan, trial: Trial) -> TrialResult:
        result = fixture_result(trial.key, accuracy[trial.knobs["train.learning_rate"]], cost=0.5)
        result.trial = trial
        return result

    def fake_run(plan_: SweepPlan, trial: Trial) -> list[float]:
        ran.append(trial)
        return fake_result(plan_, trial).objectives()

    monkeypatch.setattr("pipeline.sweep.run_and_score", fake_run)
    monkeypatch.setattr("pipeline.sweep.trial_result", fake_result)
    monkeypatch.setattr(study_module, "_run_in", lambda plan_: lambda trial: fake_run(plan_, trial))
    from pipeline.sweep import run_sweep

    run_sweep(plan)
    assert [t.cheap for t in ran] == [True] * 6 + [False] * 2
    assert {t.knobs["train.learning_rate"] for t in ran[6:]} == {0.2, 0.4}
    report = json.loads((plan.dir / "report.json").read_text())
    assert report["survivors"] and len(report["cheap_trials"]) == 6 and len(report["trials"]) == 2
    assert report["pick"] is not None and "0.4" in report["pick"]
    # The sweep is one W&B run in its trials' group, with every trial's figures as a table.
    (log,) = (plan.dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(log))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.run_group, run.job_type) == (plan.name, "sweep")
    logged = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    assert any("trials" in item.nested_key for history in logged for item in history.item)
    summary = {
        i.key: json.loads(i.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for i in r.summary.update
    }
    assert summary["pick"] == report["pick"]
