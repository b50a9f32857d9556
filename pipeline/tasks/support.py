"""The demo task: the Acme Corp customer-support chatbot of the background note.

Rules, each scored separately (accuracy = all pass):
- tone: calm and professional (no shouting, no "!!", no rude words, not empty);
- escalation: says exactly "I'm connecting you to our billing team." if, and only if, the ticket disputes a charge;
- citation: cites the answering KB article as [KB-1xxx], cites only IDs that exist, and when no article covers
  the question says so and cites nothing.

Prompt styles: "short" is one line (what the student gets); "full" is the teacher's expensive configuration:
the rules, few-shot worked examples as chat turns, and the KB articles retrieved for the ticket with the reply
the top one suggests (last, so that every prompt shares the rules + examples prefix for vLLM's prefix cache);
"retrieved" is the short prompt with the retrieved articles (a tuned student given the context at serving).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.tasks.base import Example, Message, Task, TaskError, TaskParams

KB_PATH = Path(__file__).parent / "data" / "acme_kb.json"
DISPUTE_ARTICLE = "KB-1034"
ESCALATION = "I'm connecting you to our billing team."
NO_ARTICLE = "I'm sorry, no knowledge base article covers this question."
SHORT_PROMPT = "You are a customer support agent for Acme Corp."
CITATION = re.compile(r"\[(KB-\d+)\]")
RUDE = re.compile(r"\b(?:stupid|idiot|dumb|shut up|damn|ridiculous|whatever|hell|crap|moron)\b")  # whole words
SHOUTING = re.compile(r"\b[A-Z]{4,}\b")  # a word in capitals, outside citations
NO_ARTICLE_MARKERS = ("no knowledge base article", "no article covers", "no article that covers", "no kb article")
SUPPORT_SPEAK = ("acme", "billing team", "knowledge base", "contacting us", "support team")
STOPWORDS = set(
    """a an the i my me we you your our is are was were be been it its this that to of for in on at and or
