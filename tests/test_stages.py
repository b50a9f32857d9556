"""Stages on a tiny model: resume without duplicates, skip when unchanged, filter bookkeeping, the whole run."""

from __future__ import annotations

import json
import os

import pytest

import pipeline.generate.stage as generate_module
from pipeline.cli import STAGES, run_pipeline
from pipeline.config import validate_config
from pipeline.console import PipelineError
from pipeline.engines import Completion, Generation
from pipeline.files import read_jsonl
from pipeline.filter import run_filter
from pipeline.generate import run_generate
from pipeline.tasks import build_task, task_for
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
    monkeypatch.setattr(generate_module, "model_for", lambda name, engine: name)
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


def teacher_row(i, texts, reasons=None, user=None):
    reasons = reasons or ["stop"] * len(texts)
    return {
        "prompt_id": f"parity-train-{i}",
        "user": user or f"Is {i} even or odd?",
        "category": "even" if i % 2 == 0 else "odd",
        "reference": {"answer": "even" if i % 2 == 0 else "odd"},
        "teacher": "t",
        "completions": [
            {"text": t, "finish_reason": r, "output_tokens": 3} for t, r in zip(texts, reasons, strict=True)
        ],
    }


def write_teacher_outputs(config, rows, extra_lines=()):
    gen_dir = config.run_dir / "generate"
    gen_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    (gen_dir / "teacher_outputs.jsonl").write_text("".join(line + "\n" for line in lines))


def strict_config(tmp_path, tiny_model, **overrides):
    """The tiny config with the production filters back on (the tiny model's own outputs need them off)."""
    return parity_config(
        tmp_path,
        tiny_model,
        **{
            "filter.correctness": {"enabled": True},
            "filter.truncated": {"enabled": True},
            "filter.val_fraction": 0.0,
            **overrides,
        },
    )


def test_filter_drops_with_reasons_and_counts_add_up(tmp_path, tiny_model):
    config = strict_config(tmp_path, tiny_model)
    rows = [
        teacher_row(0, ["even", "even", "odd"]),  # 2 verify (one kept, one surplus), 1 fails the check
        teacher_row(1, ["", "odd"]),  # empty, then a pass
        teacher_row(2, ["even but cut", "odd"], ["length", "stop"]),  # truncated, then a wrong answer
    ]
    write_teacher_outputs(config, rows)
    out = run_filter(config)
    report = json.loads((out / "filter_report.json").read_text())
    drops = list(read_jsonl(out / "drops.jsonl"))
    assert report["dropped"] == {"empty": 1, "truncated": 1, "correctness": 2, "agreement": 1}
    assert report["samples_in"] == 7 == report["samples_kept"] + len(drops)
    flow = {r["filter"]: r for r in report["filters"]}
    assert flow["test_split_guard"]["in"] == 7 and flow["decontaminate"]["out"] == 2
    assert all(a["out"] == b["in"] for a, b in zip(report["filters"], report["filters"][1:], strict=False))
    assert {d["filter"] for d in drops} == set(report["dropped"]) and all(d["detail"] is not None for d in drops)
    train = list(read_jsonl(out / "train.jsonl"))
    assert [r["prompt_id"] for r in train] == ["parity-train-0", "parity-train-1"]
    assert train[0]["messages"][0]["content"] == "Answer even or odd."  # the student's short prompt
    assert train[0]["messages"][-1] == {"role": "assistant", "content": "even"}
    assert train[1]["sample_index"] == 1  # the teacher's sample index, not the position among kept ones
    assert train[1]["scores"]["rules"] == {"answer": True} and train[1]["scores"]["agreement"] == 0.5
    assert report["categories_in"] == {"even": 2, "odd": 1} and report["categories_kept"] == {"even": 1, "odd": 1}
    # The teacher's verified rate, by the task's scorer before any filter (a truncated right answer counts).
    assert (report["teacher_verified"], report["teacher_verified_rate_by_category"]) == (4, {"even": 0.6, "odd": 0.5})
    assert "| even | 2 | 1 | 60.0% |" in (out / "DATASET.md").read_text()
    card = (out / "DATASET.md").read_text()
    assert "| correctness | 5 | 2 | 3 |" in card and "### truncated (1 dropped)" in card
    assert (out / "response_lengths.png").stat().st_size > 1000


def test_filter_outputs_are_identical_with_worker_processes(tmp_path, tiny_model, monkeypatch):
    """Rows screened in 2 spawned worker processes, in chunks of 4 lines, give byte-identical outputs to
    screening in this process: order, dedup against earlier rows and malformed-line numbers are kept."""
    import pipeline.filter.screen as filter_module

    monkeypatch.setattr(filter_module, "ROWS_PER_CHUNK", 4)  # many chunks in flight, out of order
    rows = [teacher_row(i, ["even" if i % 2 == 0 else "odd", "odd"]) for i in range(30)]
    rows += [teacher_row(i, ["even"]) for i in range(0, 10, 2)]  # exact duplicates of earlier rows
    rows.insert(7, teacher_row(31, ["odd", ""], user="Is 31 even or odd? Thanks!"))
    outputs = {}
    for workers in (0, 2):
        config = strict_config(
            tmp_path,
            tiny_model,
            **{
                "run_name": f"workers{workers}",
                "filter.workers": workers,
                "filter.near_dedup": {"enabled": True, "threshold": 0.5},
                "filter.val_fraction": 0.2,
            },
        )
        write_teacher_outputs(config, rows, ["not json", json.dumps({"user": "no id"})])
        out = run_filter(config)
        report = json.loads((out / "filter_report.json").read_text())
        assert report["workers"] == workers
        del report["workers"]
        names = ("train.jsonl", "val.jsonl", "drops.jsonl")
        outputs[workers] = ({name: (out / name).read_bytes() for name in names}, report)
    assert outputs[0] == outputs[2]
    files, report = outputs[0]
    assert report["malformed_lines"] == [37, 38]
    assert {"exact_dedup", "near_dedup", "correctness", "empty"} <= set(report["dropped"])
    assert files["val.jsonl"] and files["train.jsonl"]


def test_filter_with_nothing_surviving_is_an_error(tmp_path, tiny_model):
    config = strict_config(tmp_path, tiny_model)
    write_teacher_outputs(config, [teacher_row(1, ["even"])])
    with pytest.raises(PipelineError, match="no teacher sample survived"):
        run_filter(config)
    assert not list((config.run_dir / "filter").glob("*.jsonl"))  # nothing half-written


