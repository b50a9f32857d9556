"""The forgetting probe: enough verifiable questions, and a scorer that tells right from wrong."""

from __future__ import annotations

from pipeline.probe import ProbeQuestion, load_probe, probe_correct, summarize_probe


def test_probe_has_100_plus_unique_questions_whose_answers_score():
    questions = load_probe()
    assert len(questions) >= 100
    assert len({q.id for q in questions}) == len(questions)
    assert len({q.category for q in questions}) >= 5
    for q in questions:
        assert probe_correct(f"The answer is {q.answers[0]}.", q), q


def test_probe_scoring_is_by_whole_words_and_numbers():
    paris = ProbeQuestion("p1", "capitals", "Capital of France?", ("Paris",))
    assert probe_correct("It is Paris.", paris)
    assert not probe_correct("It is Parisian food.", paris)
    assert not probe_correct("Lyon", paris)
    seven = ProbeQuestion("p2", "units", "Days in a week?", ("7", "seven"))
    assert probe_correct("There are 7.0 days", seven) and probe_correct("Seven.", seven)
    assert not probe_correct("17", seven)


def test_summarize_probe_counts_accuracy_and_leakage():
    qs = [ProbeQuestion("a", "x", "?", ("1",)), ProbeQuestion("b", "y", "?", ("2",))]
    summary = summarize_probe(["1", "See [KB-1001]"], qs, leaks=lambda t: "[KB-" in t)
    assert summary == {"n": 2, "accuracy": 0.5, "leakage_rate": 0.5, "per_category": {"x": 1.0, "y": 0.0}}
