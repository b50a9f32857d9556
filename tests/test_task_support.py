"""The Acme support task: deterministic disjoint splits, retrieval, and a scorer that fails the right rule."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.tasks import TaskError, build_task
from pipeline.tasks.support import ESCALATION, NO_ARTICLE, SHORT_PROMPT, SupportTask, load_kb


def make(seed: int = 1, **params) -> SupportTask:
    task = build_task("support", {"num_train": 120, "num_test": 40, **params}, seed=seed, base_dir=Path("."))
    assert isinstance(task, SupportTask)
    return task


def test_kb_has_at_least_30_articles_with_unique_ids():
    kb = load_kb()
    ids = [a["id"] for a in kb]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"KB-1\d{3}", i) for i in ids)
    assert [a["answer"] for a in kb if a["id"] == "KB-1034"] == [ESCALATION]  # retrieval surfaces the policy
    assert all(4 <= len(a["issues"]) <= 8 and a["answer"] for a in kb if a["id"] != "KB-1034")


def test_other_ticket_mixes_and_invalid_mixes():
    task = make(dispute_fraction=0.5, no_article_fraction=0.0, num_train=40, num_test=10)
    assert Counter(e.category for e in task.split("train")) == {"article": 20, "dispute": 20}
    assert Counter(e.category for e in task.split("test")) == {"article": 5, "dispute": 5}
    assert all(e.reference["article_id"] is None for e in task.split("train") if e.category == "dispute")
    assert task.split("train")[3].id == "support-train-00003"
    with pytest.raises(TaskError, match="at most 1"):
        make(dispute_fraction=0.6, no_article_fraction=0.5)
    with pytest.raises(TaskError, match="split"):
        task.split("validation")


def test_splits_are_deterministic_disjoint_and_balanced():
    a, b, other = make(), make(), make(seed=2)
    assert a.split("train") == b.split("train") and a.split("test") == b.split("test")
    assert a.split("train") != other.split("train")
    train, test = a.split("train"), a.split("test")
    assert len(train) == 120 and len(test) == 40
    assert not {e.user for e in train} & {e.user for e in test}
    assert len({e.user for e in train}) == 120
    kinds = Counter(e.category for e in train)
    assert kinds == {"article": 78, "dispute": 24, "no_article": 18}
    assert len({e.reference["article_id"] for e in train if e.category == "article"}) >= 30  # every article is taught


def test_reference_answers_pass_every_rule():
    task = make()
    for example in task.split("train") + task.split("test"):
        assert all(task.score(task.reference_answer(example), example).values()), example


def _first(task: SupportTask, kind: str):
    return next(e for e in task.split("test") if e.category == kind)


def test_wrong_answers_fail_the_right_rule():
    task = make()
    article, dispute, none = _first(task, "article"), _first(task, "dispute"), _first(task, "no_article")
    good = task.reference_answer(article)
    cases = [
        (good.replace(article.reference["article_id"], "KB-9999"), article, "citation"),  # invented id
        (good.replace(f" [{article.reference['article_id']}]", ""), article, "citation"),  # no citation
        (good + " " + ESCALATION, article, "escalation"),  # escalates needlessly
        ("I'm sorry about this charge.", dispute, "escalation"),  # forgets to escalate
        ("THIS IS NOT OUR PROBLEM. " + ESCALATION, dispute, "tone"),  # shouting
        ("That is a stupid question. " + NO_ARTICLE, none, "tone"),
        (NO_ARTICLE + " See [KB-1001].", none, "citation"),  # cites on no-article
        ("Thank you for asking.", none, "citation"),  # does not say so
        ("", article, "tone"),
    ]
    for text, example, rule in cases:
        result = task.score(text, example)
        assert not result[rule], (text, result)
    assert task.score(ESCALATION.replace("'", "\u2019"), dispute)["escalation"]  # curly apostrophe is fine
    assert task.score("Wow!! " + good, article) == {"tone": False, "escalation": True, "citation": True}
    assert not task.score("You are an idiot. " + ESCALATION, dispute)["tone"]
    # No false alarms: "Hello" is not "hell", KB ids are not shouting, citing the dispute article is fine.
    assert all(task.score("Hello, we are happy to help. " + good, article).values())
    assert all(task.score(f"I'm sorry about this charge. {ESCALATION} See [KB-1034].", dispute).values())
    assert not task.score(f"{ESCALATION} See [KB-4242].", dispute)["citation"]  # invented id on a dispute
    assert all(task.score("Sorry, no article covers that question.", none).values())  # a phrase variant


def test_failure_modes_name_hallucinated_citations():
    """Invented IDs and real-but-wrong articles are counted apart from a missing citation, which is no
    hallucination; the right answer shows neither."""
    task = make()
    article, none = _first(task, "article"), _first(task, "no_article")
    right = article.reference["article_id"]
    other = next(i for i in sorted(task.kb_ids) if i not in (right, "KB-1034"))
    good = task.reference_answer(article)
    assert task.failure_modes(good, article) == {"invented_kb_id": False, "wrong_kb_article": False}
    assert task.failure_modes(good.replace(right, "KB-9999"), article) == {
        "invented_kb_id": True,
        "wrong_kb_article": False,
    }
    assert task.failure_modes(good.replace(right, other), article) == {
        "invented_kb_id": False,
        "wrong_kb_article": True,
    }
    assert task.failure_modes(good.replace(f" [{right}]", ""), article) == {
        "invented_kb_id": False,
        "wrong_kb_article": False,
    }
    # On a ticket no article covers, any real article cited is a wrong one; a dispute may cite any.
    assert task.failure_modes(f"See [{other}].", none) == {"invented_kb_id": False, "wrong_kb_article": True}
    assert task.failure_modes(f"{ESCALATION} See [{other}].", _first(task, "dispute"))["wrong_kb_article"] is False


def test_retrieval_finds_the_article_and_nothing_for_uncovered_questions():
    task = make()
    examples = task.split("train") + task.split("test")
    articles = [e for e in examples if e.category == "article"]
    hits = sum(e.reference["article_id"] in [a["id"] for a in task.retrieve(e.user)] for e in articles)
    assert hits / len(articles) >= 0.95
    uncovered = [e for e in examples if e.category == "no_article"]
    assert sum(not task.retrieve(e.user) for e in uncovered) / len(uncovered) >= 0.9
    disputes = [e for e in examples if e.category == "dispute"]
    assert all(task.retrieve(e.user)[0]["id"] == "KB-1034" for e in disputes)


@pytest.mark.parametrize("top_k", [1, 3])
def test_full_prompt_carries_the_retrieved_article_or_none(top_k: int):
    task = make(kb_top_k=top_k)
    examples = task.split("test") + task.split("train")
    turn = {e.id: task.messages(e, "full")[-1]["content"] for e in examples}
    articles = [e for e in examples if e.category == "article"]
    assert sum(f"[{e.reference['article_id']}]" in turn[e.id] for e in articles) / len(articles) >= 0.9
    assert max(len(re.findall(r"^\[KB-\d+\]", turn[e.id], re.M)) for e in examples) <= top_k
    uncovered = [e for e in examples if e.category == "no_article"]
    assert sum("Retrieved articles: none." in turn[e.id] for e in uncovered) / len(uncovered) >= 0.9
    # An ordinary billing question gets its own article, not the dispute policy.
    card = [e for e in articles if e.reference["article_id"] == "KB-1016"]
    assert card and all(task.retrieve(e.user)[0]["id"] == "KB-1016" for e in card)


def test_prompt_styles():
    task = make(few_shot=4)
    example = _first(task, "article")
    short = task.messages(example, "short")
    full = task.messages(example, "full")
    assert short == [{"role": "system", "content": SHORT_PROMPT}, {"role": "user", "content": example.user}]
    assert "[KB-" not in short[0]["content"]
    assert [m["role"] for m in full] == ["system"] + ["user", "assistant"] * 4 + ["user"]
    assert example.user in full[-1]["content"] and f"[{example.reference['article_id']}]" in full[-1]["content"]
    # The rules + few-shot prefix is shared by every prompt (prefix caching); few-shot tickets are in no split.
    other = task.messages(_first(task, "dispute"), "full")
    assert other[:-1] == full[:-1]
    shots = {m["content"].split("Ticket: ")[-1] for m in full[1:-1] if m["role"] == "user"}
    assert not shots & {e.user for e in task.split("train") + task.split("test")}
    with pytest.raises(TaskError, match="prompt style"):
        task.messages(example, "medium")


def test_leaks_detects_support_behaviour_only():
    task = make()
    assert task.leaks("Thank you for contacting Acme support. See [KB-1001].")
    assert task.leaks(ESCALATION)
    assert task.leaks("Please ask our billing team.") and task.leaks(NO_ARTICLE) and task.leaks("see [KB-1]")
    assert not task.leaks("Paris is the capital of France.")
    assert not task.leaks("Hello! The answer is 42.")


def test_bad_params_name_the_key():
    with pytest.raises(ValidationError, match="bogus_key"):
        SupportTask.Params.model_validate({"bogus_key": 1})
    assert SupportTask.Params().kb_top_k == 3 and SupportTask.Params().few_shot == 4
    with pytest.raises(TaskError, match="task.params.num_tran"):
        build_task("support", {"num_tran": 3}, seed=0, base_dir=Path("."))
    with pytest.raises(TaskError, match="task.name"):
        build_task("nope", {}, seed=0, base_dir=Path("."))


def test_texts_stay_unique_and_disjoint_when_collisions_are_likely():
    # About 50k distinct dispute tickets exist: 3000 + 600 draws collide by chance, so the guard must work.
    task = make(num_train=3000, num_test=600, dispute_fraction=1.0, no_article_fraction=0.0)
    train, test = {e.user for e in task.split("train")}, {e.user for e in task.split("test")}
    assert len(train) == 3000 and len(test) == 600 and not train & test
