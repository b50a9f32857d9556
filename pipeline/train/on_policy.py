"""On-policy distillation (`train.objective: on_policy`): the student answers the training prompts with its own
prompt, and the teacher scores exactly those tokens under the teacher's prompt (rules, articles, worked examples).
The loss is the per-token divergence of the student's next-token distribution from the teacher's on the student's
own answers: reverse KL at `train.on_policy.beta` 1, forward KL at 0, the generalised JSD between.

Built on TRL's self-distillation trainer (`trl.experimental.sdft`). Its teacher is the student's base weights with
the LoRA adapter disabled, with no second copy of the model in memory, or a separate local model that shares the
student's tokenizer (a larger teacher, or the teacher a pruned student was cut from). Its privileged context is here the
teacher's whole conversation for the same example, not a note appended to the student's prompt. A replay row
(general chat) keeps its own prompt on both sides: there the teacher is the untuned model as it was, which pulls
the student back toward its general behaviour.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pipeline.chat_templates import end_of_turn_id
from pipeline.config import ExperimentConfig
from pipeline.console import PipelineError
from pipeline.files import read_jsonl
from pipeline.tasks import Task


def separate_teacher(model_path: str, teacher_path: str) -> str | None:
    """The teacher's folder when it is not the student's own model, else None (the base weights, adapter off)."""
    return None if Path(teacher_path).resolve() == Path(model_path).resolve() else teacher_path


def check_on_policy(config: ExperimentConfig, model_path: str, teacher_path: str) -> None:
    """The teacher placements this objective supports, in one line each. The student's own model as the teacher is
    its base weights with the adapter disabled, so it needs an adapter. A separate teacher must share the student's
    tokenizer; a larger embedding (a vocabulary padded to a multiple) is fine: the shared rows are compared."""
    train = config.train
    separate = separate_teacher(model_path, teacher_path)
    if train.method == "full" and not separate:
        raise PipelineError(
            "train.objective: on_policy scores with the student's base weights, the adapter disabled; "
            "train.method full has no adapter (use lora)"
        )
    if train.packing:
        raise PipelineError("train.objective: on_policy samples one answer a prompt; set train.packing=false")
    start = train.on_policy.init_adapter
    if start and not (Path(start) / "adapter_config.json").is_file():
        raise PipelineError(f"train.on_policy.init_adapter: no LoRA adapter at {start} (adapter_config.json)")
    if separate:
        from pipeline.train.kd import check_same_tokenizer

        check_same_tokenizer(separate, model_path, "on_policy")


def teacher_level(filter_report: dict[str, Any] | None) -> tuple[float | None, str | None]:
    """The share of the teacher's samples that passed the task's scorer, and a line saying what it means here:
    on-policy distils the teacher as it is, while SFT learns only the answers the filter kept. (None, None) where
    the task has no scorer or the filter left no report."""
    rate = (filter_report or {}).get("teacher_verified_rate")
    if rate is None:
        return None, None
    return rate, (
        f"train: the teacher's samples passed the task's scorer at {rate:.0%}; on-policy distillation learns the "
        "teacher as it is, so the student tends to that level, where SFT learns only the answers the filter kept "
        "(docs/guides/on-policy.md)"
    )


def on_policy_rows(config: ExperimentConfig, task: Task, train_data: Path) -> list[dict[str, Any]]:
    """Each prompt of the filter's training set once: the student's conversation (`prompt`, up to its last user
    turn) and the teacher's for the same example (`privileged_context`); a replay row's own prompt on both sides."""
    examples = {example.id: example for example in task.split("train")}
    rows, seen = [], set()
    for row in read_jsonl(train_data):
        prompt_id = row.get("prompt_id")
        if prompt_id in seen:
            continue
        seen.add(prompt_id)
        example = examples.get(prompt_id) if not row.get("replay") else None
        answer = row["messages"][-1]["content"]  # the kept answer: trained on at train.on_policy.teacher_sample_share
        if example is None:
            prompt = row["messages"][:-1]
            rows.append({"prompt": prompt, "privileged_context": prompt, "teacher_answer": answer})
            continue
        rows.append(
            {
                "prompt": task.messages(example, config.student.prompt_style),
                "privileged_context": task.messages(example, config.teacher.prompt_style),
                "teacher_answer": answer,
            }
        )
    return rows


def on_policy_trainer(
    config: ExperimentConfig,
    model_path: str,
    teacher_path: str | None,
    rows: list[dict[str, Any]],
    output_dir: Path,
    *,
    processing_class: Any,
    peft_config: Any,
    args: dict[str, Any],
) -> Any:
    """TRL's self-distillation trainer with the teacher's conversation as its context, on `rows`
    (`on_policy_rows`). `teacher_path`: a separate teacher model (`separate_teacher`), else None: the student's
    base weights. `args`: the run's shared training arguments (learning rate, steps, device, logging)."""
    import os

    from datasets import Dataset

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # known to be experimental: the docs say so
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    settings = config.train.on_policy
    sdft_args = SDFTConfig(
        output_dir=str(output_dir),
        **args,
        max_prompt_length=None,  # the teacher's prompt is long (rules, articles, examples): never cut from the left
        max_completion_length=settings.max_completion_length,
        num_generations=1,
        temperature=settings.temperature,
        distillation_alpha=settings.beta,
        distillation_mode="full_logits" if settings.top_k is None else "topk_logits",
        distillation_topk=settings.top_k,
        teacher_model_kind="base",
        remove_unused_columns=False,
    )

    class OnPolicyTrainer(SDFTTrainer):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.teacher_context_builder = TeacherConversation(self)
            self.share_rng = random.Random(config.seed)  # which batches train on the teacher's kept answers
            self.given_completions: list[list[int]] | None = None
            self.on_policy_batches = {"student_samples": 0, "teacher_answers": 0}
            # What the one-off cost and train_metrics.json count: the teacher's tokens scored (prefill only: its
            # prompt and the student's answer) apart from the tokens the student sampled, and the time sampling took.
            self.on_policy_totals = {"teacher_scored_tokens": 0, "student_sampled_tokens": 0, "sampling_s": 0.0}

        def _setup_teacher_model(self) -> None:
            if teacher_path is None:
                super()._setup_teacher_model()
                return
            from transformers import AutoModelForCausalLM

            teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=self.model.dtype)
            teacher.requires_grad_(False)
            self.teacher_model = self.accelerator.prepare_model(teacher.eval(), evaluation_mode=True)

        def _get_teacher_context_for_self_distillation(self) -> Any:
            from contextlib import nullcontext

            # A separate teacher is its own model: no adapter of the student's to switch off.
            return nullcontext() if teacher_path is not None else super()._get_teacher_context_for_self_distillation()

        def _compute_teacher_student_logits(self, model: Any, teacher_model: Any, inputs: Any) -> Any:
            logits = super()._compute_teacher_student_logits(model, teacher_model, inputs)
            shared = min(logits.student_logits.size(-1), logits.teacher_logits.size(-1))
            if logits.teacher_logits.size(-1) != logits.student_logits.size(-1):  # embeddings padded differently
                logits.student_logits = logits.student_logits[..., :shared]
                logits.teacher_logits = logits.teacher_logits[..., :shared]
            return logits

        def sample_rollouts(self, inputs: list[dict[str, Any]]) -> Any:
            """A share of batches (train.on_policy.teacher_sample_share) takes the filter's kept teacher answers as
            its completions instead of sampling: the teacher scores them token by token all the same."""
            share = settings.teacher_sample_share
            if share and self.model.training and self.share_rng.random() < share:
                tokenizer = self.processing_class
                closing = end_of_turn_id(tokenizer)
                end = [closing if closing is not None else tokenizer.eos_token_id]
                self.given_completions = [
                    tokenizer(text=row["teacher_answer"], add_special_tokens=False)["input_ids"] + end for row in inputs
                ]
                self.on_policy_batches["teacher_answers"] += 1
            else:
                self.on_policy_batches["student_samples"] += 1
            try:
                return super().sample_rollouts(inputs)
            finally:
                self.given_completions = None

        def _generate(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
            if self.given_completions is not None:
                return prompt_ids, self.given_completions
            return super()._generate(prompt_ids)

        def _prepare_training_batch(self, inputs: list[dict[str, Any]]) -> Any:
            import time

            started = time.perf_counter()
            batch = super()._prepare_training_batch(inputs)
            totals = self.on_policy_totals
            totals["sampling_s"] += time.perf_counter() - started
            totals["teacher_scored_tokens"] += int(batch["teacher_attention_mask"].sum())
            totals["student_sampled_tokens"] += int(batch["completion_mask"].sum())
            return batch

    from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder

    class TeacherConversation(DemonstrationTeacherContextBuilder):
        """The teacher's prompt is its own conversation for the example, given whole as the privileged context."""

        def _compose_teacher_prompt(self, prompt: Any, privileged_context: Any) -> Any:
            return privileged_context

    model: Any = model_path
    if settings.init_adapter:  # warm start: the adapter trains on from where it was, the base stays the teacher
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from pipeline.train.options import model_init_kwargs

        base = AutoModelForCausalLM.from_pretrained(model_path, **model_init_kwargs(config.train, args))
        model, peft_config = PeftModel.from_pretrained(base, settings.init_adapter, is_trainable=True), None
    return OnPolicyTrainer(
        model=model,
        args=sdft_args,
        train_dataset=Dataset.from_list(rows),
        processing_class=processing_class,
        peft_config=peft_config,
    )