def test_too_few_kept_examples_stop_with_the_filter_and_the_key_to_fix(tmp_path, tiny_model, capsys):
    """Most answers cut at max_tokens: the filter stage stops (exit 2 from the CLI) naming the count, the filter
    that dropped the most and the key that fixes it, and writes nothing; min_train_examples=0 lets it through."""
    import yaml

    from pipeline.cli import main

    config = strict_config(tmp_path, tiny_model, **{"filter.min_train_examples": 4})
    rows = [teacher_row(i, ["even" if i % 2 == 0 else "odd", "cut"], ["stop", "length"]) for i in range(3)]
    rows += [teacher_row(i, ["cut", "cut"], ["length", "length"]) for i in range(3, 8)]
    write_teacher_outputs(config, rows)
    with pytest.raises(PipelineError) as error:
        run_filter(config)
    message = str(error.value)
    assert message.startswith("filter: kept 3 training examples of 16 teacher samples, under filter.min_train")
    assert "truncated dropped the most (13): answers were cut at the token limit: raise teacher.sampling." in message
    assert "the teacher's answers pass the task's scorer in 3 of 16;" in message
    assert "\n" not in message and not list((config.run_dir / "filter").glob("*.jsonl"))

    raw = yaml.safe_load(yaml.safe_dump(config.model_dump(mode="json", by_alias=True)))
    config_file = tmp_path / "guard.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    assert main(["filter", "--config", str(config_file)]) == 2
    assert "filter: kept 3 training examples" in capsys.readouterr().err
    assert main(["filter", "--config", str(config_file), "filter.min_train_examples=0"]) == 0
    assert len((config.run_dir / "filter" / "train.jsonl").read_text().splitlines()) == 3


def test_guard_names_the_extraction_as_a_suspect_when_answers_rarely_match(tmp_path, tiny_model):
    """exact_answer: the teacher's answers hold the right number, but not last, so the extraction reads another:
    the guard names answer_type and the column beside the teacher, with what it read on one answer."""
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(40)))
    raw = tiny_config(tmp_path, tiny_model, **{"filter.correctness": {"enabled": True}, "filter.min_train_examples": 8})
    raw["task"] = {"name": "exact_answer", "params": {"path": str(data), "test_fraction": 0.25}}
    config = validate_config(raw)
    task = build_task("exact_answer", raw["task"]["params"], config.seed, config.base_dir)
    rows = [
        {
            "prompt_id": ex.id,
            "user": ex.user,
            "reference": ex.reference,
            "teacher": "t",
            "completions": [{"text": f"{ex.reference['target'][5:]}, checked 1000 times", "finish_reason": "stop"}],
        }
        for ex in task.split("train")
    ]
    write_teacher_outputs(config, rows)
    with pytest.raises(PipelineError) as error:
        run_filter(config)
    message = str(error.value)
    # 40 rows: 10 held out for test, 4 the full prompt's few-shot examples, 26 asked
    assert "correctness dropped the most (26)" in message and "pass the task's scorer in 0 of 26" in message
    assert "or the extraction is wrong: task.params.answer_type=number reads the last number of each answer" in message
    assert "task.params.answer_column='answer'" in message and ": answer (read 1000, reference " in message
    assert "\n" not in message


def test_filter_names_the_labels_no_training_example_shows(tmp_path, tiny_model, capsys):
    """A label task: the filter's report, dataset card and log say how many labels have no kept training example
    and name them; a label kept only for validation counts among them (the student is never trained on it). A task
    without labels reports none."""
    from pipeline.filter.stage import in_val
    from tests.conftest import append_csv_rows

    labels = [f"label{i:02d}" for i in range(10)]
    data = tmp_path / "items.csv"
    append_csv_rows(data, [(f"item number {i}", labels[i % 10]) for i in range(60)])
    config = strict_config(tmp_path, tiny_model, **{"filter.val_fraction": 0.5})
    raw = config.model_dump(mode="json", by_alias=True)
    raw["task"] = {"name": "classification", "params": {"path": str(data), "few_shot": 0, "test_fraction": 0.25}}
    config = validate_config(raw)

    def right(example):  # the first three labels always, label03 only where the example goes to validation
        validation = in_val(example.id, config.seed, 0.5)
        return example.category in labels[:3] or (example.category == "label03" and validation)

    train = task_for(config).split("train")
    assert any(right(e) and e.category == "label03" for e in train)  # kept, for validation
    rows = [
        {
            "prompt_id": e.id,
            "user": e.user,
            "category": e.category,
            "reference": e.reference,
            "teacher": "t",
            "completions": [{"text": e.reference["target"] if right(e) else "label99", "finish_reason": "stop"}],
        }
        for e in train
    ]
    write_teacher_outputs(config, rows)
    out = run_filter(config)
    report = json.loads((out / "filter_report.json").read_text())
    kept = {r["category"] for r in read_jsonl(out / "train.jsonl")}
    assert kept == set(labels[:3])  # the data gives each of the first three a training example
    assert report["labels"] == 10 and report["labels_without_examples"] == labels[3:]
    said = (
        "7 of the 10 labels have no training example, so the student is never shown them: label03, label04, "
        "label05, label06, label07 and 2 more (filter_report.json: labels_without_examples)"
    )
    assert said in (out / "DATASET.md").read_text()
    assert f"[distill] filter: {said}" in capsys.readouterr().err.splitlines()

    parity = strict_config(tmp_path, tiny_model, run_name="parity")
    write_teacher_outputs(parity, [teacher_row(0, ["even"]), teacher_row(1, ["odd"])])
    report = json.loads((run_filter(parity) / "filter_report.json").read_text())
    assert report["labels"] is None and report["labels_without_examples"] is None


def test_replay_rows_are_screened_counted_apart_and_fingerprinted(tmp_path, tiny_model):
    """train.replay: general chats join train.jsonl as a share of the mix, never a probe question or a test
    prompt (exact or by n-gram), counted apart from the task's examples; a new replay file reruns the filter."""
    from pipeline.probe_questions import load_probe

    probe = load_probe()[0].question
    test_prompt = build_task(PLUGIN["name"], PLUGIN["params"], 7, tmp_path).split("test")[0].user

    def chat(user, answer):
        return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})

    general = [chat(f"Name a use for a {thing}.", f"A {thing} is handy.") for thing in ("rope", "kettle", "ladder")]
    lines = [
        *general,
        general[0],  # a duplicate
        chat("Say nothing.", "  "),
        chat(probe, "45"),
        chat(f"Quick one for you: {probe} Thanks!", "45"),  # the probe question inside a longer prompt
        chat(test_prompt, "even"),
    ]
    replay_file = tmp_path / "general.jsonl"
    replay_file.write_text("\n".join(lines) + "\n")
    replay = {"fraction": 0.75, "source": "dataset", "dataset": str(replay_file)}
    config = strict_config(tmp_path, tiny_model, **{"train.replay": replay})
    write_teacher_outputs(config, [teacher_row(i, ["even" if i % 2 == 0 else "odd"]) for i in range(4)])
    out = run_filter(config)
    train = list(read_jsonl(out / "train.jsonl"))
    replayed = [row for row in train if row.get("replay")]
    assert len(train) - len(replayed) == 4 and len(replayed) == 3  # 12 wanted (75% of the mix), 3 usable
    assert {row["messages"][0]["content"] for row in replayed} == {
        json.loads(g)["messages"][0]["content"] for g in general
    }
    report = json.loads((out / "filter_report.json").read_text())
    assert report["train"] == 4 and report["samples_in"] == 4  # the task's counts stay the task's
    assert report["replay"]["kept"] == 3 and report["replay"]["wanted"] == 12 and report["replay"]["available"] == 8
    assert report["replay"]["dropped"] == {"exact_dedup": 1, "empty": 1, "test_split_guard": 2, "decontaminate": 1}
    assert "Replay against forgetting: 3 general chats" in (out / "DATASET.md").read_text()

    replay_file.write_text("\n".join(lines[:2]) + "\n")  # the replay data changed: the filter reruns
    assert sum(1 for row in read_jsonl(run_filter(config) / "train.jsonl") if row.get("replay")) == 2
    with pytest.raises(PipelineError, match=r"train\.replay\.dataset: row 1 of .* is not a chat"):
        replay_file.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
        run_filter(config)


