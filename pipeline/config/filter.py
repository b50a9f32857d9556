"""`filter`: which teacher samples become training examples, each filter under its own key."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from pipeline.config.base import StrictModel, check_json_schema


class Toggle(StrictModel):
    """A filter with nothing to set but whether it runs."""

    enabled: bool = Field(True, description="Run this filter (when `filter.order` lists it).")


class LengthFilter(Toggle):
    """Response length in tokens of the student's tokenizer."""

    min_tokens: int = Field(1, ge=0, description="Drop a response shorter than this, in the student's tokens.")
    max_tokens: int = Field(1024, ge=1, description="Drop a response longer than this, in the student's tokens.")


class RepetitionFilter(Toggle):
    """Drop a response whose word n-grams repeat: 1 - distinct/total above `max_ratio`."""

    ngram: int = Field(3, ge=1, description="Words per n-gram.")
    max_ratio: float = Field(0.5, ge=0, le=1, description="Most repeated share of n-grams, 1 - distinct/total.")


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
    """Drop a response that refuses: one that contains any of `phrases`."""

    phrases: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFUSALS), description="Refusal phrases, case-insensitive substrings."
    )


class PromptEchoFilter(Toggle):
    """Drop a response that contains the system prompt or the user prompt verbatim (prompts of min_chars+)."""

    min_chars: int = Field(20, ge=1, description="Shortest prompt, in characters, that counts as echoed.")


class JsonSchemaFilter(Toggle):
    """Drop a response that does not parse as JSON (one code fence allowed) or fails `schema`."""

    enabled: bool = Field(False, description="Run this filter (when `filter.order` lists it).")
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="A JSON Schema each response must satisfy; null: any valid JSON."
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_json_schema(value)


class RegexFilter(Toggle):
    """Drop a response that misses a `require` pattern or matches a `forbid` one."""

    enabled: bool = Field(False, description="Run this filter (when `filter.order` lists it).")
    require: list[str] = Field(default_factory=list, description="Regular expressions that must all match.")
    forbid: list[str] = Field(default_factory=list, description="Regular expressions of which none may match.")

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

    min_agreement: float = Field(
        0.0, ge=0, le=1, description="Share of a prompt's n samples that must verify (or agree) to keep any."
    )
    keep: Literal["best", "all_distinct"] = Field(
        "best", description="Keep the best (first) passing sample, or all distinct ones."
    )
    max_per_prompt: int = Field(4, ge=1, description="With keep all_distinct: most samples kept per prompt.")


class NearDedupFilter(Toggle):
    """MinHash LSH (datasketch) over word shingles."""

    threshold: float = Field(0.8, gt=0, le=1, description="Estimated Jaccard similarity at which rows are duplicates.")
    num_perm: int = Field(128, ge=16, description="MinHash permutations: more is more exact and slower.")
    shingle: int = Field(3, ge=1, description="Words per shingle.")
    fields: list[Literal["prompt", "response"]] = Field(
        default_factory=lambda: ["prompt"], description="What is compared: the prompt, the response, or both."
    )


class DecontaminateFilter(Toggle):
    """Drop training rows whose prompt shares an n-gram with a benchmark test prompt or a probe question."""

    ngram: int = Field(13, ge=1, description="Words per n-gram; a prompt shorter than this counts as a whole.")
    probe: bool = Field(True, description="Also drop rows that share an n-gram with a forgetting-probe question.")


class JudgeFilter(Toggle):
    """The teacher grades each kept example against a rubric, 1 to 10."""

    enabled: bool = Field(False, description="Run this filter (when `filter.order` lists it).")
    rubric: str | None = Field(
        None, description="What a good answer is; null: the task's rubric (Task.rubric()), else a generic one."
    )
    threshold: int = Field(7, ge=1, le=10, description="Lowest grade kept; an unreadable grade drops the row.")
    batch_size: int = Field(64, ge=1, description="Examples sent to the judge at once.")


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

    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of the kept examples held out as val.jsonl.")
    # Stopping here saves training and benchmarking on nothing for an hour. 32 is four batches at the default batch
    # size; the real data sets the bundled teacher could not do kept 2 and 3, the embedded default keeps ~430.
    min_train_examples: int = Field(
        32,
        ge=0,
        description="Fewer kept training examples stop the run here, naming the filter that dropped the most and "
        "the key that fixes it; 0: train on whatever is kept.",
    )
    on_malformed_line: Literal["skip", "fail"] = Field(
        "skip", description="A malformed teacher-output line: skip it (reported with its number) or fail."
    )
    # Outputs are identical for any value.
    workers: int | None = Field(
        None,
        ge=0,
        description="Processes that screen rows; 0: this process; null: one per core, up to 8, for 2,048+ lines.",
    )
    order: list[str] = Field(
        default_factory=lambda: list(DEFAULT_FILTER_ORDER),
        description="The filters that run, in order; one left out does not run.",
    )
    empty: Toggle = Field(default_factory=Toggle, description="Drop a whitespace-only response.")
    truncated: Toggle = Field(default_factory=Toggle, description="Drop a response cut at max_tokens.")
    length: LengthFilter = Field(default_factory=LengthFilter, description="Drop a response outside a token range.")
    repetition: RepetitionFilter = Field(
        default_factory=RepetitionFilter, description="Drop a response whose word n-grams repeat."
    )
    refusal: RefusalFilter = Field(default_factory=RefusalFilter, description="Drop a refusal.")
    prompt_echo: PromptEchoFilter = Field(
        default_factory=PromptEchoFilter, description="Drop a response that repeats its prompt verbatim."
    )
    json_schema: JsonSchemaFilter = Field(
        default_factory=JsonSchemaFilter, description="Drop a response that is not valid JSON for a schema."
    )
    regex: RegexFilter = Field(default_factory=RegexFilter, description="Drop a response by regular expressions.")
    correctness: Toggle = Field(
        default_factory=Toggle, description="Rejection sampling: drop a response that fails the task's scorer."
    )
    agreement: AgreementFilter = Field(
        default_factory=AgreementFilter, description="Per prompt: the share of samples that must verify or agree."
    )
    exact_dedup: Toggle = Field(
        default_factory=Toggle, description="Drop the same normalised prompt and response as an earlier example."
    )
    near_dedup: NearDedupFilter = Field(default_factory=NearDedupFilter, description="Drop near-duplicates (MinHash).")
    decontaminate: DecontaminateFilter = Field(
        default_factory=DecontaminateFilter, description="Drop rows that overlap the test split or the probe."
    )
    judge: JudgeFilter = Field(default_factory=JudgeFilter, description="A model grades each kept example.")

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
