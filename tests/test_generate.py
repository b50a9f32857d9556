"""Generate at scale on a tiny model: a real SIGKILL mid-run and a resume, and sharding with a merge."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pipeline.config import validate_config
from pipeline.console import PipelineError
from pipeline.files import read_jsonl
from pipeline.generate import Shard, merge_shards, run_generate, shard_of
from tests.conftest import append_csv_rows, kill_midway, tiny_config


def greedy_config(tmp_path, tiny_model, run_name: str, num_train: int) -> dict:
    """Greedy, one prompt per chunk: every prompt is generated alone, so any run gives the same rows."""
    raw = tiny_config(tmp_path, tiny_model, run_name=run_name)
    raw["task"]["params"]["num_train"] = num_train
    raw["teacher"]["sampling"] = {"n": 1, "temperature": 0.0, "max_tokens": 32}
    raw["teacher"]["chunk_size"] = 1
    raw["tracking"] = {"wandb": False}
    return raw


def test_sigkill_midway_then_resume_gives_the_uninterrupted_rows(tmp_path, tiny_model):
    raw = greedy_config(tmp_path, tiny_model, "killed", num_train=40)
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    config = validate_config(raw)
    partial = config.run_dir / "generate" / "teacher_outputs.partial.jsonl"

    kill_midway(
        ["generate", "--config", str(config_file)],
        lambda: partial.exists() and partial.read_bytes().count(b"\n") >= 3,
        "generate",
        timeout=120,
    )
    survived = partial.read_bytes().count(b"\n")
    assert 3 <= survived < 40, survived  # killed midway, with work to lose

    resumed = list(read_jsonl(run_generate(config)))
    ids = [row["prompt_id"] for row in resumed]
    assert len(ids) == len(set(ids)) == 40  # every prompt exactly once
    whole = validate_config(greedy_config(tmp_path, tiny_model, "whole", num_train=40))
    uninterrupted = list(read_jsonl(run_generate(whole)))
    assert resumed == uninterrupted  # nothing lost, nothing changed by the kill


def test_sigterm_shuts_down_cleanly_and_the_rerun_resumes(tmp_path, tiny_model):
    """SIGTERM (a scheduler's preemption) is handled like Ctrl-C: `finally` blocks run and engines close, exit
    143 with one line, the process group leaves nothing behind, and the rerun finishes the rows."""
    import signal
    import subprocess
    import sys
    import time

    raw = greedy_config(tmp_path, tiny_model, "terminated", num_train=30)
    config_file = tmp_path / "terminated.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    config = validate_config(raw)
    partial = config.run_dir / "generate" / "teacher_outputs.partial.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "generate", "--config", str(config_file)],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not (partial.exists() and partial.read_bytes().count(b"\n") >= 2):
        assert process.poll() is None and time.time() < deadline, "generate ended or stalled before the SIGTERM"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1].startswith("distill: terminated (SIGTERM)")
    time.sleep(1)
    with pytest.raises(ProcessLookupError):  # no engine worker left behind in the group
        os.killpg(process.pid, 0)
    ids = [row["prompt_id"] for row in read_jsonl(run_generate(config))]
    assert len(ids) == len(set(ids)) == 30


def test_shards_are_disjoint_and_merge_into_the_unsharded_output(tmp_path, tiny_model):
    config = validate_config(greedy_config(tmp_path, tiny_model, "sharded", num_train=12))
    ids = {example.id for example in _train(config)}
    assert {shard_of(i, 3) for i in ids} == {0, 1, 2}  # the split below is not trivial

    first = run_generate(config, shard=Shard(0, 3))
    with pytest.raises(PipelineError, match=r"shard 1 of 3 is not finished"):
        merge_shards(config, 3)
    outputs = [first, run_generate(config, shard=Shard(1, 3)), run_generate(config, shard=Shard(2, 3))]
    slices = [{row["prompt_id"] for row in read_jsonl(path)} for path in outputs]
    assert sum(map(len, slices)) == 12 and set.union(*slices) == ids

    merged = merge_shards(config, 3)
    whole = run_generate(validate_config(greedy_config(tmp_path, tiny_model, "unsharded", num_train=12)))
    assert merged.read_bytes() == whole.read_bytes()
    assert run_generate(config) == merged  # the merged output counts as the finished stage: skipped
    with pytest.raises(PipelineError, match="need 0 <= shard < num-shards"):
        Shard(3, 3)


def _train(config):
    from pipeline.tasks import build_task

    return build_task(config.task.name, config.task.params, config.seed, config.base_dir).split("train")


@pytest.mark.integration
def test_ray_runs_two_workers_and_merges_into_the_unsharded_output(tmp_path, tiny_model):
    pytest.importorskip("ray", reason="pip install 'distill-pipeline[ray]'")
    from pipeline.generate import run_generate_or_scale_out

    raw = greedy_config(tmp_path, tiny_model, "ray", num_train=8)
    raw["teacher"]["ray"] = {"workers": 2, "gpus_per_worker": 0}
    config = validate_config(raw)
    merged = run_generate_or_scale_out(config)
    shard_dirs = sorted(p.name for p in (config.run_dir / "generate" / "shards").iterdir())
    assert shard_dirs == ["00000-of-00002", "00001-of-00002"]
    whole = run_generate(validate_config(greedy_config(tmp_path, tiny_model, "whole", num_train=8)))
    assert merged.read_bytes() == whole.read_bytes()


def test_new_rows_in_the_data_file_are_generated_alone_and_old_answers_reused(tmp_path, tiny_model):
    import json

    def write_rows(path, count, start=0):
        tickets = range(start, start + count)
        append_csv_rows(
            path, [(f"ticket number {i} about {'billing' if i % 2 else 'shipping'}", "ab"[i % 2 == 0]) for i in tickets]
        )

    train_csv, test_csv = tmp_path / "tickets.csv", tmp_path / "held_out.csv"
    write_rows(train_csv, 8)
    write_rows(test_csv, 3, start=100)
    raw = greedy_config(tmp_path, tiny_model, "nightly", num_train=0)
    raw["task"] = {"name": "classification", "params": {"path": str(train_csv), "test_path": str(test_csv)}}
    config = validate_config(raw)

    first = {row["prompt_id"]: row for row in read_jsonl(run_generate(config))}
    # 8 rows, of which the first of each label (4 by default) are the full prompt's few-shot examples, not asked.
    assert run_generate(config) and len(first) == 4  # unchanged data: skipped
    # A label task's teacher is constrained to the labels (task.params.constrained, on by default).
    assert {c["text"].strip() for row in first.values() for c in row["completions"]} <= {"a", "b"}
    assert all(row["sampling"]["choices"] == ["a", "b"] for row in first.values())

    write_rows(train_csv, 4, start=8)  # tonight's new tickets: appended, so the few-shot examples stay the same
    output = run_generate(config)
    second = {row["prompt_id"]: row for row in read_jsonl(output)}
    metrics = json.loads((output.parent / "manifest.json").read_text())["metrics"]
    assert (metrics["reused_prompts"], metrics["generated_prompts"]) == (4, 4)
    assert len(second) == 8 and all(second[key] == row for key, row in first.items())

    # Another teacher setting changes what a row would be: nothing is reused.
    raw["teacher"]["sampling"]["max_tokens"] = 16
    output = run_generate(validate_config(raw))
    metrics = json.loads((output.parent / "manifest.json").read_text())["metrics"]
    assert (metrics["reused_prompts"], metrics["generated_prompts"]) == (0, 8)

    # How the teacher runs does not (memory, prefix caching): the stage stays fresh, its output and manifest as
    # they were.
    manifest, rows = (output.parent / "manifest.json").read_text(), output.read_bytes()
    raw["teacher"]["engine"] |= {"gpu_memory_utilization": 0.4, "enable_prefix_caching": False}
    output = run_generate(validate_config(raw))
    assert (output.parent / "manifest.json").read_text() == manifest and output.read_bytes() == rows


LONG_LABELS = [
    "a review that praises the product at great length",
    "a complaint about the shipping that took far too long",
]


def long_label_config(tmp_path, tiny_model, run_name: str) -> tuple[dict, Path]:
    """Greedy classification with labels of 9 and 10 tokens under teacher.sampling.max_tokens=4, asked in the short
    prompt (which does not list the labels); returns the raw config and its train file."""
    train_csv, test_csv = tmp_path / f"{run_name}.csv", tmp_path / f"{run_name}_held_out.csv"
    append_csv_rows(train_csv, [(f"review number {i}", LONG_LABELS[i % 2]) for i in range(6)])
    append_csv_rows(test_csv, [(f"review number {i}", LONG_LABELS[i % 2]) for i in range(100, 102)])
    raw = greedy_config(tmp_path, tiny_model, run_name, num_train=0)
    params = {"path": str(train_csv), "test_path": str(test_csv), "few_shot": 0}
    raw["task"] = {"name": "classification", "params": params}
    raw["teacher"] |= {"prompt_style": "short", "sampling": {"temperature": 0.0, "max_tokens": 4}}
    return raw, train_csv


@pytest.mark.parametrize("backend", ["transformers", pytest.param("vllm", marks=pytest.mark.integration)])
def test_max_tokens_fits_the_longest_constrained_label_however_it_is_spelled(tmp_path, tiny_model, capsys, backend):
    """Labels longer than teacher.sampling.max_tokens would be cut short and dropped as truncated: the stage raises
    max_tokens to a token per UTF-8 byte of the longest label plus the end of turn, in one log line, and every
    answer is a whole label that stopped. Not to the labels' own token counts (9 and 10 here, in the teacher's
    tokenizer): vLLM's constrained decoding spells them in other tokenizations too, 17 to 28 tokens on this model."""
    raw, _ = long_label_config(tmp_path, tiny_model, backend)
    if backend == "vllm":
        raw["teacher"]["engine"] = {"backend": "vllm", "max_model_len": 512, "kv_cache_gb": 0.25}
    limit = len(LONG_LABELS[1].encode()) + 1
    rows = list(read_jsonl(run_generate(validate_config(raw))))
    completions = [c for row in rows for c in row["completions"]]
    assert len(rows) == 6 and {c["text"] for c in completions} <= set(LONG_LABELS)
    assert all(c["finish_reason"] == "stop" for c in completions)
    assert all(row["sampling"]["max_tokens"] == limit for row in rows)
    said = [line for line in capsys.readouterr().err.splitlines() if "teacher.sampling.max_tokens" in line]
    assert said == [
        f"[distill] generate: teacher.sampling.max_tokens raised from 4 to {limit}: constrained decoding may spell "
        f"the longest label, {LONG_LABELS[1]!r}, in a token per UTF-8 byte ({limit - 1}), and the end of turn takes "
        "one more"
    ]


