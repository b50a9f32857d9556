"""The benchmark's judge (`benchmark.judge`): a model grades every system's answers, and compares each system's
answer with the teacher's, for tasks no rule can score (`task.name: chat`).

- Rubric grade: each answer graded 1-10 against the rubric; at or above `pass_threshold` it passes, and the
  system's accuracy (so every interval, paired test and cost ratio of the report) is its pass rate. A reply the
  judge's parser cannot read is a fail, and counted.
- Pairwise against the teacher: each system's answer and the teacher's on the same prompt, asked in both orders
  (MT-Bench's swap). Both orders agree: a win, tie or loss; they disagree: a tie, and where the judge chose the
  same slot both times, position bias. A pair with an unreadable reply is counted apart, outside the rates.
- Length: judges favour longer answers, so beside the win rate stands a length-controlled one: a logistic
  regression of the outcome (a tie as half a win and half a loss) on the standardised difference in words,
  read at equal length (AlpacaEval's idea, with one covariate).
- Reference answers, where the task has them: ROUGE-L (rouge-score) and chrF (sacrebleu) of every answer, and
  how often the judge's pairwise choice agrees with their ordering: one measure of whether it can be trusted.

Every judge request and reply is a record (`judge_grade`, `judge_pair`), so the report's rates are recomputable.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Iterator
from typing import Any

from pipeline import names
from pipeline.benchmark.results import (
    Agreement,
    JudgedSystem,
    JudgeReliability,
    JudgeSection,
    PairSummary,
    ReferenceScores,
)
from pipeline.benchmark.stats import wilson_interval
from pipeline.config import BenchmarkJudgeConfig, EngineConfig, ExperimentConfig, SamplingConfig
from pipeline.console import log
from pipeline.engines import Engine, load_engine, model_for
from pipeline.judging import (
    GRADES,
    PREFERENCES,
    grade_prompt,
    pair_prompt,
    parse_grade,
    parse_preference,
    rubric_for,
)
from pipeline.pruning import student_model_name
from pipeline.runs import FinishedUnits
from pipeline.tasks import Example, Task

ORDERS = ("system_first", "teacher_first")  # the two orders each pair is asked in
OUTCOMES = ("win", "tie", "loss")  # of a system's answer against the teacher's


def judge_enabled(judge: BenchmarkJudgeConfig, task: Task) -> bool:
    """`benchmark.judge.enabled`, which by default follows whether the task is open-ended."""
    return task.open_ended if judge.enabled is None else judge.enabled


def judge_model(config: ExperimentConfig) -> tuple[str, EngineConfig]:
    """The judge's model name and the engine it runs on: "teacher" and "student" name those models (the
    teacher on its own engine settings), anything else is a model folder, HF id or served name."""
    judge = config.benchmark.judge
    if judge.model == names.TEACHER_MODEL:
        return config.teacher.model, judge.engine or config.teacher.engine
    if judge.model == names.STUDENT_MODEL:
        return student_model_name(config), judge.engine or config.benchmark.engine
    return judge.model, judge.engine or config.benchmark.engine


def run_judge(
    judge: BenchmarkJudgeConfig,
    judged_by: tuple[str, EngineConfig],
    seed: int,
    task: Task,
    examples: list[Example],
    records: list[dict[str, Any]],
    units: FinishedUnits | None = None,
) -> tuple[JudgeSection, list[dict[str, Any]]]:
    """Grade every task record (marking each pass or fail in place: rule `judge_pass`, `correct`), compare each
    system with the teacher, score references; returns report.json's `judge` section and the judge's records.
    `judged_by`: the judge's model and engine (`judge_model`). The judge's replies are saved in `units` chunk by
    chunk: a rerun after a kill asks only the rest, and loads no judge when every reply is saved."""
    rubric = rubric_for(judge.rubric, task.rubric())
    answers = [r for r in records if r["kind"] == "task"]
    prompts = {e.id: e.user for e in examples}
    references = {e.id: e.reference.get("target") for e in examples}
    add_reference_metrics(answers, references)

    teacher = {r["id"]: r for r in answers if r["system"] == names.TEACHER}
    # (answer, the teacher's answer, identical). The same answer as the teacher's is a tie, not a question: any
    # preference between two identical texts is the judge's position bias or noise (the embedded chat example's
    # prompted student is the teacher's model and prompt: a third of its pairs were such, each counted as bias).
    pairs = [
        (answer, theirs, answer["completion"] == theirs["completion"])
        for answer in answers
        if judge.pairwise and answer["system"] != names.TEACHER and (theirs := teacher.get(answer["id"]))
    ]
    asked = [(answer, theirs) for answer, theirs, identical in pairs if not identical]
    name, engine_config = judged_by
    log(
        f"benchmark: judge `{name}` grades {len(answers)} answers and compares {len(asked)} with the teacher's "
        f"({len(pairs) - len(asked)} identical to it: ties)"
    )
    with JudgeReplies(name, engine_config, judge, seed, units) as ask:
        grade_requests = [grade_prompt(rubric, prompts[r["id"]], r["completion"]) for r in answers]
        grade_replies = ask(grade_requests, GRADES)
        pair_requests = [
            conversation
            for answer, theirs in asked
            for conversation in (
                pair_prompt(rubric, prompts[answer["id"]], answer["completion"], theirs["completion"]),
                pair_prompt(rubric, prompts[answer["id"]], theirs["completion"], answer["completion"]),
            )
        ]
        pair_replies = ask(pair_requests, PREFERENCES)  # both orders of each pair asked

    judge_records = grade_records(answers, grade_requests, grade_replies, judge.pass_threshold)
    judge_records += pair_records(pairs, iter(pair_requests), iter(pair_replies))
    section = summarize_judge(answers, judge_records)
    section.model, section.backend, section.rubric = name, engine_config.backend, rubric
    section.pass_threshold, section.constrained = judge.pass_threshold, judge.constrained
    return section, judge_records


def grade_records(
    answers: list[dict[str, Any]], requests: list[Any], replies: list[str], pass_threshold: int
) -> list[dict[str, Any]]:
    """One `judge_grade` record per answer; each answer marked pass or fail in place (rule `judge_pass`)."""
    out = []
    for answer, request, reply in zip(answers, requests, replies, strict=True):
        grade = parse_grade(reply)
        answer["judge_grade"] = grade
        answer["rules"]["judge_pass"] = grade is not None and grade >= pass_threshold
        answer["correct"] = all(answer["rules"].values())
        out.append(
            {
                "system": answer["system"],
                "kind": "judge_grade",
                "id": answer["id"],
                "request": request,
                "reply": reply,
                "grade": grade,
            }
        )
    return out


def pair_records(
    pairs: list[tuple[dict[str, Any], dict[str, Any], bool]], requests: Iterator[Any], replies: Iterator[str]
) -> list[dict[str, Any]]:
    """One `judge_pair` record per (answer, the teacher's, identical): the two requests and replies of each pair
    asked, in ORDERS, come next from `requests` and `replies`; an identical pair is a tie, not asked."""
    out = []
    for answer, theirs, identical in pairs:
        asked = replies_by_order = preferences = None
        outcome, biased = "tie", False
        if not identical:
            asked = {order: next(requests) for order in ORDERS}
            replies_by_order = {order: next(replies) for order in ORDERS}
            preferences = {order: parse_preference(text) for order, text in replies_by_order.items()}
            outcome, biased = pair_outcome(preferences["system_first"], preferences["teacher_first"])
        out.append(
            {
                "system": answer["system"],
                "kind": "judge_pair",
                "id": answer["id"],
                "identical": identical,  # the teacher's own answer: a tie, the judge not asked
                "requests": asked,
                "replies": replies_by_order,
                "preferences": preferences,
                "outcome": outcome,
                "position_biased": biased,
                "words": {"system": words(answer["completion"]), "teacher": words(theirs["completion"])},
                "reference_metrics": {
                    "system": answer.get("reference_metrics"),
                    "teacher": theirs.get("reference_metrics"),
                },
            }
        )
    return out


JUDGE_CHUNK = 256  # distinct requests asked at once and saved together: what a kill can cost at most


class JudgeReplies:
    """The judge's greedy reply to each conversation (constrained to the choices with
    `benchmark.judge.constrained`), each distinct conversation asked once: two systems that gave the same answer
    (a prompted student that is the teacher's model and prompt) get the same grade without paying a hosted judge
    twice. Replies are saved in `units` JUDGE_CHUNK at a time, and the judge's engine is loaded on the first
    request not yet answered."""

    def __init__(
        self, name: str, engine: EngineConfig, judge: BenchmarkJudgeConfig, seed: int, units: FinishedUnits | None
    ) -> None:
        self.name, self.engine_config, self.judge, self.seed, self.units = name, engine, judge, seed, units
        self.engine: Engine | None = None

    def __enter__(self) -> JudgeReplies:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.engine is not None:
            self.engine.close()

    def __call__(self, conversations: list[list[dict[str, str]]], choices: list[str]) -> list[str]:
        from tqdm.auto import tqdm

        if not conversations:
            return []
        keys = [json.dumps(c, sort_keys=True) for c in conversations]
        distinct = list(dict(zip(keys, conversations, strict=True)).items())
        chunks = [distinct[i : i + JUDGE_CHUNK] for i in range(0, len(distinct), JUDGE_CHUNK)]
        replies: dict[str, str] = {}
        # A progress bar (ETA, throughput): a hosted judge of a full benchmark answers thousands of these.
        with tqdm(total=len(distinct), desc="judge", unit="request") as bar:
            for chunk in chunks:
                unit = "judge-chunk:" + hashlib.sha256("\n".join(k for k, _ in chunk).encode()).hexdigest()[:16]
                saved = self.units.get(unit) if self.units is not None and unit in self.units else None
                if saved is None:
                    saved = self._ask([c for _, c in chunk], choices)
                    if self.units is not None:
                        self.units.save(unit, saved)
                replies.update(zip((k for k, _ in chunk), saved, strict=True))
                bar.update(len(chunk))
        return [replies[key] for key in keys]

    def _ask(self, conversations: list[list[dict[str, str]]], choices: list[str]) -> list[str]:
        if self.engine is None:
            self.engine = load_engine(model_for(self.name, self.engine_config), self.engine_config, self.seed)
        sampling = SamplingConfig(temperature=0.0, max_tokens=self.judge.max_tokens, seed=self.seed)
        sampling = sampling.constrained_to(choices if self.judge.constrained else None)
        generations = self.engine.generate(conversations, sampling, progress=False)
        return [g.completions[0].text if g.completions else "" for g in generations]


def pair_outcome(system_first: str | None, teacher_first: str | None) -> tuple[str, bool]:
    """(outcome for the system, position biased) from the judge's preference in each order: "A" is the first
    reply shown. Both orders must agree for a win or a loss; a disagreement is a tie, and a position bias
    where the judge chose the same slot both times. "unparsed" where either reply could not be read."""
    if system_first is None or teacher_first is None:
        return "unparsed", False
    as_shown_first = {"A": "win", "B": "loss", "tie": "tie"}[system_first]
    as_shown_second = {"A": "loss", "B": "win", "tie": "tie"}[teacher_first]
    biased = system_first == teacher_first and system_first != "tie"
    return (as_shown_first if as_shown_first == as_shown_second else "tie"), biased


def words(text: str) -> int:
    """Length of an answer in words: comparable across systems whatever their tokenizers."""
    return len(text.split())


def add_reference_metrics(answers: list[dict[str, Any]], references: dict[str, str | None]) -> None:
    """ROUGE-L F1 and chrF (0-100) of each answer against its example's reference answer, where there is one."""
    if not any(references.values()):
        return
    import sacrebleu
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for answer in answers:
        reference = references.get(answer["id"])
        if reference:
            answer["reference_metrics"] = {
                "rouge_l": rouge.score(reference, answer["completion"])["rougeL"].fmeasure,
                "chrf": sacrebleu.sentence_chrf(answer["completion"], [reference]).score,
            }


def summarize_judge(answers: list[dict[str, Any]], judge_records: list[dict[str, Any]]) -> JudgeSection:
    """report.json's `judge` section from the task records (graded) and the judge's records: per system its
    grades, pass rate, length and reference metrics, and against the teacher its win/tie/loss; then the
    judge's reliability. Recomputable from records.jsonl alone."""
    systems: dict[str, JudgedSystem] = {}
    for name in dict.fromkeys(r["system"] for r in answers):
        mine = [r for r in answers if r["system"] == name]
        grades = [r["judge_grade"] for r in mine if r.get("judge_grade") is not None]
        passed = sum(r["rules"].get("judge_pass", False) for r in mine)
        row = JudgedSystem(
            n=len(mine),
            grade_mean=statistics.fmean(grades) if grades else None,
            grades_unparsed=len(mine) - len(grades),
            pass_rate=passed / len(mine),
            pass_rate_ci95=wilson_interval(passed, len(mine)),
            mean_words=statistics.fmean(words(r["completion"]) for r in mine),
        )
        scored = [r["reference_metrics"] for r in mine if r.get("reference_metrics")]
        if scored:
            row.reference = ReferenceScores(
                n=len(scored),
                rouge_l=statistics.fmean(m["rouge_l"] for m in scored),
                chrf=statistics.fmean(m["chrf"] for m in scored),
            )
        pairs = [p for p in judge_records if p["kind"] == "judge_pair" and p["system"] == name]
        if pairs:
            row.vs_teacher = summarize_pairs(pairs)
        systems[name] = row
    return JudgeSection(systems=systems, reliability=reliability(systems, judge_records))


def summarize_pairs(pairs: list[dict[str, Any]]) -> PairSummary:
    """Win / tie / loss of one system against the teacher, with the rates the verdict reads."""
    counts = {outcome: sum(p["outcome"] == outcome for p in pairs) for outcome in (*OUTCOMES, "unparsed")}
    judged = [p for p in pairs if p["outcome"] != "unparsed"]
    asked = [p for p in judged if not p.get("identical")]  # position bias needs two different answers
    n = len(judged)
    win_or_tie = counts["win"] + counts["tie"]
    return PairSummary(
        pairs=len(pairs),
        win=counts["win"],
        tie=counts["tie"],
        loss=counts["loss"],
        unparsed=counts["unparsed"],
        n=n,
        win_rate=(counts["win"] + counts["tie"] / 2) / n if n else None,  # a tie counts half
        win_or_tie_rate=win_or_tie / n if n else None,
        win_or_tie_ci95=wilson_interval(win_or_tie, n),
        length_controlled_win_rate=length_controlled_win_rate(
            [p["outcome"] for p in judged], [p["words"]["system"] - p["words"]["teacher"] for p in judged]
        ),
        identical=sum(bool(p.get("identical")) for p in pairs),
        position_biased=sum(p["position_biased"] for p in pairs),
        position_bias_rate=sum(p["position_biased"] for p in asked) / len(asked) if asked else None,
        mean_words=statistics.fmean(p["words"]["system"] for p in pairs),
        teacher_mean_words=statistics.fmean(p["words"]["teacher"] for p in pairs),
    )


def length_controlled_win_rate(outcomes: list[str], length_differences: list[int]) -> float | None:
    """The win rate at equal length: a logistic regression of P(win) on the standardised length difference
    (system minus teacher, in words), each tie half a win and half a loss, read where the difference is zero.
    Without variation in length it is the plain win rate; None without pairs."""
    if not outcomes:
        return None
    import numpy as np
    from scipy.optimize import minimize

    wins = np.array([{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in outcomes])
    diffs = np.array(length_differences, dtype=float)
    spread = diffs.std()
    if spread == 0:
        return float(wins.mean())
    x = diffs / spread
    ridge = 1e-3  # keeps the fit finite when every pair went one way

    def loss(beta: Any) -> float:
        logits = beta[0] + beta[1] * x
        return float(np.sum(np.logaddexp(0, logits) - wins * logits) + ridge * beta @ beta)

    fitted = minimize(loss, np.zeros(2), method="BFGS")
    return float(1 / (1 + math.exp(-fitted.x[0])))


def reliability(systems: dict[str, JudgedSystem], judge_records: list[dict[str, Any]]) -> JudgeReliability:
    """How far the judge can be trusted: how often its choice followed the order the answers were shown in,
    how many of its replies could not be read, how it grades the teacher's own answers, and, with reference
    answers, how often its choice between two answers agrees with the reference metrics' ordering."""
    grades = [r for r in judge_records if r["kind"] == "judge_grade"]
    identical = sum(bool(r.get("identical")) for r in judge_records if r["kind"] == "judge_pair")
    pairs = [r for r in judge_records if r["kind"] == "judge_pair" and not r.get("identical")]  # those asked
    parsed_pairs = [p for p in pairs if p["outcome"] != "unparsed"]
    teacher = systems.get(names.TEACHER, JudgedSystem(grade_mean=None, pass_rate=None))
    agreement: dict[str, Agreement] = {}
    decided = [
        p
        for p in parsed_pairs
        if p["outcome"] in ("win", "loss") and p["reference_metrics"]["system"] and p["reference_metrics"]["teacher"]
    ]
    for metric in ("rouge_l", "chrf"):
        ordered = [
            p for p in decided if p["reference_metrics"]["system"][metric] != p["reference_metrics"]["teacher"][metric]
        ]
        agree = sum(
            (p["outcome"] == "win")
            == (p["reference_metrics"]["system"][metric] > p["reference_metrics"]["teacher"][metric])
            for p in ordered
        )
        agreement[metric] = Agreement(n=len(ordered), agreement=agree / len(ordered) if ordered else None)
    return JudgeReliability(
        grades=len(grades),
        grades_unparsed=sum(r["grade"] is None for r in grades),
        distinct_grades=sorted({r["grade"] for r in grades if r["grade"] is not None}),
        pairs=len(pairs),
        pairs_identical=identical,
        pairs_unparsed=len(pairs) - len(parsed_pairs),
        position_biased=sum(p["position_biased"] for p in parsed_pairs),
        position_bias_rate=sum(p["position_biased"] for p in parsed_pairs) / len(parsed_pairs)
        if parsed_pairs
        else None,
        teacher_grade_mean=teacher.grade_mean,
        teacher_pass_rate=teacher.pass_rate,
        reference_agreement=agreement if any(a.n for a in agreement.values()) else None,
    )
