"""The promotion gate: first promotion, a better student replaces it, a worse or leakier one is refused
with exit code 3 and leaves the promoted folder untouched."""

from __future__ import annotations

import json

import yaml

from pipeline.cli import main
from tests.conftest import tiny_config


def fake_run(tmp_path, tiny_model, name: str, accuracy: float, leakage: float, probe_change: float = 0.0):
    """A run directory as benchmark and train leave it (the gate reads only these files). `leakage`: the tuned
    student's rise in leakage rate over the untuned one, the change the gate judges."""
    raw = tiny_config(tmp_path, tiny_model, run_name=name)
    raw["promote"] = {"target": str(tmp_path / "promoted"), "max_latency_p95_s": 5.0}
    config_file = tmp_path / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "runs" / name
    (run_dir / "benchmark").mkdir(parents=True)
    (run_dir / "train" / "adapter").mkdir(parents=True)
    (run_dir / "train" / "adapter" / "adapter_model.safetensors").write_text(f"weights of {name}")
    report = {
        "run_name": name,
        "systems": {"student_tuned": {"accuracy": accuracy, "latency_p95_s": 1.2}},
        "forgetting": {"change": {"accuracy": probe_change, "leakage_rate": leakage}},
    }
    (run_dir / "benchmark" / "report.json").write_text(json.dumps(report))
    return str(config_file)


def test_promotion_gate(tmp_path, tiny_model, capsys):
    promoted = tmp_path / "promoted"
    first = fake_run(tmp_path, tiny_model, "night1", accuracy=0.60, leakage=0.01)
    assert main(["promote", "--config", first]) == 0
    assert (promoted / "adapter" / "adapter_model.safetensors").read_text() == "weights of night1"
    assert json.loads((promoted / "promotion.json").read_text())["replaces"] is None

    assert main(["promote", "--config", first]) == 0  # the same report again: nothing to do
    assert "already the promoted student" in capsys.readouterr().err
    assert not (tmp_path / "promoted.previous").exists()

    # Within half a point of the promoted student: allowed, and the old one is kept as .previous.
    second = fake_run(tmp_path, tiny_model, "night2", accuracy=0.596, leakage=0.0)
    assert main(["promote", "--config", second]) == 0
    assert (promoted / "adapter" / "adapter_model.safetensors").read_text() == "weights of night2"
    assert (tmp_path / "promoted.previous" / "report.json").exists()

    capsys.readouterr()
    worse = fake_run(tmp_path, tiny_model, "night3", accuracy=0.58, leakage=0.15, probe_change=-0.08)
    assert main(["promote", "--config", worse]) == 3
    err = capsys.readouterr().err
    assert err.startswith("distill: promotion refused: accuracy 0.580 < 0.591")
    assert "leakage rate rose 0.150 > benchmark.verdict.max_leakage_increase 0.1" in err
    assert "probe accuracy fell 0.080" in err
    assert (promoted / "adapter" / "adapter_model.safetensors").read_text() == "weights of night2"  # untouched

    assert main(["promote", "--config", worse, "--force"]) == 0  # an operator's override, recorded
    assert json.loads((promoted / "promotion.json").read_text())["forced_past"]

    # With a load test in the report, the latency rule reads the server's p95 at the lowest concurrency.
    slow = fake_run(tmp_path, tiny_model, "night5", accuracy=0.9, leakage=0.0)
    report_path = tmp_path / "runs" / "night5" / "benchmark" / "report.json"
    report = json.loads(report_path.read_text())
    report["systems"]["student_tuned"]["load"] = {"16": {"e2e_p95_s": 9.0}, "1": {"e2e_p95_s": 6.5}}
    report_path.write_text(json.dumps(report))
    capsys.readouterr()
    assert main(["promote", "--config", slow]) == 3
    assert "latency p95 6.50 s (through vllm serve at concurrency 1) > max_latency_p95_s 5.0" in capsys.readouterr().err

    missing = fake_run(tmp_path, tiny_model, "night4", accuracy=0.9, leakage=0.0)
    (tmp_path / "runs" / "night4" / "benchmark" / "report.json").unlink()
    assert main(["promote", "--config", missing]) == 2