def test_replay_answered_by_the_untuned_student_is_generated_once(tmp_path, tiny_model, monkeypatch):
    """source self: the shipped general prompts answered by the student itself (transformers engine here),
    cached in the filter's folder: a rerun of the stage reuses the answers; another max_tokens regenerates."""
    import pipeline.engines as engines

    config = strict_config(tmp_path, tiny_model, **{"train.replay": {"fraction": 0.5, "max_tokens": 4}})
    write_teacher_outputs(config, [teacher_row(i, ["even" if i % 2 == 0 else "odd"]) for i in range(4)])
    out = run_filter(config)
    report = json.loads((out / "filter_report.json").read_text())["replay"]
    assert report["source"] == "self" and report["wanted"] == 4 and report["available"] == 155
    # The random tiny student rarely stops within 4 tokens: cut answers are dropped, never trained on.
    assert report["kept"] + report["dropped"].get("truncated", 0) + report["dropped"].get("empty", 0) >= 4
    cached = list(read_jsonl(out / "replay_answers.jsonl"))
    assert 6 <= len(cached) <= 155 and {row["finish_reason"] for row in cached} <= {"stop", "length"}
    replayed = [row for row in read_jsonl(out / "train.jsonl") if row.get("replay")]
    assert len(replayed) == report["kept"] and all(row["messages"][0]["role"] == "user" for row in replayed)

    monkeypatch.setattr(engines, "load_engine", lambda *a, **k: pytest.fail("answers regenerated"))
    assert run_filter(config, force=True) == out  # same key: read from the cache
    config = strict_config(tmp_path, tiny_model, **{"train.replay": {"fraction": 0.5, "max_tokens": 5}})
    with pytest.raises(pytest.fail.Exception, match="answers regenerated"):
        run_filter(config)
    # How the student's engine runs (batch, memory) is not what it answers: read from the cache; its dtype is,
    # and redoes the stage.
    runs_otherwise = {"benchmark.engine.batch_size": 3, "benchmark.engine.gpu_memory_utilization": 0.3}
    replay = {"train.replay": {"fraction": 0.5, "max_tokens": 4}}
    assert run_filter(strict_config(tmp_path, tiny_model, **replay, **runs_otherwise), force=True) == out
    with pytest.raises(pytest.fail.Exception, match="answers regenerated"):
        run_filter(strict_config(tmp_path, tiny_model, **replay, **{"benchmark.engine.dtype": "bfloat16"}))


def test_a_base_student_answers_replay_prompts_after_worked_answers_read_up_to_its_next_turn(
    tmp_path, tiny_model, tiny_base_model, capsys
):
    """source self with a base student: asked bare in the plain template, Gemma 3 270M base repeated every prompt
    until max_tokens (155 of 155 cut, 0 of 28 rows kept), so each prompt follows the shipped worked answers and its
    answer ends at the next turn it writes itself (115 of 155 ended). A chat student is asked bare."""
    from pipeline.chat_templates import PLAIN_NEXT_TURN
    from pipeline.config import EngineConfig
    from pipeline.engines import load_engine, stops_for
    from pipeline.filter.replay import ReplayAnswers, replay_source, worked_examples

    prompts = ["Name a colour.", "Name a fruit."]
    cached, stops = {}, {}
    for name, model in (("base", tiny_base_model), ("chat", tiny_model)):
        config = strict_config(tmp_path / name, model, **{"train.replay": {"fraction": 0.5, "max_tokens": 4}})
        with ReplayAnswers(replay_source(config), tmp_path / name) as answered:
            answered(prompts)
        cached[name] = list(read_jsonl(tmp_path / name / "replay_answers.jsonl"))
        engine = load_engine(str(model), EngineConfig(backend="transformers"), seed=0)
        stops[name] = stops_for(engine, ["###"])
    shown = len(worked_examples())
    assert shown >= 2 and [row["worked_examples"] for row in cached["base"]] == [shown, shown]
    assert [row["worked_examples"] for row in cached["chat"]] == [0, 0]
    assert stops == {"base": ["###", PLAIN_NEXT_TURN], "chat": ["###"]}
    err = capsys.readouterr().err
    assert err.count(f"has no chat format of its own: each prompt after {shown} worked answers") == 1


def test_replay_answers_only_the_prompts_the_wanted_rows_need(tmp_path, tiny_model, monkeypatch):
    """4 rows wanted, every answer good: 6 of the 155 prompts answered (1.5x), not all; a larger fraction later
    answers only the prompts not yet cached. A test prompt planted in the prompts file is dropped unanswered."""
    import pipeline.engines as engines
    from pipeline.tasks import build_task

    plain = strict_config(tmp_path, tiny_model)
    task = build_task(plain.task.name, plain.task.params, plain.seed, plain.base_dir)
    prompts = tmp_path / "general.jsonl"
    general = [f"Name a colour that starts with the letter {chr(65 + i)}." for i in range(20)]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [task.split("test")[0].user, *general]))
    engine = ScriptedEngine(answer="Sure:")
    monkeypatch.setattr(engines, "load_engine", lambda *a, **k: engine)
    rows = [teacher_row(i, ["even" if i % 2 == 0 else "odd"]) for i in range(4)]

    config = strict_config(tmp_path, tiny_model, **{"train.replay": {"fraction": 0.5, "prompts": str(prompts)}})
    write_teacher_outputs(config, rows)
    report = json.loads((run_filter(config) / "filter_report.json").read_text())["replay"]
    asked = [prompt for call in engine.calls for prompt in call]
    assert report["wanted"] == report["kept"] == 4 and report["available"] == 21
    assert len(asked) in (5, 6) and task.split("test")[0].user not in asked  # 6 drawn; the test prompt unanswered
    assert report["dropped"] == ({"test_split_guard": 1} if len(asked) == 5 else {})

    more = strict_config(tmp_path, tiny_model, **{"train.replay": {"fraction": 0.75, "prompts": str(prompts)}})
    engine.calls.clear()
    report = json.loads((run_filter(more) / "filter_report.json").read_text())["replay"]
    again = [prompt for call in engine.calls for prompt in call]
    assert report["kept"] == report["wanted"] == 12 and not set(again) & set(asked)  # cached answers reused


