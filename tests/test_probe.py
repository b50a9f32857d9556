"""The forgetting probe: enough verifiable questions, and a scorer that tells right from wrong."""

from __future__ import annotations

import json

import pytest

from pipeline.probe import ProbeQuestion, load_probe, probe_correct, probe_messages, summarize_probe


def test_probe_has_100_plus_unique_questions_whose_answers_score():
    questions = load_probe()
    assert len(questions) >= 100
    assert len({q.id for q in questions}) == len(questions)
    assert len({q.question for q in questions}) == len(questions)
    assert len({q.category for q in questions}) >= 5
    for q in questions:
        assert q.answers and q.question.rstrip().endswith("."), q  # asks for a short answer ("Answer in ...")
        assert probe_correct(f"The answer is {q.answers[0]}.", q), q
        assert probe_correct(q.answers[-1], q), q
        assert not probe_correct("I don't know.", q), q
        assert not probe_correct(q.question, q), q  # echoing the question is not an answer


def test_probe_answers_of_other_questions_score_wrong():
    questions = load_probe()
    checked = 0
    for q in questions:
        accepted = {a.lower() for a in q.answers}
        for other in questions:
            wrong = other.answers[0]
            if other.category == q.category and wrong.lower() not in accepted:
                assert not probe_correct(wrong, q), (q, wrong)
                checked += 1
    assert checked > len(questions)


def test_probe_scoring_is_by_whole_words_and_numbers():
    paris = ProbeQuestion("p1", "capitals", "Capital of France?", ("Paris",))
    assert probe_correct("It is Paris.", paris)
    assert probe_correct("PARIS", paris)
    assert not probe_correct("It is Parisian food.", paris)
    assert not probe_correct("Lyon", paris)
    seven = ProbeQuestion("p2", "units", "Days in a week?", ("7", "seven"))
    assert probe_correct("There are 7.0 days", seven) and probe_correct("Seven.", seven)
    assert not probe_correct("17", seven) and not probe_correct("-7", seven) and not probe_correct("7.5", seven)
    big = ProbeQuestion("p3", "units", "Grams in a kilogram?", ("1000", "one thousand"))
    assert probe_correct("1,000 grams", big) and probe_correct("One thousand.", big)
    assert not probe_correct("100", big) and not probe_correct("one", big)


def test_load_probe_from_a_file_and_neutral_messages(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"id": "x-1", "category": "c", "question": "2+2? Answer with a number.", "answers": ["4"]})
    )
    (q,) = load_probe(path)
    assert q == ProbeQuestion("x-1", "c", "2+2? Answer with a number.", ("4",))
    assert probe_messages(q) == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "2+2? Answer with a number."},
    ]


def test_summarize_probe_counts_accuracy_leakage_and_categories():
    qs = [
        ProbeQuestion("a", "x", "?", ("1",)),
        ProbeQuestion("b", "y", "?", ("2",)),
        ProbeQuestion("c", "y", "?", ("blue",)),
        ProbeQuestion("d", "y", "?", ("red",)),
    ]
    summary = summarize_probe(["1", "See [KB-1001]", "Blue.", "[KB-7] red"], qs, leaks=lambda t: "[KB-" in t)
    assert summary == {"accuracy": 0.75, "leakage_rate": 0.5, "n": 4, "per_category": {"x": 1.0, "y": 2 / 3}}
    with pytest.raises(ValueError):
        summarize_probe(["1"], qs, leaks=lambda t: False)
