"""Batched, left-padded `generate` from transformers, for machines where neither vLLM build installs."""

from __future__ import annotations

from typing import Any

from pipeline.chat_templates import chat_template_for, eos_ids_with, stop_token_ids
from pipeline.config import EngineConfig, SamplingConfig
from pipeline.console import PipelineError
from pipeline.engines.base import Completion, Conversation, Engine, Generation, progress_label
from pipeline.hardware import attention_without_cudnn, release_memory


class TransformersEngine(Engine):
    """Batched, left-padded `generate`; slower than vLLM, but runs wherever transformers does."""

    def __init__(self, model: str, config: EngineConfig, seed: int, adapter: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = model
        self.config = config
        self.seed = seed
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float32 if config.dtype in ("auto", "float32") and self.device == "cpu" else config.dtype
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.chat_template = chat_template_for(self.tokenizer, config.chat_template, model)
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.chat_template)
        self.lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype if dtype != "auto" else "auto").to(
            self.device
        )
        if adapter:  # unmerged: the LoRA matrices run beside the base weights at every step
            from peft import PeftModel

            self.lm = PeftModel.from_pretrained(self.lm, adapter)
        self.lm.eval()

    def generate(
        self, conversations: list[Conversation], sampling: SamplingConfig, progress: bool | str = True
    ) -> list[Generation]:
        import torch
        from tqdm.auto import tqdm

        unsupported = [k for k in ("logprobs", "json_schema") if getattr(sampling, k) is not None] + list(
            sampling.extra
        )
        if unsupported:
            raise PipelineError(f"sampling.{unsupported[0]}: not supported by the transformers backend; use vllm")
        torch.manual_seed(sampling.seed if sampling.seed is not None else self.seed)
        eos_ids = self._eos_ids()
        allowed = self._choice_constraint(sampling.choices, eos_ids) if sampling.choices else None
        results: list[Generation] = []
        batches = range(0, len(conversations), self.config.batch_size)
        label = progress_label(progress, "generate (transformers)")
        for start in tqdm(batches, desc=label, unit="batch", disable=not progress):
            batch = conversations[start : start + self.config.batch_size]
            texts = [
                self.tokenizer.apply_chat_template(
                    c, tokenize=False, add_generation_prompt=True, chat_template=self.chat_template
                )
                for c in batch
            ]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            do_sample = sampling.temperature > 0
            with torch.no_grad(), attention_without_cudnn(self.device):
                out = self.lm.generate(
                    **enc,
                    max_new_tokens=sampling.max_tokens,
                    do_sample=do_sample,
                    temperature=sampling.temperature if do_sample else None,
                    top_p=sampling.top_p if do_sample else None,
                    top_k=None,
                    num_return_sequences=sampling.n,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=eos_ids,
                    stop_strings=sampling.stop or None,
                    tokenizer=self.tokenizer if sampling.stop else None,
                    prefix_allowed_tokens_fn=allowed(enc["input_ids"].shape[1]) if allowed else None,
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            for i in range(len(batch)):
                prompt_tokens = int(enc["attention_mask"][i].sum())
                completions = []
                for j in range(sampling.n):
                    ids = new_tokens[i * sampling.n + j].tolist()
                    stop_at = next((k for k, t in enumerate(ids) if t in eos_ids), None)
                    kept = ids if stop_at is None else ids[:stop_at]
                    while kept and kept[-1] == self.tokenizer.pad_token_id:  # after a stop string
                        kept.pop()
                    finish = "stop" if stop_at is not None else "length"
                    text = self.tokenizer.decode(kept, skip_special_tokens=True)
                    cut = min((i for i in (text.find(stop) for stop in sampling.stop) if i >= 0), default=-1)
                    if cut >= 0:  # as vLLM does: the stop string ends the output and is not part of it
                        text, finish = text[:cut], "stop"
                    completions.append(Completion(text, finish, len(kept) + (stop_at is not None)))
                results.append(Generation(completions, prompt_tokens))
        return results

    def _choice_constraint(self, choices: list[str], eos_ids: list[int]) -> Any:
        """Allowed next tokens for answers that must be one of `choices`: a trie of each choice's tokens,
        ended by EOS. Returns a factory taking the prompt length (left-padded, the same for a whole batch)
        and giving `generate`'s `prefix_allowed_tokens_fn`."""
        end = eos_ids[0]
        trie: dict[tuple[int, ...], set[int]] = {}
        for choice in choices:
            ids = tuple(self.tokenizer.encode(choice, add_special_tokens=False))
            for k in range(len(ids) + 1):
                trie.setdefault(ids[:k], set()).add(ids[k] if k < len(ids) else end)
        table = {prefix: sorted(tokens) for prefix, tokens in trie.items()}

        def for_prompt(prompt_length: int) -> Any:
            def allowed(_row: int, ids: Any) -> list[int]:
                # A finished row (past EOS, then padding) is no prefix: EOS keeps it finished.
                return table.get(tuple(ids[prompt_length:].tolist()), [end])

            return allowed

        return for_prompt

    def _eos_ids(self) -> list[int]:
        return eos_ids_with(self.lm.generation_config.eos_token_id, self.tokenizer.eos_token_id, *self.stop_token_ids)

    def close(self) -> None:
        del self.lm
        release_memory()
