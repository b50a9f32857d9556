"""Logit distillation for the train stage (`train.objective: kd`): the student matches the teacher's
next-token distribution, not only its sampled tokens.

Generate stores, per output token, the teacher's top-k (token id, logprob) pairs (`teacher.sampling.logprobs`).
The loss on each completion token is

    (1 - alpha) * cross-entropy(teacher's token) + alpha * T^2 * KL(teacher top-k || student)

with the teacher's top-k renormalised into a distribution and the student's log-probabilities taken over its
whole vocabulary at temperature T (the usual top-k approximation of the full KL). Token ids only mean the same
thing when teacher and student share a tokenizer: a different vocabulary is an error, never a silently wrong
loss. The student trains on its own tokenization of the kept answer, which can split a word differently
from the tokens the teacher sampled (or lose a leading space the filter stripped): teacher targets go only to
student tokens that are the same token at the same byte offset, and the other tokens keep plain cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.console import PipelineError
from pipeline.files import read_jsonl
from pipeline.train.stage_trainer import StageTrainer

KD_COLUMNS = ("kd_token_ids", "kd_top_ids", "kd_top_logprobs", "kd_offset")


def check_same_tokenizer(teacher: str, student: str, objective: str = "kd") -> None:
    """Refuse logit distillation between models whose token ids mean different things."""
    from transformers import AutoTokenizer

    teacher_vocab = AutoTokenizer.from_pretrained(teacher).get_vocab()
    student_vocab = AutoTokenizer.from_pretrained(student).get_vocab()
    if teacher_vocab != student_vocab:
        differing = len(set(teacher_vocab.items()) ^ set(student_vocab.items()))
        raise PipelineError(
            f"train.objective: {objective} needs teacher and student to share a tokenizer; their vocabularies differ "
            f"({len(teacher_vocab)} vs {len(student_vocab)} tokens, {differing} entries differ): use sft"
        )


def attach_teacher_logprobs(rows: list[dict[str, Any]], teacher_outputs: Path) -> list[dict[str, Any]]:
    """Add each kept example's teacher token ids and top-k logprobs (matched by prompt id and sample index)."""
    wanted = {(row["prompt_id"], row.get("sample_index", 0)) for row in rows if "prompt_id" in row}
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for output in read_jsonl(teacher_outputs):
        for index, completion in enumerate(output.get("completions", [])):
            key = (output["prompt_id"], index)
            if key in wanted:
                found[key] = completion
    for row in rows:
        completion = found.get((row.get("prompt_id"), row.get("sample_index", 0)))
        if completion is None or "top_logprobs" not in completion:
            raise PipelineError(
                "train.objective: kd needs the teacher's logprobs; generate with teacher.sampling.logprobs set "
                f"(none stored for {row.get('prompt_id', '?')} in {teacher_outputs})"
            )
        content, text = row["messages"][-1]["content"], completion["text"]
        steps = completion["top_logprobs"]
        if any(not isinstance(token, int) for step in steps for token, _ in step):
            raise PipelineError(f"{teacher_outputs}: top_logprobs hold token strings, not ids; use the vllm backend")
        # Offsets count from the kept text: what the filter stripped off the teacher's text comes first.
        row["kd_offset"] = len((text[: len(text) - len(text.lstrip())]).encode())
        row["kd_token_ids"] = completion["token_ids"] if content == text.strip() else []  # edited: CE only
        row["kd_top_ids"] = [[token for token, _ in step] for step in steps]
        row["kd_top_logprobs"] = [[logprob for _, logprob in step] for step in steps]
    return rows


