"""The verdict answers 'was fine-tuning worth it?' from the numbers, including when the answer is no."""

from __future__ import annotations

from pipeline.report import verdict


def report(tuned_accuracy: float, probe_change: float, leakage_change: float, tuned_p50: float = 1.0) -> dict:
    def system(accuracy: float, p50: float, cost: float) -> dict:
        return {"accuracy": accuracy, "latency_p50_s": p50, "cost_per_1m_output_tokens": cost}

    return {
        "systems": {
            "teacher": system(0.85, 2.0, 0.5),
            "student_base": system(0.0, 1.5, 0.2),
            "student_tuned": system(tuned_accuracy, tuned_p50, 0.3),
        },
        "forgetting": {"change": {"accuracy": probe_change, "leakage_rate": leakage_change}},
    }


def test_verdicts():
    assert "Verdict: worth it" in verdict(report(0.84, -0.01, 0.02))
    assert "Verdict: not worth it — fine-tuning did not beat" in verdict(report(0.0, 0.0, 0.0))
    assert "regression on base capabilities" in verdict(report(0.37, -0.38, 0.75))  # measured on the demo, lr 2e-3
    assert "regression on base capabilities" in verdict(report(0.37, 0.0, 0.15))
    assert "Verdict: mixed" in verdict(report(0.28, 0.04, 0.08))  # measured on the demo, lr 1e-3
    assert "Verdict: mixed" in verdict(report(0.84, -0.01, 0.02, tuned_p50=2.5))  # slower than the teacher