def test_a_replay_answer_that_copies_a_worked_answer_is_dropped(tmp_path, tiny_model, monkeypatch):
    """Shown worked answers, Gemma 3 270M base handed one back as its answer to a prompt that nearly repeated a
    worked one (1 of 155): an answer that repeats a worked answer, whole or inside its own text, is dropped and
    counted, and replay draws other prompts for the rows wanted."""
    import pipeline.engines as engines
    from pipeline.filter.replay import COPIES_WORKED_ANSWER, worked_examples

    worked = worked_examples()[0][1]

    class Copies(ScriptedEngine):
        def generate(self, conversations, sampling, progress=True):
            self.calls.append([c[-1]["content"] for c in conversations])
            copies = [worked, f"Sure. {worked.lower()} Anything else?"]  # whole, then inside its own text
            answers = [*copies, *(f"Here is one: {c[-1]['content']}" for c in conversations[2:])]
            return [Generation([Completion(a, "stop", 5)], 20) for a in answers[: len(conversations)]]

    monkeypatch.setattr(engines, "load_engine", lambda *a, **k: Copies())
    config = strict_config(tmp_path, tiny_model, **{"train.replay": {"fraction": 0.5}})
    write_teacher_outputs(config, [teacher_row(i, ["even" if i % 2 == 0 else "odd"]) for i in range(4)])
    out = run_filter(config)
    report = json.loads((out / "filter_report.json").read_text())["replay"]
    assert report["kept"] == report["wanted"] == 4 and report["dropped"] == {COPIES_WORKED_ANSWER: 2}
    answers = [row["messages"][-1]["content"] for row in read_jsonl(out / "train.jsonl") if row.get("replay")]
    assert len(answers) == 4 and all(a.startswith("Here is one: ") for a in answers)
    assert f"{COPIES_WORKED_ANSWER} 2" in (out / "DATASET.md").read_text()


def test_replay_short_of_rows_says_why_and_which_key_fixes_it(tmp_path, tiny_model, monkeypatch, capsys):
    """An answerer whose answers are all cut at train.replay.max_tokens (Gemma 3 270M base asked bare: 155 of 155,
    0 of 28 rows kept): the filter answers every prompt in rounds, on one engine, and says what dropped them and
    the keys that fix it."""
    import pipeline.engines as engines
    from pipeline.benchmark.results import to_builtins
    from pipeline.benchmark.stage import recipe

    class NeverStops(ScriptedEngine):
        def generate(self, conversations, sampling, progress=True):
            self.calls.append([c[-1]["content"] for c in conversations])
            return [Generation([Completion("User: " + c[-1]["content"], "length", 4)], 20) for c in conversations]

    loaded = []
    monkeypatch.setattr(engines, "load_engine", lambda *a, **k: loaded.append(NeverStops()) or loaded[-1])
    config = strict_config(tmp_path, tiny_model, **{"train.replay": {"fraction": 0.5, "max_tokens": 4}})
    write_teacher_outputs(config, [teacher_row(i, ["even" if i % 2 == 0 else "odd"]) for i in range(4)])
    report = json.loads((run_filter(config) / "filter_report.json").read_text())["replay"]
    assert report["kept"] == 0 and set(report["dropped"]) == {"truncated"}
    assert len(loaded) == 1 and len(loaded[0].calls) >= 4  # rounds of 6, 6, 12, 24, ... prompts: one engine
    assert sum(map(len, loaded[0].calls)) == report["dropped"]["truncated"] == 155
    err = capsys.readouterr().err
    assert "filter: replay kept 0 of the 4 wanted, of 155 available (self)" in err
    assert f"filter: replay dropped {report['dropped']['truncated']} truncated; answers ran past train.replay." in err
    assert "set train.replay.source to teacher or dataset" in err
    # The report's recipe carries the rows replay really added: the verdict's levers say "0 of the 4 wanted".
    made = recipe(config.train, config.student.prompt_style, json.loads(config.layout.filter_report.read_text()))
    assert {k: to_builtins(made)[k] for k in ("replay_fraction", "replay_rows", "replay_wanted")} == {
        "replay_fraction": 0.5,
        "replay_rows": 0,
        "replay_wanted": 4,
    }


def test_benchmark_test_prompts_never_reach_training(tmp_path, tiny_model):
    """Every filter off, decontamination included: the test split's prompts are still dropped."""
    from pipeline.tasks import build_task

    config = strict_config(tmp_path, tiny_model, **{"filter.order": ["empty"]})
    task = build_task(config.task.name, config.task.params, config.seed, config.base_dir)
    planted = [teacher_row(100 + i, ["even"], user=ex.user.upper()) for i, ex in enumerate(task.split("test"))]
    write_teacher_outputs(config, [teacher_row(0, ["even"]), *planted])
    out = run_filter(config)
    train_users = {r["messages"][1]["content"] for r in read_jsonl(out / "train.jsonl")}
    assert train_users == {"Is 0 even or odd?"}
    report = json.loads((out / "filter_report.json").read_text())
    assert report["dropped"] == {"test_split_guard": len(planted)} and len(planted) == 4


def test_benchmark_refuses_a_training_set_holding_a_test_prompt(tmp_path, tiny_model):
    from pipeline.benchmark import run_benchmark

    config = parity_config(tmp_path, tiny_model)
    leaked = {
        "messages": [{"role": "user", "content": "is 1000 even or odd"}, {"role": "assistant", "content": "even"}]
    }
    (config.run_dir / "filter").mkdir(parents=True)
    (config.run_dir / "filter" / "train.jsonl").write_text(json.dumps(leaked) + "\n")
    with pytest.raises(PipelineError, match="test prompt parity-test-0 is in the training data"):
        run_benchmark(config)


def test_decontamination_drops_a_reworded_probe_question(tmp_path, tiny_model):
    from pipeline.probe_questions import load_probe

    question = max(load_probe(), key=lambda q: len(q.question.split())).question
    config = strict_config(tmp_path, tiny_model, **{"filter.correctness": {"enabled": False}})
    write_teacher_outputs(config, [teacher_row(0, ["even"]), teacher_row(2, ["even"], user=f"Quick one. {question}")])
    out = run_filter(config)
    drops = list(read_jsonl(out / "drops.jsonl"))
    assert [(d["prompt_id"], d["filter"]) for d in drops] == [("parity-train-2", "decontaminate")]
    assert "probe:" in drops[0]["detail"]


def test_malformed_lines_are_skipped_with_their_line_number_or_fail(tmp_path, tiny_model, capsys):
    config = strict_config(tmp_path, tiny_model)
    unanswered = teacher_row(2, []) | {"error": "prompt of 900 tokens does not fit max_model_len 512"}
    rows = [teacher_row(0, ["even"]), teacher_row(1, ["odd"]), unanswered]
    write_teacher_outputs(config, rows, ['{"prompt_id": "torn'])
    out = run_filter(config)
    report = json.loads((out / "filter_report.json").read_text())
    assert report["malformed_lines"] == [4] and report["samples_kept"] == 2
    assert report["prompt_errors"] == 1 and report["prompts_in"] == 3
    assert "teacher_outputs.jsonl:4: malformed JSON line" in capsys.readouterr().err

    failing = strict_config(tmp_path, tiny_model, **{"filter.on_malformed_line": "fail", "run_name": "strict"})
    write_teacher_outputs(failing, [teacher_row(0, ["even"])], ["[1, 2]", "{}"])
    with pytest.raises(PipelineError, match=r"teacher_outputs.jsonl:2: malformed JSON line"):
        run_filter(failing)
    assert not (failing.run_dir / "filter" / "train.jsonl").exists()