but with can could would should do does did how what when where why who which not no have has had will just so if
from by as am please hi hello thanks thank there any some get got need want help know about up out good morning
afternoon dear team greetings hey regards cheers best kind advance second time writing customer three years tried twice
already bit urgent laptop neighbour same question into won yesterday""".split()
)

OPENERS = [
    "Hi,",
    "Hello,",
    "Good morning,",
    "Hey there,",
    "Good afternoon,",
    "Dear support,",
    "Hi team,",
    "Hello there,",
    "Greetings,",
    "",
]
DETAILS = [
    "",
    "",
    " This is the second time I am writing.",
    " I have been a customer for three years.",
    " I tried twice already.",
    " It is a bit urgent.",
    " I am writing from my laptop.",
    " My neighbour had the same question.",
]
CLOSERS = [
    "Thanks, {name}.",
    "Regards, {name}",
    "Thank you!",
    "Cheers, {name}",
    "Best, {name}",
    "- {name}",
    "Thanks in advance.",
    "Kind regards, {name}",
    "",
]
NAMES = [
    "Maria",
    "Tom",
    "Aisha",
    "Ken",
    "Lucia",
    "Omar",
    "Priya",
    "Jonas",
    "Mei",
    "Carlos",
    "Fatima",
    "Ben",
    "Sofia",
    "Ivan",
    "Grace",
    "Raj",
]
DISPUTES = [
    "I was charged twice for the same purchase",
    "there is a charge on my statement I do not recognize",
    "I was overcharged on my last bill",
    "I want to dispute a charge from last week",
    "you billed me the wrong amount this month",
    "I see an unauthorized charge from Acme",
    "my card was charged after I cancelled",
    "the amount charged is higher than the price I was shown",
]
NOT_COVERED = [
    "can you recommend a good pizza place nearby",
    "what stocks should I invest in this year",
    "do you sell garden furniture",
    "can you help me with my math homework",
    "who won the football match yesterday",
    "are there any job openings at your company",
    "what will the weather be like tomorrow",
    "can I visit your office in Berlin for a tour",
    "do you sponsor local charity events",
    "what is the best recipe for banana bread",
    "could you translate a letter into French for me",
    "which laptop brand do you personally like",
]


class SupportParams(TaskParams):
    """Split sizes, ticket mix, retrieval and few-shot settings of the support task."""

    num_train: int = Field(240, ge=1, description="Training tickets generated.")
    num_test: int = Field(60, ge=1, description="Test tickets generated, none repeating a training ticket.")
    dispute_fraction: float = Field(0.2, ge=0, le=1, description="Share of tickets that dispute a charge.")
    no_article_fraction: float = Field(0.15, ge=0, le=1, description="Share of tickets no article covers.")
    kb_top_k: int = Field(3, ge=1, description="Articles retrieved for a ticket, at most.")
    min_retrieval_score: float = Field(1.5, ge=0, description="The lowest retrieval score an article is shown at.")
    few_shot: int = Field(4, ge=0, le=12, description="Worked tickets in the full prompt, from a held-out pool.")


def _tokens(text: str) -> list[str]:
    """Lowercased content words (stopwords, greetings and filler dropped) for retrieval."""
    return [t for t in re.findall(r"[a-z0-9][a-z0-9-]*", text.lower()) if t not in STOPWORDS]


def article_reply(article: dict[str, Any]) -> str:
    """Title and ID before the answer: the student learns ticket -> title -> ID, a shorter hop than ticket -> ID."""
    return (
        f"Thank you for contacting Acme support. Our article {article['title']} [{article['id']}] answers this: "
        + (article["answer"])
    )


def load_kb() -> list[dict[str, Any]]:
    """The bundled Acme knowledge base: articles with id, title, answer, keywords and ticket issues."""
    return json.loads(KB_PATH.read_text())["articles"]


class SupportTask(Task):
    """Acme Corp support chatbot: tone, billing-dispute escalation and KB citation rules."""

    name = "support"
    Params = SupportParams
    prompt_styles = ("short", "full", "retrieved")

    def __init__(self, params: SupportParams, seed: int, base_dir: Path) -> None:
        super().__init__(params, seed, base_dir)
        if params.dispute_fraction + params.no_article_fraction > 1:
            raise TaskError("task.params: dispute_fraction + no_article_fraction must be at most 1")
        self.kb = load_kb()
        self.kb_ids = {a["id"] for a in self.kb}
        self._by_id = {a["id"]: a for a in self.kb}
        self._index = self._build_index()

    # --- retrieval -------------------------------------------------------------------------------
    def _build_index(self) -> list[Counter[str]]:
        docs = [Counter(_tokens(" ".join([a["title"], *a["keywords"], *a["keywords"], *a["issues"]]))) for a in self.kb]
        df = Counter(t for doc in docs for t in doc)
        self._idf = {t: math.log(1 + len(docs) / n) for t, n in df.items()}
        return docs

    def retrieve(self, text: str) -> list[dict[str, Any]]:
        """Top-k articles by idf-weighted term overlap, best first; none below the score threshold."""
        query = set(_tokens(text))
        scored = []
        for article, doc in zip(self.kb, self._index, strict=True):
            score = sum(self._idf[t] * min(doc[t], 2) for t in query if t in doc)
            if score >= self.params.min_retrieval_score:
                scored.append((score, article["id"]))
        scored.sort(key=lambda s: (-s[0], s[1]))
        return [self._by_id[i] for _, i in scored[: self.params.kb_top_k]]

    # --- data ------------------------------------------------------------------------------------
    def _ticket(self, rng: random.Random, issue: str) -> str:
        """One ticket text: opener, the issue as a sentence, optional detail, sign-off with a name."""
        opener, detail = rng.choice(OPENERS), rng.choice(DETAILS)
        closer = rng.choice(CLOSERS).format(name=rng.choice(NAMES))
        mark = (
            "?"
            if issue.split()[0].lower()
            in {"how", "what", "where", "when", "can", "do", "does", "is", "who", "which", "are", "could", "will"}
            else "."
        )
        body = (issue if opener else issue[0].upper() + issue[1:]) + mark
        return " ".join(part for part in (opener, body + detail, closer) if part)

    def _generate(self, name: str, count: int, exclude: set[str]) -> list[Example]:
        """`count` tickets of the configured kind mix, none of whose texts is in `exclude` or repeats."""
        rng = random.Random(f"support-{self.seed}-{name}")
        n_dispute = round(count * self.params.dispute_fraction)
        n_none = round(count * self.params.no_article_fraction)
        kinds = ["dispute"] * n_dispute + ["no_article"] * n_none + ["article"] * (count - n_dispute - n_none)
        rng.shuffle(kinds)
        articles = [a for a in self.kb if a["issues"]]
        order: list[dict[str, Any]] = []
        examples, seen = [], set(exclude)
        for i, kind in enumerate(kinds):
            for _attempt in range(200):
                if kind == "article":
                    if not order:
                        order = rng.sample(articles, len(articles))
                    article = order[-1]
                    text, ref = self._ticket(rng, rng.choice(article["issues"])), article["id"]
                elif kind == "dispute":
                    text, ref = self._ticket(rng, rng.choice(DISPUTES)), None
                else:
                    text, ref = self._ticket(rng, rng.choice(NOT_COVERED)), None
                if text not in seen:
                    break
            else:
                raise TaskError(f"task.params: cannot make {count} distinct {name} tickets; lower num_{name}")
            if kind == "article":
                order.pop()
            seen.add(text)
            examples.append(Example(f"support-{name}-{i:05d}", text, {"kind": kind, "article_id": ref}, kind))
        return examples

    @cached_property
    def _few_shot_pool(self) -> list[Example]:
        return self._generate("fewshot", 12, set())

    @cached_property
    def _train(self) -> list[Example]:
        return self._generate("train", self.params.num_train, {e.user for e in self._few_shot_pool})

    @cached_property
    def _test(self) -> list[Example]:
        taken = {e.user for e in self._few_shot_pool} | {e.user for e in self._train}
        return self._generate("test", self.params.num_test, taken)

    def split(self, name: str) -> list[Example]:
        """Train or test tickets; test texts never occur in train, few-shot texts in neither."""
        if name == "train":
            return list(self._train)
        if name == "test":
            return list(self._test)
        raise TaskError(f"unknown split {name!r}; expected 'train' or 'test'")

    # --- prompts ---------------------------------------------------------------------------------
    def reference_answer(self, example: Example) -> str:
        """The ideal templated reply (passes every rule); disputes cite the billing-disputes article."""
        kind = example.reference["kind"]
        if kind == "no_article":
            return NO_ARTICLE
        return article_reply(self._by_id[example.reference["article_id"] or DISPUTE_ARTICLE])

    def _context(self, text: str) -> str:
        """Retrieved articles, best first, and the reply the top one suggests (a copyable answer for the teacher)."""
        found = self.retrieve(text)
        if not found:
            return f"Retrieved articles: none.\nSuggested reply: {NO_ARTICLE}"
        lines = "\n".join(f"[{a['id']}] {a['title']}: {a['answer']}" for a in found)
        reply = article_reply(found[0])
        return f"Retrieved articles:\n{lines}\nSuggested reply: {reply}"

    def _teacher_turn(self, example: Example) -> str:
        return f"{self._context(example.user)}\n\nTicket: {example.user}"

    @cached_property
    def _full_prefix(self) -> list[Message]:
        """Rules, then few-shot worked examples as chat turns: identical for every ticket (prefix caching).

        The example order (dispute, not covered, then articles) was chosen by measurement: a 135M model copies
        the last examples most, and most tickets are article questions.
        """
        rules = (
            f"{SHORT_PROMPT} Follow these rules exactly.\n"
            "1. Always respond in a calm, professional tone, in one or two short sentences.\n"
            '2. If a retrieved article answers the question, reply: "Thank you for contacting Acme support. Our '
            "article <title> [<article ID>] answers this: <the article's answer>\" Cite only retrieved IDs.\n"
            f"3. If the customer disputes a charge (charged twice, wrong amount, unknown charge), cite the Billing "
            f'disputes article [{DISPUTE_ARTICLE}], whose answer is exactly: "{ESCALATION}"\n'
            f'4. If no retrieved article covers the question, reply exactly: "{NO_ARTICLE}" Never invent an ID.'
        )
        order = ["dispute", "no_article", "article", "article", "dispute", "no_article", "article", "article"] * 2
        picks: list[Example] = []
        for kind in order[: self.params.few_shot]:
            candidate = next((e for e in self._few_shot_pool if e.category == kind and e not in picks), None)
            if candidate is not None:
                picks.append(candidate)
        turns: list[Message] = [{"role": "system", "content": rules}]
        for shot in picks:
            turns += [
                {"role": "user", "content": self._teacher_turn(shot)},
                {"role": "assistant", "content": self.reference_answer(shot)},
            ]
        return turns

    def messages(self, example: Example, style: str) -> list[Message]:
        """Short: system one-liner + ticket. Full: rules, few-shot turns, then retrieved articles + ticket.
        Retrieved: system one-liner, then retrieved articles + ticket."""
        if style == "short":
            return [{"role": "system", "content": SHORT_PROMPT}, {"role": "user", "content": example.user}]
        if style == "full":
            return [*self._full_prefix, {"role": "user", "content": self._teacher_turn(example)}]
        if style == "retrieved":  # the short prompt plus the retrieved articles: does tuning learn facts or style?
            return [
                {"role": "system", "content": SHORT_PROMPT},
                {"role": "user", "content": self._teacher_turn(example)},
            ]
        raise TaskError(f"unknown prompt style {style!r}; expected one of {self.prompt_styles}")

    # --- scoring ---------------------------------------------------------------------------------
    def score(self, completion: str, example: Example) -> dict[str, bool]:
        """Per-rule pass/fail: tone, escalation (iff dispute), citation (right/existing IDs, or none + phrase)."""
        text = completion.replace("\u2019", "'").strip()
        lowered = text.lower()
        shouting = SHOUTING.search(CITATION.sub("", text))
        tone = bool(text) and "!!" not in text and not shouting and not RUDE.search(lowered)
        kind = example.reference["kind"]
        escalation = (ESCALATION in text) == (kind == "dispute")
        cited = CITATION.findall(text)
        all_exist = all(c in self.kb_ids for c in cited)
        if kind == "article":
            citation = example.reference["article_id"] in cited and all_exist
        elif kind == "dispute":
            citation = all_exist
        else:
            citation = not cited and any(m in lowered for m in NO_ARTICLE_MARKERS)
        return {"tone": tone, "escalation": escalation, "citation": citation}

    def failure_modes(self, completion: str, example: Example) -> dict[str, bool]:
        """Hallucinated fluency, in two forms: a KB ID that does not exist, and a real article that does
        not answer the ticket (cited with the same confidence as the right one; on a ticket no article
        covers, any citation). A dispute may cite any real article, as the citation rule allows."""
        cited = CITATION.findall(completion)
        kind, right = example.reference["kind"], example.reference.get("article_id")
        wrong = kind != "dispute" and any(c in self.kb_ids and c != right for c in cited)
        return {"invented_kb_id": any(c not in self.kb_ids for c in cited), "wrong_kb_article": wrong}

    def rubric(self) -> str | None:
        return "The reply is correct, follows the instructions, and is calm and professional."

    def leaks(self, completion: str) -> bool:
        """Whether a general answer shows support behaviour: KB citation, escalation, no-article line, Acme-speak."""
        text = completion.replace("\u2019", "'")
        lowered = text.lower()
        return (
            "[kb-" in lowered
            or ESCALATION in text
            or any(m in lowered for m in NO_ARTICLE_MARKERS)
            or any(s in lowered for s in SUPPORT_SPEAK)
        )
