"""On-policy distillation (`train.objective: on_policy`): the student answers the training prompts with its own
prompt, and the teacher scores exactly those tokens under the teacher's prompt (rules, articles, worked examples).
The loss is the per-token divergence of the student's next-token distribution from the teacher's on the student's
own answers: reverse KL at `train.on_policy.beta` 1, forward KL at 0, the generalised JSD between.

Built on TRL's self-distillation trainer (`trl.experimental.sdft`). Its teacher is the student's base weights with
the LoRA adapter disabled, with no second copy of the model in memory, or a separate local model that shares the
student's tokenizer (a larger teacher, or the teacher a pruned student was cut from), or a teacher behind a vLLM server
(`teacher.engine.backend: openai`), which scores the tokens by prefill alone. Its privileged context is here the
teacher's whole conversation for the same example, not a note appended to the student's prompt. A replay row
(general chat) keeps its own prompt on both sides: there the teacher is the untuned model as it was, which pulls
the student back toward its general behaviour.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from pipeline.chat_templates import end_of_turn_id
from pipeline.config import EngineConfig, ExperimentConfig
from pipeline.console import PipelineError
from pipeline.files import read_jsonl
from pipeline.models import resolve_model
from pipeline.tasks import Task

# Text whose tokens show whether a served teacher shares the student's tokenizer: words, digits, accents, a symbol;
# the student's added tokens (its chat markers) are appended to it.
TOKENIZER_CHECK_TEXT = "Order #12345: the café's naïve refund — 3.5 days, not 40!"


def teacher_server(config: ExperimentConfig) -> EngineConfig | None:
    """The teacher's server when the teacher runs behind one (teacher.engine.backend openai): it then scores."""
    engine = config.teacher.engine
    return engine if engine.backend == "openai" else None


def separate_teacher(config: ExperimentConfig, model_path: str) -> str | None:
    """The local teacher's folder when it is not the student's own model, else None: the base weights with the
    adapter off, or a teacher behind a server (`teacher_server`)."""
    if teacher_server(config) is not None:
        return None
    teacher_path = resolve_model(config.teacher.model)
    return None if Path(teacher_path).resolve() == Path(model_path).resolve() else teacher_path


def check_on_policy(config: ExperimentConfig, model_path: str) -> None:
    """The teacher placements this objective supports, in one line each. The student's own model as the teacher is
    its base weights with the adapter disabled, so it needs an adapter. A separate teacher, local or served, must share
    the student's tokenizer; a larger embedding (a vocabulary padded to a multiple) is fine: the shared rows are
    compared."""
    train = config.train
    server = teacher_server(config)
    separate = separate_teacher(config, model_path)
    if train.method == "full" and not separate and server is None:
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
    if server is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        text = " ".join([TOKENIZER_CHECK_TEXT, *sorted(tokenizer.get_added_vocab())])  # chat markers, added tokens
        served = ServerTeacher(config, server).engine.tokenize(text)
        own = tokenizer(text, add_special_tokens=False)["input_ids"]
        if served != own:
            raise PipelineError(
                "train.objective: on_policy needs teacher and student to share a tokenizer; the teacher served at "
                f"{server.server.base_url} splits a test sentence into other tokens ({len(served)} against the "
                f"student's {len(own)}): use sft"
            )


class ServerTeacher:
    """A teacher behind a vLLM server. It scores the teacher's input (its prompt and the student's answer) by prefill
    alone and returns its top `train.on_policy.server_top_k` log-probabilities at each answer token. The rest of the
    vocabulary shares what those leave, evenly, so the divergence stays finite."""

    def __init__(self, config: ExperimentConfig, engine: EngineConfig) -> None:
        from pipeline.engines import model_for
        from pipeline.engines.openai_engine import OpenAIEngine

        self.engine = OpenAIEngine(model_for(config.teacher.model, engine), engine, config.seed)
        self.top_k = config.train.on_policy.server_top_k

    def log_probs(self, input_ids: Any, attention_mask: Any, answer_length: int, vocab: int) -> Any:
        """(batch, answer_length, vocab) log-probabilities of the teacher's next token at each answer position.
        `input_ids` end in the answers, `answer_length` columns, right-padded; the prompts before them left-padded."""
        import torch

        sequences, starts, lengths = [], [], []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            sequences.append([token for token, keep in zip(ids, mask, strict=True) if keep])
            lengths.append(sum(mask[-answer_length:]))
            starts.append(len(sequences[-1]) - lengths[-1])
        scored = self.engine.prompt_logprobs(sequences, self.top_k)
        out = torch.full((len(sequences), answer_length, vocab), -math.log(vocab))  # padding: masked out of the loss
        for row, (positions, start, length) in enumerate(zip(scored, starts, lengths, strict=True)):
            for column in range(length):
                known = {token: lp for token, lp in positions[start + column].items() if token < vocab}
                left = max(1.0 - sum(math.exp(lp) for lp in known.values()), 1e-9)
                out[row, column] = math.log(left / max(vocab - len(known), 1))
                out[row, column, list(known)] = torch.tensor(list(known.values()))
        return out


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
    rows: list[dict[str, Any]],
    output_dir: Path,
    *,
    processing_class: Any,
    peft_config: Any,
    args: dict[str, Any],
) -> Any:
    """TRL's self-distillation trainer with the teacher's conversation as its context, on `rows`
    (`on_policy_rows`). The teacher is a separate local model (`separate_teacher`), a server (`teacher_server`), or
    else the student's base weights. `args`: the run's shared training arguments (learning rate, steps, device,
    logging)."""
    import os

    from datasets import Dataset

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # known to be experimental: the docs say so
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    settings = config.train.on_policy
    teacher_path = separate_teacher(config, model_path)
    server = teacher_server(config)
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
            if server is not None:
                self.teacher_model = ServerTeacher(config, server)
                return
            if teacher_path is None:
                super()._setup_teacher_model()
                return
            from transformers import AutoModelForCausalLM

            teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=self.model.dtype)
            teacher.requires_grad_(False)
            self.teacher_model = self.accelerator.prepare_model(teacher.eval(), evaluation_mode=True)

        def _get_teacher_context_for_self_distillation(self) -> Any:
            from contextlib import nullcontext

            # A separate or served teacher is its own model: no adapter of the student's to switch off.
            own = teacher_path is not None or server is not None
            return nullcontext() if own else super()._get_teacher_context_for_self_distillation()

        def _forward_logits(self, model: Any, input_ids: Any, attention_mask: Any, logits_to_keep: int) -> Any:
            if not isinstance(model, ServerTeacher):
                return super()._forward_logits(model, input_ids, attention_mask, logits_to_keep)
            vocab = self.accelerator.unwrap_model(self.model).get_output_embeddings().weight.size(0)
            scored = model.log_probs(input_ids, attention_mask, logits_to_keep, vocab)
            return scored.to(input_ids.device) / self.temperature  # as TRL scales a local teacher's logits

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
