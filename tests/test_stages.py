"""Stages on a tiny model: resume without duplicates, skip when unchanged, filter bookkeeping, the whole run."""

from __future__ import annotations

import json

import pytest

import pipeline.generate as generate_module
from pipeline.cli import run_pipeline
from pipeline.config import validate_config
from pipeline.engines import Completion, Generation
from pipeline.filter import run_filter
from pipeline.generate import run_generate
from pipeline.runs import PipelineError, read_jsonl
from tests.conftest import tiny_config

PLUGIN = {"name": "tests.plugin_task:ParityTask", "params": {"num_train": 12, "num_test": 4}}


def parity_config(tmp_path, model, **overrides):
    raw = tiny_config(tmp_path, model, **overrides)
    raw["task"] = dict(PLUGIN)
    return validate_config(raw)


class ScriptedEngine:
    """Stands in for an engine whose process dies after `fail_after` chunks (a kill, seen from the stage)."""

    model = "scripted"

    def __init__(self, fail_after: int | None = None, answer: str = "even") -> None:
        self.calls: list[list[str]] = []
        self.fail_after = fail_after
        self.answer = answer

    def generate(self, conversations, sampling, progress=True):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append([c[-1]["content"] for c in conversations])
        return [
            Generation([Completion(f"{self.answer} {c[-1]['content']}", "stop", 5)] * sampling.n, 20)
            for c in conversations
        ]

    def close(self):
        pass


def test_generate_resumes_without_redoing_or_duplicating(tmp_path, tiny_model, monkeypatch):
    config = parity_config(tmp_path, tiny_model)
    dying = ScriptedEngine(fail_after=1)
    monkeypatch.setattr(generate_module, "load_engine", lambda *a, **k: dying)
    monkeypatch.setattr(generate_module, "resolve_model", lambda name: name)
    with pytest.raises(KeyboardInterrupt):
        run_generate(config)
    partial = config.run_dir / "generate" / "teacher_outputs.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 5  # one chunk survived the kill
    with partial.open("a") as fh:
        fh.write('{"prompt_id": "parity-train-5", "compl')  # torn last line from a kill mid-write

    resumed = ScriptedEngine()
    monkeypatch.setattr(generate_module, "load_engine", lambda *a, **k: resumed)
    output = run_generate(config)
    rows = list(read_jsonl(output))
    ids = [r["prompt_id"] for r in rows]
    assert sorted(ids) == sorted(f"parity-train-{i}" for i in range(12))
    assert len(ids) == len(set(ids)) == 12
    assert sum(len(c) for c in resumed.calls) == 7  # only the prompts not already done
    assert not partial.exists()
    assert rows[0]["teacher"] == str(tiny_model) and rows[0]["sampling"]["n"] == 2
    assert {"prompt_id", "messages", "completions", "prompt_tokens", "reference"} <= rows[0].keys()
    assert rows[0]["completions"][0]["finish_reason"] == "stop"

    # Unchanged inputs and config: the stage is skipped and no engine is loaded.
    monkeypatch.setattr(generate_module, "load_engine", lambda *a, **k: pytest.fail("engine loaded on a skip"))
    assert run_generate(config) == output
    manifest = json.loads((output.parent / "manifest.json").read_text())
    assert manifest["seed"] == 7 and "versions" in manifest and manifest["outputs"]


