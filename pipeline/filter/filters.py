"""The filters the filter stage runs over teacher samples, each configured under `filter.<name>`.

Three kinds, run in this order (and, within a kind, in the config's declared order):
- sample filters judge one completion alone (empty, truncated, length, repetition, refusal,
  prompt_echo, json_schema, regex, correctness);
- `agreement` looks at one prompt's n samples together (majority vote or verified share) and
  chooses which survivors to keep;
- dataset filters judge a kept example against everything kept before it (exact_dedup,
  near_dedup, decontaminate) or against a grader (judge, batched, always last).

A filter returns None to keep a sample, or a detail string saying why it dropped it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pipeline.config import SAMPLE_FILTERS, FilterConfig
from pipeline.tasks import Example, Task
from pipeline.tasks.base import normalize_text

_WORD = re.compile(r"\w+")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


# Prompts repeat across the samples of a row, and system prompts across rows: normalise each once.
_squashed = lru_cache(maxsize=4096)(lambda text: " ".join(text.split()))
_normalized = lru_cache(maxsize=4096)(normalize_text)


@dataclass
class Sample:
    """One teacher completion on its way through the filters."""

    prompt_id: str
    index: int  # the teacher's sample index within the prompt
    text: str
    finish_reason: str | None = None
    output_tokens: int | None = None
    length: int = 0  # in the student's tokens when the length filter is on, else in words
    scores: dict[str, Any] = field(default_factory=dict)
    features: dict[str, Any] = field(default_factory=dict)  # what the dataset filters compare (see prepare)


def repeated_ngram_ratio(text: str, n: int) -> float:
    """1 - distinct/total word n-grams: 0 for no repetition, near 1 for a loop."""
    tokens = words(text)
    total = len(tokens) - n + 1
    return 1 - len(set(zip(*(tokens[i:] for i in range(n)), strict=False))) / total if total > 0 else 0.0


def parse_json_output(text: str) -> Any:
    """The completion as JSON, allowing one surrounding ``` fence."""
    fenced = _FENCE.match(text.strip())
    return json.loads(fenced.group(1) if fenced else text)


class SampleFilters:
    """The enabled sample filters, in order; `check` names the first one a sample fails."""

    def __init__(self, config: FilterConfig, task: Task) -> None:
        self.config = config
        self.task = task
        self.names = [n for n in config.active() if n in SAMPLE_FILTERS]
        self.refusals = [p.lower() for p in config.refusal.phrases]
        self.required = [re.compile(p) for p in config.regex.require]
        self.forbidden = [re.compile(p) for p in config.regex.forbid]
        self.validator = None
        if "json_schema" in self.names:
            import jsonschema

            schema = config.json_schema.schema_ or {}
            self.validator = jsonschema.validators.validator_for(schema)(schema)
        self.checks = [(name, getattr(self, f"_{name}")) for name in self.names]  # filter `x` is method `_x`

    def check(self, sample: Sample, example: Example, prompt_messages: list[dict[str, str]]) -> tuple[str, str] | None:
        for name, check in self.checks:
            detail = check(sample, example, prompt_messages)
            if detail is not None:
                return name, detail
        return None

    def _empty(self, sample: Sample, *_: Any) -> str | None:
        return "no text" if not sample.text.strip() else None

    def _truncated(self, sample: Sample, *_: Any) -> str | None:
        if sample.finish_reason == "length":
            return f"hit max_tokens after {sample.output_tokens} tokens"
        return None

    def _length(self, sample: Sample, *_: Any) -> str | None:
        tokens = sample.length
        sample.scores["response_tokens"] = tokens
        bounds = self.config.length
        if not bounds.min_tokens <= tokens <= bounds.max_tokens:
            return f"{tokens} tokens outside [{bounds.min_tokens}, {bounds.max_tokens}]"
        return None

    def _repetition(self, sample: Sample, *_: Any) -> str | None:
        ratio = repeated_ngram_ratio(sample.text, self.config.repetition.ngram)
        if ratio > self.config.repetition.max_ratio:
            return (
                f"repeated {self.config.repetition.ngram}-gram ratio {ratio:.2f} > {self.config.repetition.max_ratio}"
            )
        return None

    def _refusal(self, sample: Sample, *_: Any) -> str | None:
        lowered = sample.text.lower()
        return next((f"contains {p!r}" for p in self.refusals if p in lowered), None)

    def _prompt_echo(self, sample: Sample, example: Example, prompt_messages: list[dict[str, str]]) -> str | None:
        text = " ".join(sample.text.split())
        candidates = [(m["role"], m["content"]) for m in prompt_messages if m["role"] in ("system", "user")]
        candidates.append(("ticket", example.user))
        for role, content in candidates:
            content = _squashed(content)
            if len(content) >= self.config.prompt_echo.min_chars and content in text:
                return f"contains the {role} prompt verbatim"
        return None

    def _json_schema(self, sample: Sample, *_: Any) -> str | None:
        try:
            value = parse_json_output(sample.text)
        except json.JSONDecodeError as exc:
            return f"not JSON: {exc.msg} at char {exc.pos}"
        error = next(iter(self.validator.iter_errors(value)), None) if self.validator else None
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            return f"schema: {where}: {error.message}"
        return None

    def _regex(self, sample: Sample, *_: Any) -> str | None:
        missing = next((p.pattern for p in self.required if not p.search(sample.text)), None)
        if missing is not None:
            return f"required pattern {missing!r} not found"
        found = next((p.pattern for p in self.forbidden if p.search(sample.text)), None)
        return f"forbidden pattern {found!r} found" if found is not None else None

    def _correctness(self, sample: Sample, example: Example, *_: Any) -> str | None:
        rules = self.task.score(sample.text, example)
        sample.scores["rules"] = rules
        failed = [rule for rule, ok in rules.items() if not ok]
        if not failed:
            return None
        read = self.task.read_answer(sample.text, example)
        return ",".join(failed) + (f" ({read})" if read else "")


def vote(
    task: Task, config: FilterConfig, passing: list[Sample], num_samples: int
) -> tuple[list[Sample], list[tuple[Sample, str]]]:
    """Agreement over one prompt's samples: returns (kept, [(dropped, detail)]).

    With the correctness filter on, the passing samples are the verified ones and agreement is their
    share of all n. Without it, the samples vote: the most common answer (by `task.vote_key`) wins
    and agreement is its share.
    """
    settings = config.agreement
    if not passing:
        return [], []
    if "correctness" in config.active():
        winners = passing
    else:
        keys = [task.vote_key(s.text) for s in passing]
        top = Counter(keys).most_common(1)[0][0]
        winners = [s for s, k in zip(passing, keys, strict=True) if k == top]
    agreement = len(winners) / max(1, num_samples)
    losers = [(s, "outvoted by the majority answer") for s in passing if s not in winners]
    if agreement < settings.min_agreement:
        detail = f"{len(winners)}/{num_samples} samples agree < {settings.min_agreement}"
        return [], losers + [(s, detail) for s in winners]
    for sample in winners:
        sample.scores["agreement"] = round(agreement, 4)
    if settings.keep == "best":
        kept = winners[:1]
    else:
        distinct: dict[str, Sample] = {}
        for sample in winners:
            distinct.setdefault(normalize_text(sample.text), sample)
        kept = list(distinct.values())[: settings.max_per_prompt]
    surplus = [(s, f"keep={settings.keep}, another sample of this prompt was kept") for s in winners if s not in kept]
    return kept, losers + surplus


class NgramIndex:
    """Word n-grams of protected texts (benchmark test prompts, probe questions).

    A text shorter than n words is protected as a whole: any prompt containing it matches. Grams are
    bucketed by their first two words, so a lookup costs one dict probe per position of the prompt.
    """

    def __init__(self, texts: Iterable[tuple[str, str]], n: int) -> None:
        self.n = n
        self.buckets: dict[tuple[str, ...], list[tuple[tuple[str, ...], str]]] = {}
        seen: set[tuple[str, ...]] = set()
        for source, text in texts:
            tokens = words(text)
            grams = (
                [tuple(tokens)] if len(tokens) < n else [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
            )
            for gram in grams:
                if gram and gram not in seen:
                    seen.add(gram)
                    self.buckets.setdefault(gram[:2], []).append((gram, source))
        self.has_single_words = any(len(key) == 1 for key in self.buckets)
        self.bigrams = {key for key in self.buckets if len(key) == 2}

    def match(self, text: str) -> str | None:
        tokens = words(text)
        buckets = self.buckets
        singles = self.has_single_words
        if not singles and self.bigrams.isdisjoint(zip(tokens, tokens[1:], strict=False)):
            return None  # the common case, decided without a Python loop
        for i in range(len(tokens)):
            candidates = buckets.get(tuple(tokens[i : i + 2]), [])
            if singles:
                candidates = candidates + buckets.get((tokens[i],), [])
            for gram, source in candidates:
                if tuple(tokens[i : i + len(gram)]) == gram:
                    return source
        return None


class DatasetFilters:
    """Dedup and decontamination against everything kept so far.

    Split in two so the costly half runs in worker processes: `prepare` computes what one sample needs
    from nobody else (its dedup hash, MinHash signatures, the n-gram match of its prompt); `check` then
    compares that with the examples kept before it, in input order, in one process. Memory grows with
    the hashes and signatures of kept rows only.
    """

    def __init__(self, config: FilterConfig, protected: list[tuple[str, str]]) -> None:
        self.config = config
        self.names = [n for n in config.active() if n in ("exact_dedup", "near_dedup", "decontaminate")]
        self.checks = [(name, getattr(self, f"_{name}")) for name in self.names]  # filter `x` is method `_x`
        self.seen: set[bytes] = set()
        self.protected_exact = {normalize_text(text): source for source, text in protected}
        self.index = NgramIndex(protected, config.decontaminate.ngram) if "decontaminate" in self.names else None
        self.lsh: dict[str, Any] = {}
        self.kept_prompts: set[str] = set()
        if "near_dedup" in self.names:
            from datasketch import LeanMinHash, MinHash, MinHashLSH

            self.minhash_classes = (MinHash, LeanMinHash)
            near = config.near_dedup
            self.lsh = {f: MinHashLSH(threshold=near.threshold, num_perm=near.num_perm) for f in near.fields}
        self.last_match: tuple[str | None, str | None] = (None, None)  # (prompt, protected source it matches)

    def guard(self, example: Example) -> str | None:
        """Never switched off: a protected prompt itself (after normalisation) must not reach training."""
        source = self.protected_exact.get(_normalized(example.user))
        return f"is the protected prompt {source}" if source is not None else None

    def prepare(self, example: Example, sample: Sample) -> None:
        """Fill `sample.features` with what `check` compares; needs no other row."""
        features = sample.features
        if "exact_dedup" in self.names:
            features["exact_dedup"] = hashlib.blake2b(
                f"{_normalized(example.user)}\x00{normalize_text(sample.text)}".encode(), digest_size=16
            ).digest()
        if "near_dedup" in self.names:
            features["near_dedup"] = {
                field: self._minhash(example.user if field == "prompt" else sample.text) for field in self.lsh
            }
        if "decontaminate" in self.names:
            if self.last_match[0] != example.user:  # the samples of one row share their prompt
                self.last_match = (example.user, self.index.match(example.user))
            features["decontaminate"] = self.last_match[1]

    def check(self, example: Example, sample: Sample) -> tuple[str, str] | None:
        if not sample.features:
            self.prepare(example, sample)
        for name, check in self.checks:
            detail = check(example, sample)
            if detail is not None:
                return name, detail
        return None

    def _exact_dedup(self, example: Example, sample: Sample) -> str | None:
        key = sample.features["exact_dedup"]
        if key in self.seen:
            return "same prompt and response as an earlier example"
        self.seen.add(key)
        return None

    def _minhash(self, text: str) -> Any:
        size = self.config.near_dedup.shingle
        tokens = words(text)
        shingles = {" ".join(tokens[i : i + size]) for i in range(max(1, len(tokens) - size + 1))}
        minhash, lean = self.minhash_classes
        signature = minhash(num_perm=self.config.near_dedup.num_perm)
        signature.update_batch([s.encode() for s in shingles])
        return lean(signature)  # no permutation arrays: a tenth of the size to send between processes

    def _near_dedup(self, example: Example, sample: Sample) -> str | None:
        signatures = sample.features["near_dedup"]
        pending = []
        for field_name, lsh in self.lsh.items():
            if field_name == "prompt":
                if example.id in self.kept_prompts:  # another kept sample of the same prompt
                    continue
                hits = lsh.query(signatures[field_name])
                if hits:
                    return f"prompt near-duplicates the prompt of {sorted(hits)[0]}"
                pending.append((field_name, lsh, example.id))
            else:
                hits = lsh.query(signatures[field_name])
                if hits:
                    return f"response near-duplicates the response of {sorted(hits)[0].split('#')[0]}"
                pending.append((field_name, lsh, f"{example.id}#{sample.index}"))
        for field_name, lsh, key in pending:  # insert only once the example is kept
            lsh.insert(key, signatures[field_name])
            if field_name == "prompt":
                self.kept_prompts.add(example.id)
        return None

    def _decontaminate(self, example: Example, sample: Sample) -> str | None:
        source = sample.features["decontaminate"]
        if source is not None:
            return f"shares a {self.config.decontaminate.ngram}-gram with {source}"
        return None
