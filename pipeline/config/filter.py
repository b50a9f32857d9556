"""`filter`: which teacher samples become training examples, each filter under its own key."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from pipeline.config.base import StrictModel, check_json_schema


class Toggle(StrictModel):
    enabled: bool = True


class LengthFilter(Toggle):
    """Response length in tokens of the student's tokenizer."""

    min_tokens: int = Field(1, ge=0)
    max_tokens: int = Field(1024, ge=1)


class RepetitionFilter(Toggle):
    """Drop a response whose word n-grams repeat: 1 - distinct/total above `max_ratio`."""

    ngram: int = Field(3, ge=1)
    max_ratio: float = Field(0.5, ge=0, le=1)


DEFAULT_REFUSALS = [
    "as an ai language model",
    "as an ai assistant",
    "i cannot help with",
    "i can't help with",
    "i cannot assist",
    "i can't assist",
    "i am unable to assist",
    "i'm unable to assist",
    "i'm sorry, but i can't",
    "i'm sorry, but i cannot",
]


class RefusalFilter(Toggle):
    phrases: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSALS))  # case-insensitive substrings


class PromptEchoFilter(Toggle):
    """Drop a response that contains the system prompt or the user prompt verbatim (prompts of min_chars+)."""

    min_chars: int = Field(20, ge=1)


class JsonSchemaFilter(Toggle):
    enabled: bool = False
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_json_schema(value)


class RegexFilter(Toggle):
    enabled: bool = False
    require: list[str] = Field(default_factory=list)  # every pattern must match
    forbid: list[str] = Field(default_factory=list)  # no pattern may match

    @field_validator("require", "forbid")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        return patterns


class AgreementFilter(Toggle):
    """Per prompt, over its n samples: majority vote (or the task's scorer) and an agreement threshold."""

    min_agreement: float = Field(0.0, ge=0, le=1)  # share of the n samples that must agree / verify
    keep: Literal["best", "all_distinct"] = "best"
    max_per_prompt: int = Field(4, ge=1)  # with keep: all_distinct


class NearDedupFilter(Toggle):
    """MinHash LSH (datasketch) over word shingles."""

    threshold: float = Field(0.8, gt=0, le=1)  # estimated Jaccard similarity
    num_perm: int = Field(128, ge=16)
    shingle: int = Field(3, ge=1)
    fields: list[Literal["prompt", "response"]] = Field(default_factory=lambda: ["prompt"])


class DecontaminateFilter(Toggle):
    """Drop training rows whose prompt shares an n-gram with a benchmark test prompt or a probe question."""

    ngram: int = Field(13, ge=1)
    probe: bool = True


class JudgeFilter(Toggle):
    """The teacher grades each kept example against a rubric, 1 to 10."""

    enabled: bool = False
    rubric: str | None = None  # None: the task's rubric (Task.rubric()), else a generic one
    threshold: int = Field(7, ge=1, le=10)
    batch_size: int = Field(64, ge=1)


SAMPLE_FILTERS = (
    "empty",
    "truncated",
    "length",
    "repetition",
    "refusal",
    "prompt_echo",
    "json_schema",
    "regex",
    "correctness",
)


DATASET_FILTERS = ("exact_dedup", "near_dedup", "decontaminate", "judge")


DEFAULT_FILTER_ORDER = [*SAMPLE_FILTERS, "agreement", *DATASET_FILTERS]


class FilterConfig(StrictModel):
    """Filters run in `order`; each has `enabled`. Sample filters come first, then the per-prompt
    agreement vote, then the dataset filters (which see every kept example so far)."""

    val_fraction: float = Field(0.1, ge=0, lt=1)
    # Fewer kept training examples stop the run here, naming the filter that dropped the most and the key that
    # fixes it, instead of training and benchmarking on them for an hour. 32 is four batches at the default batch
    # size; the real data sets that the bundled teacher could not do kept 2 and 3, the embedded default keeps ~430.
    # 0: train on whatever is kept (at least one example).
    min_train_examples: int = Field(32, ge=0)
    on_malformed_line: Literal["skip", "fail"] = "skip"
    # Processes that screen rows (0: in this process; default: one per core for inputs of 2,048+ lines).
    # Outputs are identical for any value.
    workers: int | None = Field(None, ge=0)
    order: list[str] = Field(default_factory=lambda: list(DEFAULT_FILTER_ORDER))
    empty: Toggle = Field(default_factory=Toggle)
    truncated: Toggle = Field(default_factory=Toggle)
    length: LengthFilter = Field(default_factory=LengthFilter)
    repetition: RepetitionFilter = Field(default_factory=RepetitionFilter)
    refusal: RefusalFilter = Field(default_factory=RefusalFilter)
    prompt_echo: PromptEchoFilter = Field(default_factory=PromptEchoFilter)
    json_schema: JsonSchemaFilter = Field(default_factory=JsonSchemaFilter)
    regex: RegexFilter = Field(default_factory=RegexFilter)
    correctness: Toggle = Field(default_factory=Toggle)  # rejection sampling against the task's scorer
    agreement: AgreementFilter = Field(default_factory=AgreementFilter)
    exact_dedup: Toggle = Field(default_factory=Toggle)
    near_dedup: NearDedupFilter = Field(default_factory=NearDedupFilter)
    decontaminate: DecontaminateFilter = Field(default_factory=DecontaminateFilter)
    judge: JudgeFilter = Field(default_factory=JudgeFilter)

    @field_validator("order")
    @classmethod
    def _grouped(cls, order: list[str]) -> list[str]:
        known = set(DEFAULT_FILTER_ORDER)
        unknown = [name for name in order if name not in known]
        if unknown:
            raise ValueError(f"unknown filter {unknown[0]!r}; known: {', '.join(DEFAULT_FILTER_ORDER)}")
        if len(set(order)) != len(order):
            raise ValueError("a filter is listed twice")
        groups = [0 if n in SAMPLE_FILTERS else 1 if n == "agreement" else 2 for n in order]
        if groups != sorted(groups):
            raise ValueError("sample filters come first, then agreement, then dataset filters")
        if "judge" in order and order[-1] != "judge":
            raise ValueError("judge runs last (it sees only what every other filter kept)")
        return order

    def active(self) -> list[str]:
        """Enabled filters in their declared order; one left out of `order` does not run."""
        return [name for name in self.order if getattr(self, name).enabled]