def test_filter_drops_with_reasons_and_counts_add_up(tmp_path, tiny_model):
    config = parity_config(
        tmp_path,
        tiny_model,
        **{
            "filter.require_correct": True,
            "filter.drop_truncated": True,
            "filter.max_samples_per_prompt": 1,
            "filter.val_fraction": 0.0,
        },
    )
    gen_dir = config.run_dir / "generate"
    gen_dir.mkdir(parents=True)

    def row(i, texts, reasons=None):
        reasons = reasons or ["stop"] * len(texts)
        return {
            "prompt_id": f"parity-train-{i}",
            "user": f"Is {i} even or odd?",
            "category": "",
            "reference": {"answer": "even" if i % 2 == 0 else "odd"},
            "teacher": "t",
            "completions": [
                {"text": t, "finish_reason": r, "output_tokens": 3} for t, r in zip(texts, reasons, strict=True)
            ],
        }

    rows = [
        row(0, ["even", "even", "odd"]),  # 2 pass (one kept, one surplus), 1 fails the check
        row(1, ["", "odd"]),  # empty, then a pass
        row(2, ["even but cut", "odd"], ["length", "stop"]),  # truncated, then a wrong answer
    ]
    (gen_dir / "teacher_outputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_filter(config)
    report = json.loads((out / "filter_report.json").read_text())
    drops = list(read_jsonl(out / "drops.jsonl"))
    assert report["dropped"] == {"failed_check": 2, "duplicate_or_surplus": 1, "empty": 1, "truncated": 1}
    assert report["samples_in"] == 7 == report["samples_kept"] + len(drops)
    train = list(read_jsonl(out / "train.jsonl"))
    assert [r["prompt_id"] for r in train] == ["parity-train-0", "parity-train-1"]
    assert train[0]["messages"][0]["content"] == "Answer even or odd."  # the student's short prompt
    assert train[0]["messages"][-1] == {"role": "assistant", "content": "even"}


def test_filter_with_nothing_surviving_is_an_error(tmp_path, tiny_model):
    config = parity_config(tmp_path, tiny_model, **{"filter.require_correct": True})
    gen_dir = config.run_dir / "generate"
    gen_dir.mkdir(parents=True)
    (gen_dir / "teacher_outputs.jsonl").write_text(
        json.dumps(
            {
                "prompt_id": "parity-train-1",
                "user": "Is 1 even or odd?",
                "reference": {"answer": "odd"},
                "completions": [{"text": "even", "finish_reason": "stop", "output_tokens": 1}],
            }
        )
        + "\n"
    )
    with pytest.raises(PipelineError, match="no teacher sample survived"):
        run_filter(config)
    assert not (config.run_dir / "filter" / "train.jsonl").exists()


@pytest.mark.integration
def test_whole_pipeline_on_a_tiny_model_writes_the_report(tmp_path, tiny_model):
    config = parity_config(tmp_path, tiny_model)
    run_pipeline(config)
    report = json.loads((config.run_dir / "benchmark" / "report.json").read_text())
    assert set(report["systems"]) == {"teacher", "student_base", "student_tuned"}
    for metrics in report["systems"].values():
        for key in ("accuracy", "latency_p50_s", "latency_p95_s", "output_tokens_per_s", "cost_per_1m_output_tokens"):
            assert isinstance(metrics[key], float), key
        assert metrics["latency_p95_s"] >= metrics["latency_p50_s"] > 0
    assert {"accuracy", "leakage_rate"} <= report["forgetting"]["student_tuned"].keys()
    assert (config.run_dir / "benchmark" / "report.md").read_text().startswith("# Distillation report")
    assert (config.run_dir / "benchmark" / "accuracy_vs_cost.png").stat().st_size > 1000
    for stage in ("generate", "filter", "train", "benchmark"):
        assert (config.run_dir / stage / "manifest.json").exists()


def test_wandb_offline_logs_every_stage_in_one_group(tmp_path, tiny_model, monkeypatch):
    """Stages in one process, tracking on, no account: each stage is an offline W&B run in the run's group."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = parity_config(tmp_path, tiny_model, **{"tracking.wandb": True, "tracking.mode": "offline"})
    run_pipeline(config, stages=("generate", "filter", "train"))
    offline_runs = sorted((config.run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 3, offline_runs  # generate, filter, train (through TRL's report_to)
    import os

    assert os.environ["WANDB_RUN_GROUP"] == "tiny" and os.environ["WANDB_MODE"] == "offline"
