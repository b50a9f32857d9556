"""Logit distillation: teacher targets aligned to the right tokens, the loss it adds, the tokenizer guard,
and the whole path from vLLM logprobs to a trained adapter."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import validate_config
from pipeline.console import PipelineError
from pipeline.train.data import to_prompt_completion
from pipeline.train.trainer import build_trainer
from tests.conftest import tiny_config

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Where is parcel {i}?"},
            {"role": "assistant", "content": f"Parcel {i} arrives in {i + 2} days."},
        ]
    }
    for i in range(4)
]


def completion_ids(tmp_path, model) -> list[list[int]]:
    """The completion tokens of each row as the plain SFT trainer tokenizes them (what the student learns)."""
    raw = tiny_config(tmp_path, model)
    sft = build_trainer(validate_config(raw), str(model), [to_prompt_completion(r) for r in ROWS], [], tmp_path / "sft")
    batch = sft.data_collator([sft.train_dataset[i] for i in range(len(ROWS))])
    return [row[row != -100].tolist() for row in batch["labels"]]


def kd_trainer(tmp_path, model, rows, **train):
    raw = tiny_config(tmp_path, model)
    raw["train"].update({"objective": "kd", "max_steps": 1, "per_device_train_batch_size": 4, **train})
    return build_trainer(validate_config(raw), str(model), rows, [], tmp_path / "out")


def one_hot_teacher(rows, ids_per_row, offset=0):
    """Teacher targets that put all mass on each teacher token (top-1, logprob 0), plus a runner-up."""
    return [
        {
            **to_prompt_completion(row),
            "kd_token_ids": list(ids),
            "kd_top_ids": [[t, (t + 7) % 1000] for t in ids],
            "kd_top_logprobs": [[0.0, -30.0] for _ in ids],
            "kd_offset": offset,
        }
        for row, ids in zip(rows, ids_per_row, strict=True)
    ]


@pytest.mark.parametrize("student", ["tiny_model", "tiny_base_model"])
def test_teacher_targets_go_to_the_same_token_at_the_same_place(tmp_path, student, tokenizer, request):
    """Also for a base student, which trains with the plain template the pipeline gives it (nothing after EOS)."""
    tiny_model = request.getfixturevalue(student)
    ids = completion_ids(tmp_path, tiny_model)
    # Row 0: the teacher sampled exactly the student's tokens. Row 1: the teacher's text had a leading space
    # the filter stripped, so its first word is one token where the student's has others, and it ended with
    # EOS, where the ChatML template adds a newline after it (the plain one nothing).
    content = ROWS[1]["messages"][-1]["content"]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    sampled = tokenizer.encode(" " + content, add_special_tokens=False) + [eos]
    assert sampled[0] != ids[1][0], "the test needs the leading space to change the first token"
    rows = one_hot_teacher(ROWS[:1], ids[:1]) + one_hot_teacher(ROWS[1:2], [sampled], offset=1)
    trainer = kd_trainer(tmp_path, tiny_model, rows)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    for row in (0, 1):
        positions = (batch["labels"][row] != -100).nonzero().flatten()
        mask = batch["kd_mask"][row][positions].tolist()
        distilled = positions[torch.tensor(mask)]
        # Wherever a target is given, the teacher's top-1 is the very token the student trains on there.
        assert (batch["kd_ids"][row, distilled, 0] == batch["labels"][row, distilled]).all()
        if row == 0:
            assert all(mask)
        else:
            after_eos = [False] if student == "tiny_model" else []
            # student tokens of "Parcel" (the teacher had " Parcel": one token)
            first_word = len(ids[1]) - len(after_eos) - (len(sampled) - 1)
            assert mask == [False] * first_word + [True] * (len(sampled) - 1) + after_eos, mask


def test_kd_on_a_one_hot_teacher_is_exactly_the_cross_entropy(tmp_path, tiny_model):
    """A teacher certain of the trained token makes KL(teacher || student) = -log q(token): alpha=1 (pure KD)
    and alpha=0 (pure CE) give the same loss. Off by one position, they would not."""
    rows = one_hot_teacher(ROWS, completion_ids(tmp_path, tiny_model))
    losses = {}
    for alpha in (0.0, 1.0):
        trainer = kd_trainer(tmp_path, tiny_model, rows, kd_alpha=alpha)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        batch = {k: v.to(trainer.args.device) for k, v in batch.items()}  # the trainer's device (a GPU's too)
        with torch.no_grad():
            losses[alpha] = trainer.compute_loss(trainer.model, batch).item()
    exact = next(trainer.model.parameters()).dtype == torch.float32  # bf16 on CUDA: the two sums round apart
    assert losses[1.0] == pytest.approx(losses[0.0], rel=1e-5 if exact else 1e-2)
    assert losses[0.0] > 5  # a random model: the check compares real losses, not two zeros


def test_different_tokenizers_are_refused(tmp_path, tokenizer):
    from copy import deepcopy

    from pipeline.train.kd import check_same_tokenizer

    tokenizer.save_pretrained(tmp_path / "student")
    other = deepcopy(tokenizer)
    other.add_tokens(["<|teacher-only|>"])
    other.save_pretrained(tmp_path / "teacher")
    with pytest.raises(PipelineError, match=r"^train.objective: kd needs teacher and student to share a tokenizer"):
        check_same_tokenizer(str(tmp_path / "teacher"), str(tmp_path / "student"))
    check_same_tokenizer(str(tmp_path / "student"), str(tmp_path / "student"))


def test_kd_with_packing_is_refused(tmp_path, tiny_model):
    with pytest.raises(PipelineError, match="train.objective: kd needs one example per row"):
        kd_trainer(tmp_path, tiny_model, [to_prompt_completion(r) for r in ROWS], packing=True)


@pytest.mark.integration
def test_kd_from_vllm_logprobs_end_to_end(tmp_path, tiny_model):
    """generate (vLLM, top-5 logprobs) -> filter -> train with objective kd: the KL term is trained on the
    teacher's own tokens; without logprobs stored, the stage says how to get them."""
    from pipeline.cli import run_pipeline

    raw = tiny_config(tmp_path, tiny_model)
    raw["teacher"]["engine"] = {"backend": "vllm", "max_model_len": 1024}
    raw["teacher"]["sampling"].update({"n": 1, "logprobs": 5})
    raw["train"].update({"objective": "kd", "max_steps": 3, "merge": False})
    config = validate_config(raw)
    run_pipeline(config, stages=("generate", "filter", "train"))
    metrics = json.loads((config.run_dir / "train" / "train_metrics.json").read_text())
    logged = [entry for entry in metrics["log_history"] if "kd_kl" in entry]
    assert metrics["objective"] == "kd" and len(logged) == 3
    assert all(entry["kd_kl"] > 0 for entry in logged)
    assert min(entry["kd_token_share"] for entry in logged) > 0.5  # most completion tokens carry teacher targets

    # Outputs without logprobs, from whichever engine: the transformers one spares a second vLLM start.
    raw["teacher"]["engine"] = {"backend": "transformers", "batch_size": 8}
    raw["teacher"]["sampling"]["logprobs"] = None
    with pytest.raises(PipelineError, match="kd needs the teacher's logprobs; generate with teacher.sampling.logprobs"):
        run_pipeline(validate_config(raw), stages=("generate", "filter", "train"))
