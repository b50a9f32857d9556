"""On-policy distillation on a tiny model: the teacher scores the student's own sampled answer after the teacher's
prompt, a training step lowers the divergence on a fixed batch, the stage runs it end to end, and a teacher it
cannot use stops with one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from pipeline.config import validate_config
from pipeline.console import PipelineError
from pipeline.tasks import task_for
from pipeline.train.trainer import build_trainer
from tests.conftest import tiny_config


def on_policy_config(tmp_path, model, **on_policy):
    raw = tiny_config(tmp_path, model)
    raw["train"].update(
        {
            "objective": "on_policy",
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "on_policy": {"max_completion_length": 6, **on_policy},
        }
    )
    return validate_config(raw)


def on_policy_rows_for(config):
    """Two training prompts as `on_policy_rows` gives them: the student's conversation and the teacher's."""
    task = task_for(config)
    return [
        {
            "prompt": task.messages(example, config.student.prompt_style),
            "privileged_context": task.messages(example, config.teacher.prompt_style),
            "teacher_answer": f"Answer {index}: reset it from Settings.",
        }
        for index, example in enumerate(task.split("train")[:2])
    ]


def trainer_and_rows(tmp_path, model, **on_policy):
    config = on_policy_config(tmp_path, model, **on_policy)
    rows = on_policy_rows_for(config)
    return build_trainer(config, str(model), rows, [], tmp_path / "out"), rows


def test_the_teacher_scores_the_students_own_answer_after_the_teachers_prompt(tmp_path, tiny_model, tokenizer):
    """The two inputs end in the same sampled tokens and differ exactly in what precedes them: the student's
    short prompt against the teacher's, with its rules, article and worked examples."""
    trainer, rows = trainer_and_rows(tmp_path, tiny_model)
    batch = trainer._prepare_training_batch([trainer.train_dataset[i] for i in range(len(rows))])
    completions = batch["completion_ids"]
    length = completions.size(1)
    teacher, student = batch["teacher_input_ids"], batch["prompt_ids"]
    assert torch.equal(teacher[:, -length:], completions)

    def rendered(conversation) -> list[int]:
        return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)["input_ids"]

    for index, row in enumerate(rows):
        teacher_prompt = teacher[index, :-length][batch["teacher_attention_mask"][index, :-length].bool()].tolist()
        student_prompt = student[index][batch["prompt_mask"][index].bool()].tolist()
        assert teacher_prompt == rendered(row["privileged_context"])
        assert student_prompt == rendered(row["prompt"])
        assert len(teacher_prompt) > 2 * len(student_prompt)  # the privileged context is what the teacher sees more


