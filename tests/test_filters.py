"""Each filter on hand-written cases: what it drops, and what it keeps."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, FilterConfig, validate_config
from pipeline.filter.filters import DatasetFilters, NgramIndex, Sample, SampleFilters, vote
from pipeline.judging import parse_grade
from pipeline.tasks.base import Example
from tests.plugin_task import ParityParams, ParityTask

TASK = ParityTask(ParityParams(), seed=0, base_dir=None)
EVEN = Example("p-2", "Is 2 even or odd?", {"answer": "even"})
SYSTEM = "You judge parity. Reply with one word: even or odd."
PROMPT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": EVEN.user}]


def first_failure(text: str, finish_reason: str = "stop", **settings) -> str | None:
    config = FilterConfig(**settings)
    filters = SampleFilters(config, TASK)
    failed = filters.check(Sample("p-2", 0, text, finish_reason, 3, len(text.split())), EVEN, PROMPT)
    return failed[0] if failed else None


@pytest.mark.parametrize(
    ("text", "finish_reason", "settings", "dropped_by"),
    [
        ("even", "stop", {}, None),
        ("   \n", "stop", {}, "empty"),
        ("even and then some", "length", {}, "truncated"),
        ("even and then some", "length", {"truncated": {"enabled": False}}, None),
        ("even " + "word " * 30, "stop", {"length": {"max_tokens": 10}}, "length"),
        ("even", "stop", {"length": {"min_tokens": 2}}, "length"),
        ("even, it is even, it is even, it is even, it is even", "stop", {}, "repetition"),
        ("the number is even so the answer is even", "stop", {}, None),  # a repeated word is not a loop
        ("As an AI language model I think even", "stop", {}, "refusal"),
        ("even", "stop", {"refusal": {"phrases": ["even"]}}, "refusal"),
        (f"{SYSTEM} even", "stop", {}, "prompt_echo"),
        ("Is 2 even or odd? even", "stop", {}, None),  # prompts under min_chars are not checked
        ("Is 2 even or odd? even", "stop", {"prompt_echo": {"min_chars": 5}}, "prompt_echo"),
        ("odd", "stop", {}, "correctness"),
        ("odd", "stop", {"correctness": {"enabled": False}}, None),
        ("even", "stop", {"regex": {"enabled": True, "require": [r"^\w+$"]}}, None),
        ("even!", "stop", {"regex": {"enabled": True, "require": [r"^\w+$"]}}, "regex"),
        ("even, trust me", "stop", {"regex": {"enabled": True, "forbid": ["trust me"]}}, "regex"),
    ],
)
def test_sample_filters(text, finish_reason, settings, dropped_by):
    assert first_failure(text, finish_reason, **settings) == dropped_by


SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["even", "odd"]}},
    "required": ["answer"],
}


@pytest.mark.parametrize(
    ("text", "dropped"),
    [
        ('{"answer": "even"}', False),
        ('```json\n{"answer": "even"}\n```', False),  # one code fence is allowed
        ('{"answer": "maybe"}', True),
        ('{"reply": "even"}', True),
        ("even", True),
        ('{"answer": "even"', True),
    ],
)
def test_json_schema_filter(text, dropped):
    settings = {"json_schema": {"enabled": True, "schema": SCHEMA}, "correctness": {"enabled": False}}
    assert first_failure(text, **settings) == ("json_schema" if dropped else None)


def test_order_is_declared_and_a_filter_left_out_does_not_run():
    # "odd" fails correctness; with correctness left out of `order` it passes.
    assert first_failure("odd", order=["empty", "truncated"]) is None
    # Both regex and correctness would drop it; the first in the declared order names the drop.
    regex = {"enabled": True, "forbid": ["o"]}
    assert first_failure("odd", regex=regex, order=["regex", "correctness"]) == "regex"
    assert first_failure("odd", regex=regex, order=["correctness", "regex"]) == "correctness"


def test_bad_filter_config_names_the_key(tmp_path):
    from tests.conftest import tiny_config

    def error(filter_settings):
        raw = tiny_config(tmp_path, tmp_path)
        raw["filter"] = filter_settings
        with pytest.raises(ConfigError) as info:
            validate_config(raw)
        return str(info.value)

    assert "filter.json_schema.schema" in error({"json_schema": {"schema": {"type": "nonsense"}}})
    assert "filter.regex.require" in error({"regex": {"require": ["(unclosed"]}})
    assert "filter.order" in error({"order": ["exact_dedup", "empty"]})
    assert "filter.order" in error({"order": ["judge", "exact_dedup"]})
    assert "filter.order" in error({"order": ["spellcheck"]})
    assert "filter.near_dedup.threshold" in error({"near_dedup": {"threshold": 2}})
    assert "\n" not in error({"json_schema": {"schema": {"type": "nonsense"}}})


def samples(*texts: str) -> list[Sample]:
    return [Sample("p", i, t) for i, t in enumerate(texts)]


def test_agreement_with_a_verifier_is_the_verified_share():
    config = FilterConfig(agreement={"min_agreement": 0.5})
    kept, dropped = vote(TASK, config, samples("even", "even!"), num_samples=4)  # 2 of 4 verified
    assert [s.index for s in kept] == [0] and kept[0].scores["agreement"] == 0.5
    assert [d[0].index for d in dropped] == [1]  # keep=best: the second is surplus
    kept, dropped = vote(TASK, config, samples("even"), num_samples=4)  # 1 of 4 < 0.5
    assert kept == [] and len(dropped) == 1 and "1/4" in dropped[0][1]


def test_agreement_without_a_verifier_is_a_majority_vote():
    config = FilterConfig(correctness={"enabled": False}, agreement={"keep": "all_distinct", "min_agreement": 0.5})
    kept, dropped = vote(TASK, config, samples("Even.", "odd", "even", "EVEN"), num_samples=4)
    assert [s.text for s in kept] == ["Even."]  # "Even.", "even" and "EVEN" normalise alike: one distinct
    assert {d[0].text: d[1] for d in dropped}["odd"] == "outvoted by the majority answer"
    config = FilterConfig(correctness={"enabled": False}, agreement={"keep": "all_distinct"})
    kept, _ = vote(TASK, config, samples("it is even", "even", "odd"), num_samples=3)
    assert [s.text for s in kept] == ["it is even"]  # a 1-1-1 tie: the first answer wins, alone


def test_all_distinct_keeps_every_distinct_verified_sample():
    config = FilterConfig(agreement={"keep": "all_distinct", "max_per_prompt": 2})
    kept, dropped = vote(TASK, config, samples("even", "Even", "it is even", "even, yes"), num_samples=4)
    assert [s.text for s in kept] == ["even", "it is even"]
    assert len(dropped) == 2


def test_exact_dedup_on_normalised_text():
    filters = DatasetFilters(FilterConfig(near_dedup={"enabled": False}), protected=[])
    a = Example("a", "Is 2 even or odd?")
    assert filters.check(a, Sample("a", 0, "Even.")) is None
    assert filters.check(Example("b", "is 2  EVEN or odd"), Sample("b", 0, "even"))[0] == "exact_dedup"
    assert filters.check(Example("c", "Is 2 even or odd?"), Sample("c", 0, "odd")) is None  # other answer


def test_near_dedup_on_prompts_and_responses():
    config = FilterConfig(near_dedup={"threshold": 0.6, "fields": ["prompt", "response"]})
    filters = DatasetFilters(config, protected=[])
    ticket = "my parcel from the spring sale has not arrived after two weeks and the tracking page shows nothing"
    reply = "Standard shipping takes three to five business days and express shipping takes one to two days"
    assert filters.check(Example("a", ticket), Sample("a", 0, reply)) is None
    reworded = ticket.replace("two weeks", "three weeks")
    assert filters.check(Example("b", reworded), Sample("b", 0, "other words entirely here"))[0] == "near_dedup"
    assert filters.check(Example("c", "a different question about returns"), Sample("c", 0, reply))[0] == "near_dedup"
    assert filters.check(Example("d", "how do refunds for damaged goods work"), Sample("d", 0, "Refunds.")) is None
    # A second kept sample of an already kept prompt is not a near-duplicate of its own prompt.
    assert filters.check(Example("a", ticket), Sample("a", 1, "an unrelated second reply for the same ticket")) is None


TEST_PROMPT = (
    "Hello, I ordered the blue kettle on Monday and the lid arrived cracked in two places, "
    "can I get a replacement sent before the weekend? Thanks, Maria"
)


def test_decontamination_catches_a_lightly_reworded_test_prompt():
    filters = DatasetFilters(FilterConfig(), protected=[("support-test-7", TEST_PROMPT)])
    reworded = TEST_PROMPT.replace("Hello,", "Hi there!").replace("Thanks, Maria", "Best, Tom")
    found = filters.check(Example("x", reworded), Sample("x", 0, "reply"))
    assert found == ("decontaminate", "shares a 13-gram with support-test-7")
    changed_every_tenth_word = " ".join(
        "zzz" if i % 10 == 5 else word for i, word in enumerate(TEST_PROMPT.split())
    )  # no 13 words in a row survive
    assert filters.check(Example("y", changed_every_tenth_word), Sample("y", 0, "reply")) is None
    assert filters.guard(Example("z", TEST_PROMPT.upper())) == "is the protected prompt support-test-7"


def test_decontamination_of_short_protected_prompts():
    index = NgramIndex([("probe:capital-fr", "What is the capital of France?")], n=13)
    assert index.match("Quick one: what is the capital of France? Thanks") == "probe:capital-fr"
    assert index.match("What is the capital of Spain?") is None


def test_judge_score_parsing():
    assert parse_grade("8") == 8
    assert parse_grade("Score: 10/10") == 10
    assert parse_grade("I would say 7.") == 7
    assert parse_grade("great reply") is None


def test_ngram_index_matches_at_any_position_and_single_words():
    index = NgramIndex([("a", "one two three four"), ("b", "Zebra")], n=3)
    assert index.match("x one two three y") == "a"  # a 3-gram of "a", mid-text
    assert index.match("two three four") == "a"  # at the very end
    assert index.match("one two four three") is None
    assert index.match("a zebra crossing") == "b"  # a one-word protected text, mid-text
    assert index.match("zebras") is None