def test_rows_answered_under_another_label_set_are_not_reused(tmp_path, tiny_model):
    """A longer label added to the data changes the teacher's sampling (its choices and the raised max_tokens)
    while its config stays the same: the previous rows, answered under the old ones, are not reused, though the
    short prompt that asked them has not changed."""
    import json

    raw, train_csv = long_label_config(tmp_path, tiny_model, "relabelled")
    config = validate_config(raw)
    assert len(list(read_jsonl(run_generate(config)))) == 6
    longer = "a long and careful comparison with three other products that we bought last year"
    append_csv_rows(train_csv, [("review number 6", longer)])
    output = run_generate(config)
    metrics = json.loads((output.parent / "manifest.json").read_text())["metrics"]
    assert (metrics["reused_prompts"], metrics["generated_prompts"]) == (0, 7)
    assert {row["sampling"]["max_tokens"] for row in read_jsonl(output)} == {len(longer.encode()) + 1}


def test_how_the_teacher_is_run_keeps_its_rows_but_another_served_model_does_not(tmp_path, tiny_model):
    """A teacher's memory, batching and GPU split, and its server's address, concurrency, timeout, retries or key
    variable, change nothing a row says (the stage resumes and reuses its rows); the model the server answers
    with, sending seeds, the dtype or the context length do."""
    from pipeline.config import HOW_A_SERVER_IS_ASKED
    from pipeline.generate.stage import teacher_identity

    raw = greedy_config(tmp_path, tiny_model, "served", num_train=4)
    raw["teacher"]["engine"] = {"backend": "openai", "server": {"base_url": "http://gpu-a:8000/v1"}}
    teacher = validate_config(raw).teacher.model_dump()

    def served(**server):
        engine = teacher["engine"] | {"server": teacher["engine"]["server"] | server}
        return teacher_identity(teacher | {"engine": engine})

    moved = {"base_url": "http://gpu-b:9000/v1", "api_key_env": "OTHER", "max_concurrency": 2, "timeout_s": 9.0}
    assert served(**moved, max_retries=0) == teacher_identity(teacher)
    assert set(moved) | {"max_retries"} == set(HOW_A_SERVER_IS_ASKED)
    assert served(model="another-model") != teacher_identity(teacher)
    assert served(send_seed=False) != teacher_identity(teacher)

    offline = teacher | {"engine": teacher["engine"] | {"backend": "vllm"}}

    def run_with(**engine):
        return teacher_identity(offline | {"engine": offline["engine"] | engine})

    assert run_with(server={}) == teacher_identity(offline)  # a server's settings mean nothing to vLLM offline
    assert run_with(gpu_memory_utilization=0.9, kv_cache_gb=20.0, tensor_parallel_size=4, enforce_eager=True) == (
        teacher_identity(offline)
    )
    assert run_with(dtype="float16") != teacher_identity(offline)
    assert run_with(max_model_len=1024) != teacher_identity(offline)