def losses_over_steps(trainer, batch, steps: int) -> list[float]:
    """The divergence on one fixed batch before each of `steps` optimiser steps (Adam, lr 2e-3)."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this stands in for
    optimizer = torch.optim.Adam([p for p in trainer.model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(steps):
        loss = trainer.compute_loss(trainer.model, batch)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def test_a_step_lowers_the_reverse_kl_on_a_fixed_batch(tmp_path, tiny_model):
    trainer, rows = trainer_and_rows(tmp_path, tiny_model, beta=1.0)
    batch = trainer._prepare_training_batch([trainer.train_dataset[i] for i in range(len(rows))])
    losses = losses_over_steps(trainer, batch, 8)
    assert losses[0] > 0 and losses[-1] < 0.8 * losses[0], losses


def test_on_policy_trains_through_the_stage(tmp_path, tiny_model, capsys):
    from pipeline.cli import run_pipeline

    config = on_policy_config(tmp_path, tiny_model)
    run_pipeline(config, stages=("generate", "filter", "train"))
    metrics = json.loads(config.layout.train_metrics.read_text())
    logged = [entry for entry in metrics["log_history"] if "sdft/distillation_loss" in entry]
    assert metrics["objective"] == "on_policy" and len(logged) == 2 and all(e["loss"] > 0 for e in logged)
    # Two steps of two prompts: the teacher scored its long prompts and the sampled tokens, the student sampled 6 each.
    assert 0 < metrics["student_sampled_tokens"] <= 2 * 2 * 6
    assert metrics["teacher_scored_tokens"] > 10 * metrics["student_sampled_tokens"] and metrics["sampling_s"] > 0
    # The level on-policy distils toward: the teacher's share right before the filter, said once in the log.
    verified = json.loads(config.layout.filter_report.read_text())["teacher_verified_rate"]
    assert verified is not None and metrics["teacher_verified_rate"] == verified
    assert f"the teacher's samples passed the task's scorer at {verified:.0%}" in capsys.readouterr().err
    assert (config.layout.adapter / "adapter_config.json").is_file() and (
        config.layout.merged / "config.json"
    ).is_file()


def padded_teacher(path, tokenizer, extra_rows: int = 64):
    """A separate tiny teacher with the student's tokenizer and its embedding padded by `extra_rows` (Qwen2.5-7B pads
    its vocabulary to 152,064 rows, 0.5B to 151,936)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_tiny_model

    build_tiny_model(path, tokenizer, seed=3)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.resize_token_embeddings(len(tokenizer) + extra_rows)
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_a_separate_teacher_with_a_padded_vocabulary_scores_on_the_shared_rows(tmp_path, tiny_model, tokenizer):
    """A local teacher other than the student's model: its own weights score the student's tokens after the teacher's
    prompt, its extra embedding rows are left out, and a step lowers the divergence."""
    teacher = padded_teacher(tmp_path / "teacher", tokenizer)
    config = on_policy_config(tmp_path, tiny_model)
    raw = config.model_dump(mode="json")
    raw["teacher"]["model"] = str(teacher)
    from pipeline.train.on_policy import check_on_policy

    check_on_policy(validate_config(raw), str(tiny_model))  # one tokenizer: accepted
    rows = on_policy_rows_for(config)
    trainer = build_trainer(validate_config(raw), str(tiny_model), rows, [], tmp_path / "out")
    assert trainer.teacher_model is not trainer.model
    assert trainer.teacher_model.get_output_embeddings().weight.size(0) == len(tokenizer) + 64
    batch = trainer._prepare_training_batch([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    logits = trainer._compute_teacher_student_logits(trainer.model, trainer.teacher_model, batch)
    assert logits.teacher_logits.size(-1) == logits.student_logits.size(-1) == len(tokenizer)
    losses = losses_over_steps(trainer, batch, 6)
    assert losses[-1] < losses[0], losses


def test_a_teacher_with_another_tokenizer_or_full_training_on_its_own_base_stops_with_one_line(
    tmp_path, tiny_model, tokenizer
):
    from pipeline.cli import main
    from pipeline.train.on_policy import check_on_policy
    from tests.conftest import build_tiny_model

    other_tokenizer = copy.deepcopy(tokenizer)
    other_tokenizer.add_tokens(["<ticket-id>", "<order-id>"])
    other = build_tiny_model(tmp_path / "other", other_tokenizer, seed=1)
    raw = on_policy_config(tmp_path, tiny_model).model_dump()
    raw["teacher"]["model"] = str(other)
    with pytest.raises(PipelineError, match="^train.objective: on_policy needs teacher and student to share a tok"):
        check_on_policy(validate_config(raw), str(tiny_model))
    raw["teacher"]["model"] = str(tiny_model)
    raw["train"]["method"] = "full"
    with pytest.raises(PipelineError, match="^train.objective: on_policy scores with the student's base weights"):
        check_on_policy(validate_config(raw), str(tiny_model))
    # Through the CLI, after generate and filter: one line, exit 2.
    raw["train"]["method"] = "lora"
    raw["teacher"]["model"] = str(other)
    path = tmp_path / "other.json"
    path.write_text(json.dumps(raw))
    assert main(["run", "--config", str(path)]) == 2


def test_a_share_of_batches_trains_on_the_teachers_kept_answers_scored_the_same_way(tmp_path, tiny_model, tokenizer):
    """train.on_policy.teacher_sample_share 1: every batch's completions are the kept teacher answers closed by the
    end-of-turn token, not samples, and the teacher still scores exactly those tokens after its own prompt."""
    trainer, rows = trainer_and_rows(tmp_path, tiny_model, teacher_sample_share=1.0)
    trainer.model.train()
    batch = trainer._prepare_training_batch([trainer.train_dataset[i] for i in range(len(rows))])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for index, row in enumerate(rows):
        given = tokenizer(text=row["teacher_answer"], add_special_tokens=False)["input_ids"] + [end]
        completion = batch["completion_ids"][index][batch["completion_mask"][index].bool()].tolist()
        assert completion == given
    length = batch["completion_ids"].size(1)
    assert torch.equal(batch["teacher_input_ids"][:, -length:], batch["completion_ids"])
    assert trainer.on_policy_batches == {"student_samples": 0, "teacher_answers": 1}


def test_on_policy_warm_starts_from_an_sft_adapter_and_a_missing_one_is_one_line(tmp_path, ping_pong_student):
    """SFT first, then on-policy: the student starts from the SFT adapter's weights (its LoRA B matrices are not the
    zeros a new adapter starts with), while the teacher is the base with the adapter disabled."""
    base, adapter, _ = ping_pong_student
    trainer, _ = trainer_and_rows(tmp_path, base, init_adapter=str(adapter))
    from safetensors.torch import load_file

    saved = load_file(adapter / "adapter_model.safetensors")
    loaded = {name: p for name, p in trainer.model.named_parameters() if "lora_B" in name}
    assert loaded and all(p.requires_grad for p in loaded.values())
    assert any(p.abs().sum() > 0 for p in loaded.values())
    assert sum(float(t.abs().sum()) for k, t in saved.items() if "lora_B" in k) == pytest.approx(
        sum(float(p.detach().abs().sum()) for p in loaded.values()), rel=1e-5
    )
    from pipeline.train.on_policy import check_on_policy

    config = on_policy_config(tmp_path, base, init_adapter=str(tmp_path / "nowhere"))
    with pytest.raises(PipelineError, match="^train.on_policy.init_adapter: no LoRA adapter at"):
        check_on_policy(config, str(base))


def test_a_killed_on_policy_training_resumes_from_its_last_checkpoint(tmp_path, tiny_model):
    """SIGKILLed after its third checkpoint, the on-policy run resumes from its newest one and finishes the count."""
    import yaml

    from pipeline.train import run_train
    from tests.conftest import kill_midway, write_filtered

    config = on_policy_config(tmp_path, tiny_model)
    raw = config.model_dump(mode="json")
    raw["train"].update({"max_steps": 30, "save_steps": 2, "merge": False, "logging_steps": 1})
    config_file = tmp_path / "on_policy.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    config = validate_config(raw)
    chats = [
        {
            "prompt_id": f"general-{i}",
            "messages": [
                {"role": "user", "content": f"Name a colour, {i}."},
                {"role": "assistant", "content": "Blue."},
            ],
        }
        for i in range(6)
    ]
    write_filtered(config, chats)
    checkpoints = config.layout.checkpoints
    kill_midway(
        ["train", "--config", str(config_file)],
        lambda: (checkpoints / "checkpoint-6" / "trainer_state.json").exists(),
        "on-policy training",
    )
    saved = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert saved and saved[-1] < 30
    run_train(config)
    metrics = json.loads(config.layout.manifest("train").read_text())["metrics"]
    assert metrics["resumed_from"] == f"checkpoint-{saved[-1]}" and metrics["steps"] == 30
    steps = [e["step"] for e in json.loads(config.layout.train_metrics.read_text())["log_history"] if "loss" in e]
    assert steps == sorted(set(steps)) and steps[-1] == 30
