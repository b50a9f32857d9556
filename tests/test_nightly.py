"""A scheduled job played three nights with a tiny model and a few dozen prompts (scripts/nightly.sh):
1. everything runs and the student is promoted;
2. nothing changed: every stage skips, nothing is promoted again;
3. new prompts: only they are generated, the student is retrained and benchmarked, and the gate refuses it.
The manifests say what ran each night."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import append_csv_rows, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def add_tickets(path: Path, start: int, count: int) -> None:
    tickets = range(start, start + count)
    append_csv_rows(
        path, [(f"Order {i}: the {'refund' if i % 2 else 'parcel'} is late again", "ab"[i % 2 == 0]) for i in tickets]
    )


def night(env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "nightly.sh"), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


@pytest.mark.integration
def test_three_nights(tmp_path, tiny_model):
    tickets, held_out = tmp_path / "tickets.csv", tmp_path / "held_out.csv"
    add_tickets(tickets, 0, 24)
    add_tickets(held_out, 1000, 6)
    raw = tiny_config(tmp_path, tiny_model, run_name="nightly")
    raw["task"] = {"name": "classification", "params": {"path": str(tickets), "test_path": str(held_out)}}
    raw["train"]["retrain_min_change"] = 0.2
    raw["promote"] = {"target": str(tmp_path / "promoted"), "max_accuracy_drop": 1.0}
    # The random tiny student's forgetting is noise: the verdict's regression rules (the gate's too) off.
    raw["benchmark"]["verdict"] = {"max_probe_accuracy_drop": None, "max_leakage_increase": None}
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "CONFIG": str(config), "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    run_dir = tmp_path / "runs" / "nightly"

    first = night(env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert manifest(run_dir, "generate")["metrics"]["generated_prompts"] == 20  # 4 rows are few-shot examples
    promoted = json.loads((tmp_path / "promoted" / "promotion.json").read_text())
    assert promoted["run_name"] == "nightly"
    first_train = manifest(run_dir, "train")["wall_s"], (run_dir / "train" / "adapter").stat().st_mtime_ns

    second = night(env)
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in ("generate", "filter", "train", "benchmark"):
        assert f"{stage}: skipped, inputs and config unchanged" in second.stderr
    assert "  benchmark  done  " in second.stderr  # the job log's status, before the run
    assert "promote: skipped" in second.stderr and not (tmp_path / "promoted.previous").exists()

    add_tickets(tickets, 24, 12)  # tonight's new tickets
    third = night(env, "promote.max_latency_p95_s=0.000001")  # a gate this student cannot clear
    assert third.returncode == 3, third.stderr[-3000:]
    assert "distill: promotion refused: latency p95" in third.stderr
    assert f"  generate   stale           changed: input {tickets}" in third.stderr  # said before it ran
    metrics = manifest(run_dir, "generate")["metrics"]
    assert (metrics["reused_prompts"], metrics["generated_prompts"]) == (20, 12)
    assert (run_dir / "train" / "adapter").stat().st_mtime_ns != first_train[1]  # retrained
    assert manifest(run_dir, "benchmark")["inputs"]  # benchmarked the new adapter
    assert json.loads((tmp_path / "promoted" / "promotion.json").read_text()) == promoted  # untouched
