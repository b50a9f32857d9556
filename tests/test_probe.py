"""The forgetting probe: enough verifiable questions, and a scorer that tells right from wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.benchmark.probe import probe_correct, probe_messages, summarize_probe
from pipeline.benchmark.report import _forgetting_section
from pipeline.benchmark.results import Forgetting, McNemarCounts, ProbeSummary, convert, to_builtins
from pipeline.probe_questions import ProbeQuestion, load_probe


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


def forgetting_section(forgetting: dict) -> list[str]:
    """The report's forgetting section, of a `forgetting` written as report.json holds it."""
    return _forgetting_section(convert(forgetting, Forgetting))


def test_summarize_probe_counts_accuracy_leakage_and_categories():
    qs = [
        ProbeQuestion("a", "x", "?", ("1",)),
        ProbeQuestion("b", "y", "?", ("2",)),
        ProbeQuestion("c", "y", "?", ("blue",)),
        ProbeQuestion("d", "y", "?", ("red",)),
    ]
    summary = summarize_probe(["1", "See [KB-1001]", "Blue.", "[KB-7] red"], qs, leaks=lambda t: "[KB-" in t)
    assert to_builtins(summary) == {
        "accuracy": 0.75,
        "leakage_rate": 0.5,
        "n": 4,
        "per_category": {"x": 1.0, "y": 2 / 3},
        "per_category_n": {"x": 1, "y": 3},
    }
    with pytest.raises(ValueError):
        summarize_probe(["1"], qs, leaks=lambda t: False)


def test_the_categories_the_task_trains_are_left_out_of_the_forgetting_figures():
    """An arithmetic task's student rising on the probe's arithmetic questions is its task, not general
    ability: with `probe_task_categories`, accuracy, leakage and n cover the other categories only."""
    qs = [
        ProbeQuestion("a", "arithmetic", "?", ("1",)),
        ProbeQuestion("b", "arithmetic", "?", ("2",)),
        ProbeQuestion("c", "colors", "?", ("blue",)),
        ProbeQuestion("d", "colors", "?", ("red",)),
    ]
    completions = ["1 [KB-1]", "2", "Blue.", "green [KB-7]"]
    summary = summarize_probe(completions, qs, leaks=lambda t: "[KB-" in t, task_categories=["arithmetic"])
    assert to_builtins(summary) == {
        "accuracy": 0.5,
        "leakage_rate": 0.5,
        "n": 2,
        "per_category": {"arithmetic": 1.0, "colors": 0.5},
        "per_category_n": {"arithmetic": 2, "colors": 2},
        "task_categories": ["arithmetic"],
    }


def test_lm_eval_is_skipped_with_a_reason_when_missing(monkeypatch):
    import sys

    from pipeline.benchmark.probe import run_lm_eval
    from pipeline.config import LmEvalConfig

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed (it is not, here; this makes sure)
    assert run_lm_eval(LmEvalConfig(tasks=["arc_easy"]), {"student_base": ("m", None)}) == {
        "skipped": "lm-eval is not installed"
    }


def test_lm_eval_refuses_a_tuned_student_that_answers_like_the_base(monkeypatch):
    """lm-eval's task data needs a hub, which cannot exist here: a stand-in `simple_evaluate` returns what
    the harness returns. Identical per-sample responses mean the adapter was not applied."""
    import sys
    import types

    import pytest

    from pipeline.benchmark.probe import run_lm_eval
    from pipeline.config import LmEvalConfig
    from pipeline.console import PipelineError

    calls = []

    def simple_evaluate(model, model_args, tasks, limit, batch_size, log_samples):
        calls.append(model_args)
        answer = "B" if "peft=" in model_args and differ else "A"
        return {
            "results": {"arc_easy": {"acc,none": 0.5, "alias": "arc"}},
            "samples": {"arc_easy": [{"resps": [[answer]]}]},
        }

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    students = {"student_base": ("base", None), "student_tuned": ("base", "adapter-dir")}
    differ = True
    scores = run_lm_eval(LmEvalConfig(tasks=["arc_easy"]), students)
    assert calls == ["pretrained=base", "pretrained=base,peft=adapter-dir"]
    assert scores["student_tuned"] == {"arc_easy": {"acc,none": 0.5}}
    differ = False
    with pytest.raises(PipelineError, match="the adapter was not applied"):
        run_lm_eval(LmEvalConfig(tasks=["arc_easy"]), students)