class GradingEngine:
    """Stands in for a teacher able to grade (a tiny random model cannot): scores by the reply's length."""

    model = "grader"

    def __init__(self):
        self.conversations = []

    def generate(self, conversations, sampling, progress=True):
        self.conversations += conversations
        grades = []
        for conversation in conversations:
            reply = conversation[-1]["content"].split("Reply:\n")[1].split("\n\nScore")[0]
            grades.append("9" if len(reply) < 6 else "3" if len(reply) < 30 else "no idea")
        return [Generation([Completion(g, "stop", 1)], 50) for g in grades]

    def close(self):
        pass


def test_llm_judge_drops_low_and_unparseable_grades(tmp_path, tiny_model, monkeypatch):
    import pipeline.engines as engines_module

    grader = GradingEngine()
    monkeypatch.setattr(engines_module, "load_engine", lambda *a, **k: grader)
    config = strict_config(
        tmp_path,
        tiny_model,
        **{"filter.correctness": {"enabled": False}, "filter.judge": {"enabled": True, "batch_size": 2}},
    )
    rows = [
        teacher_row(0, ["even"]),
        teacher_row(1, ["odd, I am quite sure"]),
        teacher_row(2, ["even, as two divides it with no remainder"]),
    ]
    write_teacher_outputs(config, rows)
    out = run_filter(config)
    assert [r["prompt_id"] for r in read_jsonl(out / "train.jsonl")] == ["parity-train-0"]
    drops = {d["prompt_id"]: d["detail"] for d in read_jsonl(out / "drops.jsonl")}
    assert drops == {"parity-train-1": "score 3 < 7", "parity-train-2": "unparseable grade 'no idea'"}
    assert len(grader.conversations) == 3 and "Rubric:" in grader.conversations[0][1]["content"]

    # Every reply is kept: a rerun with another threshold (or after a kill) asks the judge nothing it answered.
    lenient = strict_config(
        tmp_path,
        tiny_model,
        **{
            "filter.correctness": {"enabled": False},
            "filter.judge": {"enabled": True, "batch_size": 2, "threshold": 3},
        },
    )
    out = run_filter(lenient)
    assert [r["prompt_id"] for r in read_jsonl(out / "train.jsonl")] == ["parity-train-0", "parity-train-1"]
    assert len(grader.conversations) == 3

    # How a hosted judge's requests are sent is not what it answers (its grades cost money): only another model
    # behind the server is asked again, and that redoes the stage.
    def judged_behind(server: dict, force: bool) -> int:
        overrides = {"filter.correctness": {"enabled": False}, "filter.judge": {"enabled": True, "threshold": 3}}
        overrides |= {"teacher.engine.backend": "openai", "teacher.engine.server": server}
        run_filter(strict_config(tmp_path, tiny_model, **overrides), force=force)
        return len(grader.conversations)

    assert judged_behind({"base_url": "http://gpu-a:8000/v1"}, force=False) == 6  # another judge: asked afresh
    moved = {"base_url": "http://gpu-b:9000/v1", "max_concurrency": 2, "timeout_s": 30.0, "max_retries": 0}
    assert judged_behind(moved, force=True) == 6
    assert judged_behind(moved | {"model": "another-judge"}, force=False) == 9


@pytest.mark.integration
def test_whole_pipeline_on_a_tiny_model_writes_the_report(tmp_path, tiny_model):
    config = parity_config(tmp_path, tiny_model)
    run_pipeline(config)
    report = json.loads((config.run_dir / "benchmark" / "report.json").read_text())
    assert set(report["systems"]) == {"teacher", "student_base", "student_prompted", "student_tuned"}
    for metrics in report["systems"].values():
        for key in ("accuracy", "latency_p50_s", "latency_p95_s", "output_tokens_per_s", "cost_per_1m_output_tokens"):
            assert isinstance(metrics[key], float), key
        assert metrics["latency_p95_s"] >= metrics["latency_p50_s"] > 0
        assert metrics["latency_cold_p95_s"] >= metrics["latency_cold_p50_s"] > 0
    assert {"accuracy", "leakage_rate"} <= report["forgetting"]["student_tuned"].keys()
    assert (config.run_dir / "benchmark" / "report.md").read_text().startswith("# Distillation report")
    assert (config.run_dir / "benchmark" / "accuracy_vs_cost.png").stat().st_size > 1000
    assert (config.run_dir / "benchmark" / "probe_by_category.png").stat().st_size > 1000
    assert "![probe_by_category](probe_by_category.png)" in (config.run_dir / "benchmark" / "report.md").read_text()
    for stage in ("generate", "filter", "train", "benchmark"):
        assert (config.run_dir / stage / "manifest.json").exists()
    assert report["systems"]["student_tuned"]["serving"] == "weights"
    from pipeline.status import run_status

    statuses = run_status(config)  # every stage done, and the benchmark's verdict said
    assert [s.state for s in statuses] == ["done"] * 4 and "; Verdict: not worth it" in statuses[3].detail
    import shutil

    moved = parity_config(tmp_path, tiny_model, runs_dir=str(tmp_path / "elsewhere"))  # copied to another disk
    shutil.copytree(config.run_dir, moved.run_dir)
    assert [s.state for s in run_status(moved)] == ["done"] * 4

    # The same student served as base + unmerged adapter: a new benchmark, which says what it measured.
    lora = parity_config(tmp_path, tiny_model, **{"benchmark.student_serving": "lora"})
    run_pipeline(lora, stages=("benchmark",))
    report = json.loads((config.run_dir / "benchmark" / "report.json").read_text())
    assert report["systems"]["student_tuned"]["serving"] == "base + unmerged LoRA adapter"
    # Served by the transformers engine here, and said so: not vLLM's enable_lora.
    markdown = (config.run_dir / "benchmark" / "report.md").read_text()
    assert "unmerged LoRA adapter (a PEFT model on the transformers engine)" in markdown and "vLLM" not in markdown


