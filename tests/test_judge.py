"""Open-ended tasks and the benchmark's judge: the chat task's two file shapes and its errors, the strict
readers of a judge's replies, order swapping and position bias, and the report's rates recomputed from records.

The judge in the stage tests is a real OpenAI-compatible HTTP server on localhost, standing in for a hosted
judge model (none can run here): the pipeline's own engine talks to it over HTTP as it would to a real one."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.benchmark.judge import length_controlled_win_rate, pair_outcome
from pipeline.cli import run_pipeline
from pipeline.config import validate_config
from pipeline.files import read_jsonl
from pipeline.judging import parse_grade, parse_preference
from pipeline.tasks import TaskError, build_task
from tests.conftest import tiny_config


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat_task(tmp_path, rows, **params):
    write_jsonl(tmp_path / "prompts.jsonl", rows)
    return build_task("chat", {"path": "prompts.jsonl", **params}, seed=0, base_dir=tmp_path)


def test_chat_task_reads_messages_rows_and_named_columns(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Say hi."}]},
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Say bye."}]},
        {"messages": [{"role": "user", "content": "Greet Ann."}, {"role": "assistant", "content": "Hello, Ann!"}]},
        {"question": "Thank Bo.", "answer": "Thanks, Bo."},
        {"question": "Thank Cy.", "answer": ""},
    ]
    task = chat_task(tmp_path, rows, test_fraction=0, few_shot=1, prompt_column="question", reference_column="answer")
    examples = task.split("train")
    # The first row with a reference is the full prompt's example, held out of the train split: the teacher is
    # not asked what its own prompt answers.
    assert [e.user for e in task.few_shot_examples()] == ["Greet Ann."]
    assert [e.user for e in examples] == ["Say hi.", "Say bye.", "Thank Bo.", "Thank Cy."]
    assert [e.reference["target"] for e in examples] == [None, None, "Thanks, Bo.", None]
    assert task.messages(examples[1], "short")[0]["content"] == "Be terse."  # the row's own system turn
    full = task.messages(examples[0], "full")[0]["content"]
    assert task.params.rubric in full and "Hello, Ann!" in full and "Thanks, Bo." not in full
    assert task.open_ended and task.score("  ", examples[0]) == {"answered": False}


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": "hi"}, "row 2: column 'messages': expected a non-empty list"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            r"row 2: column 'messages': roles \['user', 'user'\]",
        ),
        ({"messages": [{"role": "user", "content": " "}]}, "row 2: column 'messages': the user turn is empty"),
        ({"messages": [{"role": "user"}]}, "row 2: column 'messages': turn 0 is not a"),
        ({"text": "no prompt"}, "row 2 has no column 'prompt'"),
        ({"prompt": ""}, "row 2: column 'prompt' is empty"),
    ],
)
def test_chat_task_rejects_a_bad_row_naming_the_row_and_column(tmp_path, row, message):
    task = chat_task(tmp_path, [{"prompt": "fine"}, row])
    with pytest.raises(TaskError, match=f"^task.params.path: prompts.jsonl {message}"):
        task.split("train")


def test_grade_and_preference_readers_are_strict():
    for reply, grade in [("8", 8), (" 10 ", 10), ("Score: 7", 7), ("7/10", 7), ("I would say 3.", 3), ("1", 1)]:
        assert parse_grade(reply) == grade, reply
    for reply in ["", "great", "7 or 8", "11", "0", "between 6 and 7", "8.5", "-3"]:
        assert parse_grade(reply) is None, reply
    for reply, choice in [("A", "A"), ("b", "B"), ("[[A]]", "A"), ("Tie.", "tie"), (" B ", "B")]:
        assert parse_preference(reply) == choice, reply
    for reply in ["", "AB", "Both", "A is better", "neither", "C"]:
        assert parse_preference(reply) is None, reply


def test_a_verdict_that_flips_with_the_order_is_a_tie_and_position_bias():
    assert pair_outcome("A", "B") == ("win", False)  # the system's answer chosen in both orders
    assert pair_outcome("B", "A") == ("loss", False)
    assert pair_outcome("A", "A") == ("tie", True)  # the first slot both times: position, not quality
    assert pair_outcome("B", "B") == ("tie", True)
    assert pair_outcome("tie", "tie") == ("tie", False)
    assert pair_outcome("A", "tie") == ("tie", False)
    assert pair_outcome(None, "A") == ("unparsed", False)


def test_length_controlled_win_rate_discounts_wins_bought_by_length():
    # Every win came with a longer answer, every loss with a shorter one, plus a few even-length coin flips:
    # at equal length the system is no better than the teacher.
    outcomes = ["win"] * 8 + ["loss"] * 8 + ["win", "loss", "win", "loss"]
    diffs = [30] * 8 + [-30] * 8 + [0, 0, 0, 0]
    assert length_controlled_win_rate(outcomes, diffs) == pytest.approx(0.5, abs=0.02)
    lopsided = ["win"] * 12 + ["loss"] * 4
    assert length_controlled_win_rate(lopsided, [5, -5] * 8) == pytest.approx(0.75, abs=0.05)
    assert length_controlled_win_rate(["tie", "win"], [0, 0]) == 0.75  # no spread: the plain rate, ties half
    assert length_controlled_win_rate([], []) is None


class JudgeHandler(BaseHTTPRequestHandler):
    """A judge model behind an OpenAI-compatible endpoint. `prefer_first`: it always answers "A" when comparing
    (the position-biased judge) and grades 8; otherwise it prefers the longer reply and grades by length, with
    an unreadable grade for every reply of a length divisible by 5, and an unreadable preference between two
    replies whose lengths add up to a multiple of 3 (in both orders, so that pair is unreadable)."""

    prefer_first = True
    requests: list[dict] = []

    def log_message(self, *args):
        pass

    def do_GET(self):  # /models: the engine checks the served name
        data = json.dumps({"object": "list", "data": [{"id": "judge", "object": "model", "owned_by": "test"}]})
        self._send(data.encode())

    def _send(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        if "compare two" in system:
            first = user.split("Reply A:\n", 1)[1].split("\n\nReply B:\n", 1)[0]
            second = user.split("\n\nReply B:\n", 1)[1].rsplit("\n\nWhich reply", 1)[0]
            answer = "A" if self.prefer_first or len(first) >= len(second) else "B"
            if not self.prefer_first and (len(first) + len(second)) % 3 == 0:
                answer = "neither"
        else:
            reply = user.split("\n\nReply:\n", 1)[1].rsplit("\n\nScore", 1)[0]
            answer = "8" if self.prefer_first else ("fine" if len(reply) % 5 == 0 else str(1 + len(reply) % 10))
        data = json.dumps(
            {
                "id": "j",
                "object": "chat.completion",
                "created": 0,
                "model": "judge",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 1, "total_tokens": 51},
            }
        ).encode()
        self._send(data)


class JudgeServer(ThreadingHTTPServer):
    request_queue_size = 128  # the engine opens up to 16 connections at once; the default backlog is 5
    daemon_threads = True


@pytest.fixture(scope="module")
def judged_run(tmp_path_factory, tiny_model):
    """One tiny chat pipeline judged by the length-preferring judge server: (config, the server's handler).
    The position-bias test then switches the same server to a first-slot judge and reruns the benchmark."""
    handler = type("Handler", (JudgeHandler,), {"prefer_first": False, "requests": []})
    server = JudgeServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = chat_config(tmp_path_factory.mktemp("chat"), tiny_model, f"http://127.0.0.1:{server.server_address[1]}/v1")
    run_pipeline(config)
    yield config, handler
    server.shutdown()


def chat_config(tmp_path, tiny_model, url):
    rows = [{"messages": [{"role": "user", "content": f"Write a note number {i}."}]} for i in range(16)]
    rows += [{"prompt": f"Thank person {i}.", "reference": f"Thank you, person {i}."} for i in range(8)]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    judge = {
        "model": "judge",
        "engine": {"backend": "openai", "server": {"base_url": url, "api_key_env": None, "max_retries": 0}},
        "constrained": False,  # a hosted judge takes no vLLM structured outputs: its replies are read strictly
    }
    raw = tiny_config(tmp_path, tiny_model, **{"benchmark.judge": judge})
    raw["task"] = {"name": "chat", "params": {"path": str(tmp_path / "chat.jsonl"), "test_fraction": 0.25}}
    return validate_config(raw)


def wilson(successes: int, n: int, z: float = 1.959964) -> list[float]:
    """The 95% Wilson score interval by its formula: the test's own, not the code's (which asks scipy)."""
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return [centre - half, centre + half]


@pytest.mark.integration
def test_judge_rates_and_intervals_recompute_from_the_records(judged_run):
    """Every rate and interval counted again from the raw replies in records.jsonl, none through the code's own
    summaries. An unreadable pair stands apart, outside the rates and their intervals (the judge's failure says
    nothing of either answer), so n is the readable pairs; the fixture's judge leaves some unreadable."""
    config, _ = judged_run
    report = json.loads(config.layout.report_json.read_text())
    records = list(read_jsonl(config.layout.records))
    threshold = config.benchmark.judge.pass_threshold
    unreadable_pairs = 0
    for name, row in report["judge"]["systems"].items():
        grades = [r["grade"] for r in records if r["kind"] == "judge_grade" and r["system"] == name]
        assert grades == [
            parse_grade(r["reply"]) for r in records if r["kind"] == "judge_grade" and r["system"] == name
        ]
        passed = sum(g is not None and g >= threshold for g in grades)  # an unreadable grade is a fail
        assert row["grades_unparsed"] == grades.count(None)
        assert row["pass_rate"] == passed / len(grades) == report["systems"][name]["accuracy"]
        assert row["pass_rate_ci95"] == pytest.approx(wilson(passed, len(grades)))
        pairs = [r for r in records if r["kind"] == "judge_pair" and r["system"] == name]
        if name == "teacher":
            assert not pairs and "vs_teacher" not in row
            continue
        # Each pair read again from its two replies: a win or a loss only where both orders agree, any other
        # readable pair a tie (position bias where the judge chose the same slot both times).
        counts = {"win": 0, "tie": 0, "loss": 0, "unparsed": 0}
        biased, readable = 0, []
        for pair in pairs:
            if pair["identical"]:  # the teacher's own answer: a tie, the judge not asked
                assert (pair["outcome"], pair["position_biased"], pair["replies"]) == ("tie", False, None)
                outcome = "tie"
            else:
                first, second = (
                    parse_preference(pair["replies"][order]) for order in ("system_first", "teacher_first")
                )
                slot_both_times = first is not None and first == second != "tie"
                if first is None or second is None:
                    outcome = "unparsed"
                else:
                    outcome = {("A", "B"): "win", ("B", "A"): "loss"}.get((first, second), "tie")
                assert (pair["outcome"], pair["position_biased"]) == (outcome, slot_both_times)
                biased += slot_both_times
            counts[outcome] += 1
            if outcome != "unparsed":
                readable.append(pair)
        unreadable_pairs += counts["unparsed"]
        versus = row["vs_teacher"]
        n = len(pairs) - counts["unparsed"]
        assert (versus["win"], versus["tie"], versus["loss"], versus["unparsed"]) == tuple(counts.values())
        assert (versus["pairs"], versus["n"], versus["position_biased"]) == (len(pairs), n, biased)
        assert versus["win_rate"] == pytest.approx((counts["win"] + counts["tie"] / 2) / n)
        assert versus["win_or_tie_rate"] == pytest.approx((counts["win"] + counts["tie"]) / n)
        assert versus["win_or_tie_ci95"] == pytest.approx(wilson(counts["win"] + counts["tie"], n))
        outcomes = [p["outcome"] for p in readable]  # the length control, too, reads the readable pairs only
        differences = [p["words"]["system"] - p["words"]["teacher"] for p in readable]
        assert versus["length_controlled_win_rate"] == pytest.approx(length_controlled_win_rate(outcomes, differences))
    assert unreadable_pairs > 0, "the fixture's judge left no pair unreadable: the counts above test less"
    assert report["judge"]["reliability"]["pairs_unparsed"] == unreadable_pairs
    with_reference = [r for r in records if r["kind"] == "task" and r.get("reference_metrics")]
    assert with_reference and all(0 <= r["reference_metrics"]["rouge_l"] <= 1 for r in with_reference)
    assert report["judge"]["reliability"]["reference_agreement"] is not None


@pytest.mark.integration
def test_judge_swaps_the_order_and_counts_a_first_slot_judge_as_position_bias(judged_run):
    config, handler = judged_run
    handler.prefer_first, handler.requests = True, []
    run_pipeline(config, stages=("benchmark",), force=("benchmark",))
    report = json.loads(config.layout.report_json.read_text())
    judge, n = report["judge"], report["test_examples"]
    records = list(read_jsonl(config.layout.records))
    pairs = [r for r in records if r["kind"] == "judge_pair"]
    asked = [p for p in pairs if not p["identical"]]
    # The prompted student is the teacher's model with its prompt: its answers are the teacher's, so every one of
    # its pairs is a tie without asking, not position bias; its grades are the teacher's, asked once.
    prompted = judge["systems"]["student_prompted"]["vs_teacher"]
    assert (prompted["identical"], prompted["tie"], prompted["position_biased"]) == (n, n, 0)
    tuned = judge["systems"]["student_tuned"]["vs_teacher"]
    assert tuned["identical"] < n  # the tuned student answers differently, and the first-slot judge shows it
    assert (tuned["win"], tuned["tie"], tuned["loss"], tuned["position_biased"]) == (0, n, 0, n - tuned["identical"])
    assert judge["reliability"]["position_bias_rate"] == 1.0
    assert (judge["reliability"]["pairs"], judge["reliability"]["pairs_identical"]) == (len(asked), 3 * n - len(asked))
    # Each distinct question asked once: a grade per distinct answer, both orders per distinct pair.
    distinct_answers = {(r["id"], r["completion"]) for r in records if r["kind"] == "task"}
    distinct_pairs = {json.dumps(p["requests"], sort_keys=True) for p in asked}
    assert len(pairs) == 3 * n and len(handler.requests) == len(distinct_answers) + 2 * len(distinct_pairs)
    for pair in asked:  # the same two answers, shown in both orders
        first, second = (pair["requests"][order][1]["content"] for order in ("system_first", "teacher_first"))
        a1, b1 = first.split("Reply A:\n")[1].split("\n\nReply B:\n")
        a2, b2 = second.split("Reply A:\n")[1].split("\n\nReply B:\n")
        assert (a1, b1.split("\n\nWhich")[0]) == (b2.split("\n\nWhich")[0], a2)
    assert report["systems"]["teacher"]["accuracy"] == 1.0  # every answer graded 8: all pass
    markdown = config.layout.report_md.read_text()
    assert "## Judge" in markdown
    assert f"followed the order the answers were shown in for {len(asked)} of {len(asked)} pairs" in markdown
    assert f"{3 * n - len(asked)} answers identical to the teacher's were ties, the judge not asked" in markdown
    # Undecided leads, and nothing that rests on the judge's rates is stated: no standing, no share, no payback.
    verdict_paragraph = markdown.split("\n\n")[1]
    assert verdict_paragraph.startswith("Verdict: undecided — the judge cannot tell the answers apart (it followed")
    assert "Judged pairwise against the teacher" not in verdict_paragraph and "paid back" not in verdict_paragraph
    assert "not computed: the judge cannot rank the answers" in markdown


@pytest.mark.integration
def test_a_killed_judge_resumes_asking_only_what_it_had_not(judged_run, monkeypatch, capsys):
    """The judge's replies are saved a chunk at a time: a benchmark killed while judging asks the rest on the
    rerun, and its judge section and judge records are those of an uninterrupted run."""
    import pipeline.benchmark.judge as judge_module

    config, handler = judged_run
    handler.prefer_first, handler.requests = False, []
    monkeypatch.setattr(judge_module, "JUDGE_CHUNK", 5)
    real_ask, calls = judge_module.JudgeReplies._ask, []

    def dying_ask(self, conversations, choices):
        calls.append(len(conversations))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_ask(self, conversations, choices)

    monkeypatch.setattr(judge_module.JudgeReplies, "_ask", dying_ask)
    (config.layout.stage_dir("benchmark") / "manifest.json").unlink()  # a first run, not a finished one
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, stages=("benchmark",))
    asked_before_kill = len(handler.requests)
    assert asked_before_kill == 10  # two chunks of 5

    from pipeline.status import run_status

    assert run_status(config)[3].detail == (
        "saved: offline: teacher, student_base, student_prompted, student_tuned; judge: 2 chunks; a run resumes it"
    )
    monkeypatch.setattr(judge_module.JudgeReplies, "_ask", real_ask)
    capsys.readouterr()
    run_pipeline(config, stages=("benchmark",))
    assert "benchmark: resuming, already done: offline: teacher, student_base" in capsys.readouterr().err
    resumed_requests = len(handler.requests) - asked_before_kill
    resumed = json.loads(config.layout.report_json.read_text())["judge"]
    judged = [r for r in read_jsonl(config.layout.records) if r["kind"].startswith("judge")]

    handler.requests = []
    run_pipeline(config, stages=("benchmark",), force=("benchmark",))  # the same benchmark, uninterrupted
    assert resumed_requests == len(handler.requests) - 10
    assert resumed == json.loads(config.layout.report_json.read_text())["judge"]
    assert judged == [r for r in read_jsonl(config.layout.records) if r["kind"].startswith("judge")]