@dataclass
class KDCollator:
    """TRL's collator, plus per-position teacher targets aligned to the completion tokens of each row."""

    base: Any
    tokenizer: Any

    def _byte_lengths(self, ids: list[int]) -> list[int]:
        """Bytes each token spans: its byte-level BPE string has one character per byte."""
        return [len(token) for token in self.tokenizer.convert_ids_to_tokens(ids)]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self.base([{k: v for k, v in ex.items() if k not in KD_COLUMNS} for ex in examples])
        labels = batch["labels"]
        width = max((len(step) for ex in examples for step in ex["kd_top_ids"]), default=1)
        ids = torch.zeros(*labels.shape, width, dtype=torch.long)
        logprobs = torch.full((*labels.shape, width), float("-inf"))
        mask = torch.zeros(labels.shape, dtype=torch.bool)
        for row, ex in enumerate(examples):
            # (byte offset, token id) of every teacher token, offsets counted from the start of the kept text.
            teacher, teacher_at, offset = ex["kd_token_ids"], {}, -ex["kd_offset"]
            for index, (token, length) in enumerate(zip(teacher, self._byte_lengths(teacher), strict=True)):
                teacher_at[(offset, token)] = index
                offset += length
            positions = (labels[row] != -100).nonzero().flatten().tolist()
            student = labels[row, positions].tolist()
            offset = 0
            for position, token, length in zip(positions, student, self._byte_lengths(student), strict=True):
                index = teacher_at.get((offset, token))
                offset += length
                if index is None:  # a token the teacher did not produce here: cross-entropy only
                    continue
                top = ex["kd_top_ids"][index]
                ids[row, position, : len(top)] = torch.tensor(top)
                logprobs[row, position, : len(top)] = torch.tensor(ex["kd_top_logprobs"][index])
                mask[row, position] = True
        batch.update(kd_ids=ids, kd_logprobs=logprobs, kd_mask=mask)
        return batch


def kd_kl_sum(logits, kd_ids, kd_logprobs, kd_mask, temperature: float):
    """Sum over distilled positions of KL(teacher top-k || student) at temperature T, times T^2."""
    import torch

    # Position t's logits predict the token at t + 1: targets are shifted by one, as for the labels.
    logits, kd_ids, kd_logprobs, kd_mask = logits[:, :-1], kd_ids[:, 1:], kd_logprobs[:, 1:], kd_mask[:, 1:]
    if not kd_mask.any():
        return logits.sum() * 0.0
    student = torch.log_softmax(logits[kd_mask].float() / temperature, dim=-1).gather(-1, kd_ids[kd_mask])
    teacher = torch.log_softmax(kd_logprobs[kd_mask] / temperature, dim=-1)  # top-k renormalised
    kl = torch.where(torch.isfinite(teacher), teacher.exp() * (teacher - student), torch.zeros_like(student))
    return kl.sum() * temperature**2


def kd_trainer_class():
    """SFTTrainer whose loss mixes cross-entropy with the KD term (a class built lazily: TRL is heavy).

    TRL's own loss uses a fused LM head that never builds the logits; KD needs them, so the loss is computed
    here from one ordinary forward pass: token-level cross-entropy on the completion (as TRL's) and the KL on
    the distilled positions, both summed and divided by the batch's completion tokens."""
    import torch
    from trl import SFTTrainer

    class KDTrainer(StageTrainer, SFTTrainer):
        def __init__(self, *args: Any, kd_alpha: float, kd_temperature: float, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.kd_alpha, self.kd_temperature = kd_alpha, kd_temperature
            self.data_collator = KDCollator(self.data_collator, self.processing_class)

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, *KD_COLUMNS]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if model.training else "eval"
            targets = [inputs.pop(key) for key in ("kd_ids", "kd_logprobs", "kd_mask")]
            labels = inputs.pop("labels")
            outputs = model(**inputs, use_cache=False)
            logits = outputs.logits
            tokens = (labels[:, 1:] != -100).sum() if num_items_in_batch is None else num_items_in_batch
            ce_sum = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
            )
            kl_sum = kd_kl_sum(logits, *targets, self.kd_temperature)
            scale = torch.as_tensor(tokens, device=logits.device).clamp(min=1)
            loss = ((1 - self.kd_alpha) * ce_sum + self.kd_alpha * kl_sum) / scale
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL: DDP averages gradients across ranks
            distilled = targets[2][:, 1:].sum().clamp(min=1)
            self._metrics[mode]["kd_kl"].append(float(kl_sum.detach() / distilled))
            self._metrics[mode]["kd_token_share"].append(float(distilled / (labels[:, 1:] != -100).sum().clamp(min=1)))
            if mode == "train":
                self.count_tokens(inputs)
            return (loss, outputs) if return_outputs else loss

    return KDTrainer