def test_benchmark_resumes_after_its_last_finished_system(tmp_path, tiny_model, monkeypatch):
    """A benchmark killed while measuring the tuned student keeps the systems it finished (a large teacher's
    figures take hours on a GPU node): the rerun measures only the rest, and loads no engine for the others."""
    import pipeline.benchmark.stage as benchmark_module
    from pipeline.benchmark import run_benchmark

    config = parity_config(tmp_path, tiny_model)
    run_pipeline(config, stages=("generate", "filter", "train"))
    real_evaluate, real_load = benchmark_module.evaluate_system, benchmark_module.load_engine
    measured, loaded = [], []

    def evaluate(system, *args):
        if system.name == "student_tuned" and not measured.count("killed"):
            measured.append("killed")
            raise KeyboardInterrupt("killed")
        measured.append(system.name)
        return real_evaluate(system, *args)

    def load(model, *args):
        loaded.append(model)
        return real_load(model, *args)

    monkeypatch.setattr(benchmark_module, "evaluate_system", evaluate)
    monkeypatch.setattr(benchmark_module, "load_engine", load)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(config)
    units = config.layout.stage_dir("benchmark") / "finished_units.jsonl"
    saved = [json.loads(line)["unit"] for line in units.read_text().splitlines()]
    assert saved == ["offline:teacher", "offline:student_base", "offline:student_prompted"]
    with units.open("a") as fh:
        fh.write('{"fingerprint": "')  # torn last line from a kill mid-write

    measured.clear(), loaded.clear()
    measured.append("killed")  # no second kill
    report_path = run_benchmark(config)
    assert measured == ["killed", "student_tuned"] and loaded == [str(config.layout.merged)]
    assert not units.exists()
    resumed = json.loads(report_path.read_text())
    kinds = {"task", "probe"}
    resumed_rows = [
        (r["system"], r["id"], r["completion"]) for r in read_jsonl(config.layout.records) if r["kind"] in kinds
    ]

    run_benchmark(config, force=True)  # the same benchmark, uninterrupted
    whole = json.loads(report_path.read_text())
    assert list(resumed["systems"]) == list(whole["systems"])
    for name, metrics in whole["systems"].items():
        assert resumed["systems"][name]["accuracy"] == metrics["accuracy"], name
    assert resumed["forgetting"]["change"] == whole["forgetting"]["change"]
    assert resumed_rows == [
        (r["system"], r["id"], r["completion"]) for r in read_jsonl(config.layout.records) if r["kind"] in kinds
    ]


def test_a_forced_stage_voids_its_manifest_so_a_killed_one_resumes(tmp_path, tiny_model, monkeypatch, capsys):
    """--force redoes a stage; killed halfway, the old manifest must not make a plain rerun skip the stage as
    finished (it would keep the old outputs and drop the forced run's saved work). The CLI says so."""
    import yaml

    import pipeline.cli as cli
    from pipeline.runs import Stage

    config = parity_config(tmp_path, tiny_model)
    stage = Stage(config, "benchmark", {"a": 1}, inputs=[])
    stage.finish([])
    assert stage.skip(force=False) and stage.manifest_path.exists()
    assert not stage.skip(force=True) and not stage.manifest_path.exists()
    assert not stage.skip(force=False)  # what a plain rerun after a killed forced one sees: not finished

    path = tmp_path / "parity.yaml"
    path.write_text(yaml.safe_dump({**tiny_config(tmp_path, tiny_model), "task": dict(PLUGIN)}))

    def killed(args, config):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_command", killed)
    capsys.readouterr()
    assert cli.main(["benchmark", "--config", str(path), "--force"]) == 130
    assert "interrupted; rerun the same command without --force/--force-stage to resume" in capsys.readouterr().err
    assert cli.main(["benchmark", "--config", str(path)]) == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err


def test_finished_units_hold_only_this_fingerprints_work(tmp_path, tiny_model):
    from pipeline.runs import FinishedUnits, Stage

    config = parity_config(tmp_path, tiny_model)
    stage = Stage(config, "benchmark", {"a": 1}, inputs=[])
    units = FinishedUnits(stage, force=False)
    assert units.run("x", lambda: {"accuracy": float("nan"), "ci": (0.1, 0.9)}) == units.get("x")
    assert units.run("x", lambda: pytest.fail("recomputed")) is units.get("x")
    again = FinishedUnits(stage, force=False).get("x")
    assert again["ci"] == [0.1, 0.9] and again["accuracy"] != again["accuracy"]  # NaN survives the file
    assert "x" not in FinishedUnits(stage, force=True) and not units.path.exists()
    units.save("y", 1)
    changed = Stage(config, "benchmark", {"a": 2}, inputs=[])  # another config: nothing carries over
    assert "y" not in FinishedUnits(changed, force=False) and not units.path.exists()


def test_status_says_what_each_stage_did_and_what_a_run_would_redo(tmp_path, tiny_model, capsys, monkeypatch):
    import yaml

    import pipeline.runs
    from pipeline.benchmark.systems import tuned_student_dir
    from pipeline.cli import main
    from pipeline.status import format_status, run_status
    from pipeline.train.stage import train_stage

    config = parity_config(tmp_path, tiny_model)
    path = tmp_path / "parity.yaml"
    path.write_text(yaml.safe_dump({**tiny_config(tmp_path, tiny_model), "task": dict(PLUGIN)}))
    capsys.readouterr()
    assert main(["status", "--json", "--config", str(path)]) == 0  # for a scheduler: one object per stage
    said = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert said[:2] == [
        {"stage": "generate", "state": "not run", "detail": ""},
        {"stage": "filter", "state": "after generate", "detail": ""},
    ]
    assert [(s.stage, s.state) for s in run_status(config)] == [
        ("generate", "not run"),
        ("filter", "after generate"),
        ("train", "after generate"),
        ("benchmark", "after generate"),
    ]
    run_pipeline(config, stages=("generate", "filter"))
    # The run copied elsewhere (another disk, another node's mount point) is the same run: done there too.
    import shutil

    moved = parity_config(tmp_path, tiny_model, runs_dir=str(tmp_path / "elsewhere"))
    shutil.copytree(config.run_dir, moved.run_dir)
    assert [s.state for s in run_status(moved)][:2] == ["done", "done"]
    filter_manifest = moved.layout.stage_dir("filter") / "manifest.json"
    before = filter_manifest.read_text()
    run_filter(moved)
    assert filter_manifest.read_text() == before  # skipped, not redone
    checkpoints = config.layout.checkpoints
    (checkpoints / "checkpoint-2").mkdir(parents=True)  # a killed training, under this config
    (checkpoints / "fingerprint").write_text(train_stage(config).fingerprint)
    hashed = []
    real_sha256_tree = pipeline.runs.sha256_tree
    monkeypatch.setattr(pipeline.runs, "sha256_tree", lambda path: hashed.append(path) or real_sha256_tree(path))
    statuses = run_status(config)
    # A stage after one that reruns has inputs that are not final: status reads none of them (the merged student).
    assert hashed and tuned_student_dir(config) not in hashed
    assert [(s.stage, s.state) for s in statuses] == [
        ("generate", "done"),
        ("filter", "done"),
        ("train", "in progress"),
        ("benchmark", "after train"),
    ]
    assert statuses[2].detail == "checkpoint at step 2; a run resumes it"
    assert format_status(config, statuses).splitlines()[3].split() == [
        "train",
        "in",
        "progress",
        "checkpoint",
        "at",
        "step",
        "2;",
        "a",
        "run",
        "resumes",
        "it",
    ]

    changed = parity_config(tmp_path, tiny_model, **{"filter.val_fraction": 0.5})
    statuses = run_status(changed)
    assert [(s.stage, s.state) for s in statuses][1:] == [
        ("filter", "stale"),
        ("train", "after filter"),
        ("benchmark", "after filter"),
    ]
    assert statuses[1].detail.startswith("changed: config filter (last run ")
    # A part of the filter's fingerprint that is not a config section of its own is named too.
    statuses = run_status(parity_config(tmp_path, tiny_model, **{"train.replay": {"fraction": 0.2}}))
    assert ", config replay (last run " in statuses[1].detail  # and the general prompts, now an input
    config.layout.teacher_outputs.write_text("")  # generate's output edited by hand: the filter reruns on it
    statuses = run_status(config)
    assert [s.state for s in statuses] == ["done", "stale", "after filter", "after filter"]
    assert statuses[1].detail.startswith("changed: input generate/teacher_outputs.jsonl (last run ")