def test_the_shipped_replay_prompts_stay_clear_of_the_probe_and_the_support_test_split():
    """No general replay prompt (nor worked answer) is a probe question or a test prompt of the embedded default,
    nor shares a 13-gram with one (what the filter would drop, so the shipped set is not wasted on it)."""
    from pipeline.config import load_config
    from pipeline.files import read_jsonl
    from pipeline.filter.filters import NgramIndex, words
    from pipeline.filter.replay import GENERAL_PROMPTS, worked_examples
    from pipeline.filter.screen import protected_prompts
    from pipeline.tasks import task_for

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "smollm2_support.yaml")
    protected = protected_prompts(task_for(config), probe=True)
    index = NgramIndex(protected, 13)
    prompts = [row["prompt"] for row in read_jsonl(GENERAL_PROMPTS)]
    assert len(prompts) == len(set(prompts)) >= 150
    assert [p for p in prompts if index.match(p)] == []

    # The worked answers a base student is shown first: none is near a general prompt (shown "Give me two tips for
    # drinking more water.", Gemma 3 270M handed its answer back for "Give me two practical tips for drinking more
    # water."; word overlap 0.89, the next closest pair 0.42), and none is near a protected one.
    def overlap(a: str, b: str) -> float:
        a_words, b_words = set(words(a)), set(words(b))
        return len(a_words & b_words) / len(a_words | b_words)

    shown = [text for pair in worked_examples() for text in pair]
    assert [(q, p) for q, _ in worked_examples() for p in prompts if overlap(q, p) >= 0.6] == []
    assert [text for text in shown if index.match(text)] == []


def test_the_report_shows_probe_accuracy_per_category_largest_loss_first():
    """Where general ability moved: a loss in one category is hidden in the overall change when the task trains
    another (the arithmetic example's tuned student gained 50 points of the probe's arithmetic)."""

    def probed(per_category):
        n = {"arithmetic": 24, "capitals": 25, "units": 15}
        return {"accuracy": 0.5, "leakage_rate": 0.0, "n": 64, "per_category": per_category, "per_category_n": n}

    lines = forgetting_section(
        {
            "student_base": probed({"arithmetic": 0.29, "capitals": 0.76, "units": 0.8}),
            "student_tuned": probed({"arithmetic": 0.79, "capitals": 0.76, "units": 0.6}),
            "change": {"accuracy": 0.1, "leakage_rate": 0.0},
        }
    )
    table = lines[lines.index("Probe accuracy per category:") + 2 :]
    assert table[0] == "| category | n | student_base | student_tuned | change |"
    assert table[2:5] == [
        "| units | 15 | 0.800 | 0.600 | -0.200 |",
        "| capitals | 25 | 0.760 | 0.760 | +0.000 |",
        "| arithmetic | 24 | 0.290 | 0.790 | +0.500 |",
    ]


def test_the_report_marks_the_probe_categories_the_task_trains():
    def probed(per_category):
        n = {"arithmetic": 24, "units": 15}
        return {
            "accuracy": per_category["units"],
            "leakage_rate": 0.0,
            "n": 15,
            "per_category": per_category,
            "per_category_n": n,
            "task_categories": ["arithmetic"],
        }

    lines = forgetting_section(
        {
            "student_base": probed({"arithmetic": 0.29, "units": 0.8}),
            "student_tuned": probed({"arithmetic": 0.79, "units": 0.6}),
            "change": {"accuracy": -0.2, "leakage_rate": 0.0},
        }
    )
    assert "| student_tuned | 0.600 | 0.000 | 15 |" in lines
    assert any(
        line.startswith("Left out of these figures: the probe categories the task itself trains (arithmetic;")
        for line in lines
    )
    table = lines[lines.index("Probe accuracy per category:") + 2 :]
    assert table[2:4] == ["| units | 15 | 0.800 | 0.600 | -0.200 |", "| arithmetic * | 24 | 0.290 | 0.790 | +0.500 |"]


def test_the_probe_change_gets_a_paired_test_outside_the_tasks_own_categories():
    """The same questions for both students: an exact McNemar test says whether a probe change is beyond noise,
    counted on the questions the forgetting figures count (the task's own categories left out)."""
    from pipeline.benchmark.probe import paired_probe_tests

    questions = load_probe()
    arithmetic = [q.id for q in questions if q.category == "arithmetic"][:6]
    capitals = [q.id for q in questions if q.category == "capitals"][:8]

    def row(system, question, correct, leak=False):
        return {"system": system, "kind": "probe", "id": question, "correct": correct, "leak": leak}

    records = [row("student_base", q, False) for q in arithmetic] + [row("student_tuned", q, True) for q in arithmetic]
    records += [row("student_base", q, True) for q in capitals]  # the tuned student lost all eight capitals
    records += [row("student_tuned", q, False, leak=i < 2) for i, q in enumerate(capitals)]
    records.append({"system": "student_tuned", "kind": "task", "id": "x", "correct": True})
    both = paired_probe_tests(records, "student_base", "student_tuned")
    assert both.accuracy_test == McNemarCounts(tuned_only=6, base_only=8, p_value=pytest.approx(0.79, abs=0.01))
    outside = paired_probe_tests(records, "student_base", "student_tuned", ["arithmetic"])
    assert outside.accuracy_test == McNemarCounts(tuned_only=0, base_only=8, p_value=pytest.approx(2 / 2**8))
    assert outside.leakage_rate_test == McNemarCounts(tuned_only=2, base_only=0, p_value=0.5)

    lines = forgetting_section({"change": {"accuracy": -1.0, "leakage_rate": 0.25, **to_builtins(outside)}})
    said = next(line for line in lines if line.startswith("Tuned against"))
    assert said.startswith(
        "Tuned against untuned on the same questions (exact McNemar): accuracy -100.0 points (the tuned student "
        "right and the untuned not on 0 questions, the reverse on 8; p = 0.0078); leakage +25.0 points"
    )