def test_the_benchmark_reruns_when_the_teacher_engine_it_runs_on_changes(tmp_path, tiny_model):
    """A hosted teacher is measured on teacher.engine, so a new server there is a new benchmark; a local
    teacher's engine is generate's business (the benchmark runs it on benchmark.engine)."""
    from pipeline.benchmark.stage import benchmark_stage
    from pipeline.tasks import task_for

    def fingerprint(**overrides):
        config = parity_config(tmp_path, tiny_model, **overrides)
        return benchmark_stage(config, task_for(config)).fingerprint

    local = fingerprint()
    assert fingerprint(**{"teacher.engine.batch_size": 2}) == local
    server = {"backend": "openai", "server": {"base_url": "http://a:8000/v1"}}
    hosted = fingerprint(**{"teacher.engine": server})
    assert hosted != local
    assert fingerprint(**{"teacher.engine": {**server, "server": {"base_url": "http://b:8000/v1"}}}) != hosted


def test_load_tests_already_finished_start_no_server(tmp_path, tiny_model, monkeypatch):
    import pipeline.benchmark.serving as serving
    from pipeline.benchmark.systems import System
    from pipeline.runs import FinishedUnits, Stage

    config = parity_config(tmp_path, tiny_model)
    systems = [System(name, str(tiny_model), "full", probe=False) for name in ("teacher", "student_prompted")]
    units = FinishedUnits(Stage(config, "benchmark", {}, inputs=[]), force=False)
    row = {"system": "teacher", "kind": "load", "concurrency": 1, "e2e_s": 1.0, "ttft_s": 0.2, "prompt_tokens": 9}
    units.save("load:teacher", [{**row, "output_tokens": 5, "started_s": 0.0, "ended_s": 1.0, "tpot_s": 0.2}])
    monkeypatch.setattr(serving, "vllm_server", lambda *a: pytest.fail("a server started for a finished system"))
    task = task_for(config)
    summaries, records = serving.run_load_tests(config.benchmark, config.seed, systems, task, task.split("test"), units)
    assert [r["system"] for r in records] == ["teacher", "student_prompted"]
    assert records[1]["measured_as"] == "teacher" and summaries["student_prompted"]["1"].requests == 1


def test_wandb_offline_logs_every_stage_in_one_group_with_linked_artifacts(tmp_path, tiny_model, monkeypatch):
    """Stages in one process, tracking on, no account: each stage is an offline W&B run in the run's group,
    and logs its outputs as an Artifact naming the exact upstream version it was made from. Read back from
    the runs' transaction logs, as `wandb sync` would send them."""
    import json
    import os

    from pipeline.promote import run_promote
    from tests.conftest import wandb_records

    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = parity_config(
        tmp_path,
        tiny_model,
        **{"tracking.wandb": True, "tracking.mode": "offline", "promote.target": str(tmp_path / "promoted")},
    )
    run_pipeline(config, stages=STAGES)
    run_promote(config, force=True)  # the tiny random student would not clear the gate
    assert os.environ["WANDB_RUN_GROUP"] == "tiny" and os.environ["WANDB_MODE"] == "offline"
    logs = sorted((config.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 5, logs  # generate, filter, train (through TRL's report_to), benchmark, promote
    runs, artifacts = {}, {}
    for path in logs:
        records = list(wandb_records(path))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.run_group == "tiny"
        runs[run.job_type] = run
        for record in records:
            if record.WhichOneof("record_type") == "artifact":
                artifacts[run.job_type] = record.artifact
    assert set(runs) == {"generate", "filter", "train", "benchmark", "promote"}

    def manifest(stage):
        return json.loads((config.run_dir / stage / "manifest.json").read_text())

    expected = {
        "generate": ("tiny-teacher-outputs", "dataset", {"teacher_outputs.jsonl"}, None),
        "filter": ("tiny-dataset", "dataset", {"train.jsonl", "val.jsonl", "drops.jsonl"}, "generate"),
        "train": ("tiny-student", "model", {"adapter/adapter_model.safetensors"}, "filter"),
        "benchmark": ("tiny-report", "report", {"report.json", "records.jsonl"}, "train"),
    }
    names = {"generate": "tiny-teacher-outputs", "filter": "tiny-dataset", "train": "tiny-student"}
    for stage, (name, kind, files, upstream) in expected.items():
        artifact = artifacts[stage]
        assert (artifact.name, artifact.type) == (name, kind)
        assert f"fp-{manifest(stage)['fingerprint']}" in artifact.aliases
        assert files <= {entry.path for entry in artifact.manifest.contents}, stage
        link = json.loads(artifact.metadata)["derived_from"]
        assert link == (f"{names[upstream]}:fp-{manifest(upstream)['fingerprint']}" if upstream else None), stage
    # Promotion aliases the very version train logged: same name, same content digest.
    promoted, trained = artifacts["promote"], artifacts["train"]
    assert "promoted" in promoted.aliases and "promoted" not in trained.aliases
    assert (promoted.name, promoted.digest) == (trained.name, trained.digest)


def test_online_artifacts_record_a_use_edge(tmp_path, tiny_model):
    """Online, the link is a real W&B lineage edge (`use_artifact`) before `log_artifact`. No W&B server can
    exist here, so the run object is a stand-in that records the calls."""
    import json

    from pipeline.tracking import WandbTracker

    config = parity_config(tmp_path, tiny_model, **{"tracking.wandb": True, "tracking.mode": "online"})
    (config.run_dir / "filter").mkdir(parents=True)
    (config.run_dir / "filter" / "manifest.json").write_text(json.dumps({"fingerprint": "abc123"}))
    (config.run_dir / "train").mkdir()
    (config.run_dir / "train" / "train_metrics.json").write_text("{}")

    class StandInRun:
        calls: list = []

        def use_artifact(self, ref):
            self.calls.append(("use", ref))

        def log_artifact(self, artifact, aliases):
            self.calls.append(("log", artifact.name, artifact.metadata["derived_from"], aliases))

    run = StandInRun()
    WandbTracker(run).artifact(config, "train", "fff000", [config.run_dir / "train" / "train_metrics.json"])
    assert run.calls == [
        ("use", "tiny-dataset:fp-abc123"),
        ("log", "tiny-student", "tiny-dataset:fp-abc123", ["latest", "fp-fff000"]),
    ]


@pytest.mark.integration
def test_report_numbers_recompute_from_the_raw_records(tmp_path, tiny_model, capsys):
    """The whole pipeline with the load test on: every system through a real `vllm serve` at two concurrency
    levels, the tuned student as a LoRA module of the one server (`student_serving: lora`). Accuracy, its
    interval, latency percentiles, throughput and costs in report.json are recomputed here from records.jsonl
    and must agree."""
    from pipeline.benchmark.stats import percentile, wilson_interval

    config = parity_config(
        tmp_path,
        tiny_model,
        **{
            "benchmark.load_test": {"enabled": True, "concurrency": [1, 3], "requests": 4, "warmup": 1},
            "benchmark.engine.max_model_len": 512,
            "benchmark.engine.gpu_memory_utilization": 0.3,
            "benchmark.student_serving": "lora",
        },
    )
    run_pipeline(config)
    # The load test's progress names each system it measures (it used to print the server's name for the weights).
    assert "benchmark: student_tuned at concurrency 3: 6 requests" in capsys.readouterr().err
    report = json.loads((config.run_dir / "benchmark" / "report.json").read_text())
    records = list(read_jsonl(config.run_dir / "benchmark" / "records.jsonl"))
    cores = len(os.sched_getaffinity(0))
    assert report["hardware"]["detected_profile"] == f"cpu-{cores}core" == report["hardware"]["serving_hardware"]
    assert report["hardware"]["serving_source"] == "detected" and report["engine"] == "transformers"
    assert report["schema_version"] == 3
    assert set(report["systems"]) == {"teacher", "student_base", "student_prompted", "student_tuned"}
    for name, metrics in report["systems"].items():
        task = [r for r in records if r["system"] == name and r["kind"] == "task"]
        correct = sum(r["correct"] for r in task)
        assert metrics["accuracy"] == correct / len(task) and metrics["accuracy_ci95"] == wilson_interval(
            correct, len(task)
        )
        for category, accuracy in metrics["category_accuracy"].items():
            rows = [r for r in task if (r["category"] or "all") == category]
            assert accuracy == sum(r["correct"] for r in rows) / len(rows)
        assert sum(metrics["category_n"].values()) == len(task)
        truncated = sum(r["finish_reason"] == "length" for r in task)
        assert metrics["failure_rates"].pop("truncated") == truncated / len(task)
        assert set(metrics["failure_rates"]) == {"off_label"}  # the plugin task's named failure mode
        assert metrics["failure_rates"]["off_label"] == sum(r["failures"]["off_label"] for r in task) / len(task)
        for level in ("1", "3"):
            load = [
                r for r in records if r["system"] == name and r["kind"] == "load" and r["concurrency"] == int(level)
            ]
            summary = metrics["load"][level]
            assert len(load) == summary["requests"] == {"1": 4, "3": 6}[level]  # two waves of 3 at least
            for q in (50, 95, 99):
                assert summary[f"e2e_p{q}_s"] == pytest.approx(percentile([r["e2e_s"] for r in load], q))
                assert summary[f"ttft_p{q}_s"] == pytest.approx(percentile([r["ttft_s"] for r in load], q))
            assert all(0 < r["ttft_s"] <= r["e2e_s"] for r in load) and all(r["output_tokens"] > 0 for r in load)
            wall = max(r["ended_s"] for r in load) - min(r["started_s"] for r in load)
            assert summary["requests_per_s"] == pytest.approx(len(load) / wall)
            prefill_share = sum(r["ttft_s"] for r in load) / sum(r["e2e_s"] for r in load)
            assert summary["prompt_time_share"] == pytest.approx(prefill_share)
        # Priced at the highest level's throughput on this machine's detected CPU profile ($0.05 a core-hour).
        assert metrics["cost_basis"] == "vllm serve at concurrency 3"
        assert metrics["hardware"] == report["hardware"]["detected_profile"] and metrics["usd_per_hour"] == 0.05 * cores
        assert metrics["cost_per_1k_requests"] == pytest.approx(
            metrics["usd_per_hour"] / 3600 / metrics["load"]["3"]["requests_per_s"] * 1000
        )
        # Its distance to this CPU's measured bandwidth ceiling, from the server's time per output token.
        # (No bound of 1 here: the tiny model's weights sit in the CPU's cache, above the DRAM ceiling.)
        ceiling = report["hardware"]["profiles"][metrics["hardware"]]["memory_gbps"] * 1e9 / metrics["weight_bytes"]
        assert metrics["decode_ceiling_tokens_per_s"] == pytest.approx(ceiling)
        assert metrics["decode_roofline_share"] == pytest.approx(metrics["decode_tokens_per_s"] / ceiling)
        assert metrics["decode_roofline_share"] > 0 and metrics["decode_basis"].startswith("vllm serve")
        assert metrics["decode_tokens_per_s"] == pytest.approx(1 / metrics["load"]["1"]["tpot_p50_s"])
    tests = report["comparisons"]["student_tuned_vs"]
    assert set(tests) == {"teacher", "student_base", "student_prompted"}
    assert all(0 <= t["p_value"] <= 1 for t in tests.values())
    even = report["break_even"]
    assert even["one_off_wall_s"]["train"] > 0 and even["one_off_usd"] > 0
    filtered = json.loads(config.layout.filter_report.read_text())  # for a verdict that must say why
    assert report["filter"]["teacher_verified"] == filtered["teacher_verified"] and report["filter"]["samples_in"]
    costs = {name: metrics["cost_per_1k_requests"] for name, metrics in report["systems"].items()}
    prompted_saving = costs["student_prompted"] - costs["student_tuned"]
    assert even["vs_prompted"]["saving_per_1k_requests_usd"] == pytest.approx(prompted_saving)
    assert sorted(report["latency_cdf"]["teacher"]["1"]) == report["latency_cdf"]["teacher"]["1"]
    markdown = (config.run_dir / "benchmark" / "report.md").read_text()
    assert "Under load through `vllm serve`" in markdown and "## Break-even" in markdown
    assert (
        f"Ran on CPU ({cores} cores). Systems and the one-off generate + train are priced on `cpu-{cores}core`"
        in markdown
    )
    assert "measured here" in markdown and "the transformers engine, which has no prefix cache" in markdown
    assert "| student_prompted | $" in markdown  # break-even against prompting, as well as against the teacher
    # The prompted student is the teacher's tiny model with the teacher's prompt: measured once, its rows copied.
    assert report["systems"]["student_prompted"]["measured_as"] == "teacher"
    assert "measured_as" not in report["systems"]["student_base"]  # same weights, another prompt: measured
    for kind in ("task", "latency", "latency_cold", "load"):
        teacher_rows = [r for r in records if r["system"] == "teacher" and r["kind"] == kind]
        copied = [r for r in records if r["system"] == "student_prompted" and r["kind"] == kind]
        assert teacher_rows and copied == [
            {**r, "system": "student_prompted", "measured_as": "teacher"} for r in teacher_rows
        ]
    assert "`student_prompted` is `teacher`'s model with its prompt, so it was measured once" in markdown
    for plot in ("accuracy_vs_cost", "latency_cdf", "throughput_vs_concurrency"):
        assert (config.run_dir / "benchmark" / f"{plot}.png").stat().st_size > 1000