def test_an_untuned_base_student_is_shown_worked_examples_before_each_probe_question_and_the_report_says_so(
    tmp_path, tiny_model, tiny_base_model, ping_pong_base_student
):
    """A base student has no chat template: asked the probe bare in the plain one, it repeats the question (a real
    one, Gemma 3 270M: 0.02), so it is shown the shipped worked examples first (with 5: 0.32), as base models are
    evaluated, and the report says so. The tuned student (merged, its folder carrying the plain template) and a
    chat model are asked bare, as they are served: shown them, they copy their answers (SmolLM2-135M-Instruct
    0.54 bare, 0.27 with 5; Gemma tuned on arithmetic answered "Quito" to 21 of 25 capitals).
    `benchmark.probe_shots` sets one number for every system; 0 asks the base bare, and the report says what the
    change then measures."""
    from pipeline.benchmark.evaluate import run_probe
    from pipeline.benchmark.systems import System
    from pipeline.config import EngineConfig, validate_config
    from pipeline.engines import load_engine
    from pipeline.probe_questions import load_probe_shots
    from pipeline.tasks import task_for
    from tests.conftest import tiny_config

    def probe(model, name: str, shots: int | None) -> tuple[ProbeSummary, list]:
        raw = tiny_config(tmp_path, tiny_model)
        raw.setdefault("benchmark", {})["probe_shots"] = shots
        config = validate_config(raw)
        engine = load_engine(str(model), EngineConfig(backend="transformers", batch_size=64), seed=0)
        return run_probe(System(name, str(model), "short", probe=True), engine, task_for(config), config.benchmark)

    tuned_from_base = ping_pong_base_student[2]
    base, base_rows = probe(tiny_base_model, "student_base", None)
    bare, bare_rows = probe(tiny_base_model, "student_base", 0)
    tuned, _ = probe(tuned_from_base, "student_tuned", None)
    tuned_shown, _ = probe(tuned_from_base, "student_tuned", 5)
    chat, _ = probe(tiny_model, "student_tuned", None)
    assert [f.shots for f in (base, bare, tuned, tuned_shown, chat)] == [len(load_probe_shots()), 0, 0, 5, 0]
    assert base.plain_chat_template and bare.plain_chat_template
    assert not any("plain_chat_template" in to_builtins(f) for f in (tuned, tuned_shown, chat))
    longer = [s["prompt_tokens"] - a["prompt_tokens"] for s, a in zip(base_rows, bare_rows, strict=True)]
    assert min(longer) > 5 * 4  # each worked example is a question and an answer in turns of their own

    said = {
        "shown": "The untuned student is a base model (no chat template of its own), shown 5 worked examples before ",
        "bare": "The untuned student is a base model (no chat template of its own), asked the probe's questions in ",
    }
    for probed_base, probed_tuned, sentence, tuned_asked in (
        (base, tuned, "shown", "and the tuned student bare, as it is served;"),
        (base, tuned_shown, "shown", "and the tuned student after 5;"),
        (bare, tuned, "bare", "never trained on"),
    ):
        lines = _forgetting_section(Forgetting({"student_base": probed_base, "student_tuned": probed_tuned}))
        found = [line for line in lines if line.startswith(tuple(said.values()))]
        assert len(found) == 1 and found[0].startswith(said[sentence]) and tuned_asked in found[0]
    assert not any(
        line.startswith(tuple(said.values())) for line in _forgetting_section(Forgetting({"student_base": chat}))
    )


def test_the_worked_examples_are_no_probe_questions():
    from pipeline.probe_questions import load_probe, load_probe_shots
    from pipeline.tasks.base import normalize_text

    asked = {normalize_text(q.question) for q in load_probe()}
    assert not [question for question, _ in load_probe_shots() if normalize_text(question) in asked]
