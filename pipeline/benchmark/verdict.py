"""The verdict: one paragraph answering "was fine-tuning worth it here?", computed from report.json's numbers
with the rules of `benchmark.verdict` (the same rules the promotion gate applies to forgetting). Longer than most
modules: every sentence the verdict can say is here, in the order a reader meets them, so one file shows the whole
paragraph and the rules that pick its conclusion."""

from __future__ import annotations

from msgspec import UNSET, UnsetType

from pipeline import names
from pipeline.benchmark.costs import lower_beyond_noise, why_no_break_even
from pipeline.benchmark.levers import levers_sentence
from pipeline.benchmark.results import (
    BreakEven,
    CategoryCoverage,
    ForgettingChange,
    JudgeSection,
    LoadLevel,
    McNemarCounts,
    PairedComparison,
    PairSummary,
    Payback,
    Report,
    SystemResult,
)
from pipeline.config import VerdictConfig


def lowest_load_level(system: SystemResult) -> tuple[str, LoadLevel] | None:
    """The load test's lowest concurrency and its summary (what one user sees, no queueing); None without one."""
    if not system.load:
        return None
    level = min(system.load, key=int)
    return level, system.load[level]


def latency_p50(system: SystemResult) -> float:
    """End-to-end p50 through the server at its lowest concurrency, else the offline one-at-a-time p50."""
    lowest = lowest_load_level(system)
    return lowest[1].e2e_p50_s if lowest else system.latency_p50_s


def cost(system: SystemResult) -> float:
    """$ per 1k requests where measured (schema 2), else $ per 1M output tokens (schema 1 reports)."""
    return system.cost_per_1k_requests if system.cost_per_1k_requests is not UNSET else system.cost_per_1m_output_tokens


def regressions(change: ForgettingChange | UnsetType | None, rules: VerdictConfig, versus: str = "") -> list[str]:
    """Each base-capability rule of `benchmark.verdict` the tuned student broke against the untuned one (probe
    accuracy down, or leakage up, more than allowed), as a line naming its key; empty when it broke none.
    The verdict and the promotion gate both judge forgetting by this. `versus`: a prefix naming the other side
    where it is not the untuned student ("against the teacher: ")."""
    change = change or ForgettingChange()
    broken = []
    drop, limit = -(change.accuracy or 0.0), rules.max_probe_accuracy_drop
    if limit is not None and drop > limit:
        broken.append(f"{versus}probe accuracy fell {drop:.3f} > benchmark.verdict.max_probe_accuracy_drop {limit}")
    rise, limit = change.leakage_rate or 0.0, rules.max_leakage_increase
    if limit is not None and rise > limit:
        broken.append(f"{versus}leakage rate rose {rise:.3f} > benchmark.verdict.max_leakage_increase {limit}")
    return broken


AGAINST_THE_TEACHER = "against the teacher it replaces: "


def all_regressions(report: Report, rules: VerdictConfig) -> list[str]:
    """The forgetting rules broken against the untuned student and, for a student pruned from the teacher (already
    below it before training), against the teacher: what the deployment gives up."""
    forgetting = report.forgetting
    return regressions(forgetting.change, rules) + regressions(
        forgetting.change_vs_teacher or None, rules, AGAINST_THE_TEACHER
    )


def verdict(report: Report, rules: VerdictConfig | None = None) -> str:
    """One paragraph answering 'was fine-tuning worth it here?', computed from the numbers.

    Fine-tuning has to beat the untuned student measurably, and then earn its keep against the cheapest
    alternative: prompting the untuned student. Where prompting matches it, only a lower serving cost can
    justify fine-tuning, and the break-even against prompting says how soon that pays."""
    rules = rules or VerdictConfig()
    facts = _Facts(report, rules)
    if facts.judge_untrustworthy:
        return _undecided(report, facts)
    return " ".join([*_findings(report, facts), _conclusion(report, facts, rules)])


def _undecided(report: Report, facts: _Facts) -> str:
    """The verdict when the judge cannot rank the answers: that first, then only what does not rest on it (the
    reference metrics, answer lengths, serving cost, the one-off cost); no pass-rate share of the teacher, no
    standing against it, no break-even."""
    parts = [
        f"Verdict: undecided — the judge cannot tell the answers apart ({facts.judge_untrustworthy}), so its pass "
        "rates and win rates rank nothing, and no share of the teacher, standing against it or break-even is "
        "stated; rerun the benchmark with a stronger benchmark.judge.model."
    ]
    judged = report.judge.systems
    scored = {name: m.reference for name, m in judged.items() if m.reference and m.reference.n}
    if scored:
        parts.append(
            "Against the reference answers (ROUGE-L / chrF, which need no judge): "
            + ", ".join(f"{name} {r.rouge_l:.3f} / {r.chrf:.1f}" for name, r in scored.items())
            + "."
        )
    lengths = {name: m.mean_words for name, m in judged.items() if m.mean_words is not UNSET}
    if lengths:
        parts.append(
            "Answers average " + ", ".join(f"{words:.0f} words ({name})" for name, words in lengths.items()) + "."
        )
    parts.append(
        f"Serving the tuned student costs {facts.cost_ratio:.2f}x the teacher (${cost(facts.tuned):.4f} vs "
        f"${cost(facts.teacher):.4f} {facts.unit}){_within_noise(facts, facts.cost_ratio)}."
    )
    if facts.even:
        parts.append(f"Distilling cost ${facts.even.one_off_usd:,.4f}.")
    return " ".join(parts + [judge_reliability_sentence(report.judge)])


class _Facts:
    """The numbers the verdict's sentences and its conclusion share."""

    def __init__(self, report: Report, rules: VerdictConfig) -> None:
        systems = report.systems
        self.teacher, self.base = systems[names.TEACHER], systems[names.STUDENT_BASE]
        self.tuned, self.prompted = systems[names.STUDENT_TUNED], systems.get(names.STUDENT_PROMPTED)
        self.tests = report.comparisons.student_tuned_vs
        self.gain = self.tuned.accuracy - self.base.accuracy
        self.p_base = p_value(self.tests, names.STUDENT_BASE)
        teacher_accuracy = self.teacher.accuracy
        self.significant = self.gain > 0 and (self.p_base is None or self.p_base < rules.significance)
        # A teacher at ~0: a share of its accuracy would be noise (200%, CI 0-477%), and unless training on its
        # answers still moved the student measurably, it had nothing to teach.
        self.teacher_low = teacher_accuracy <= rules.min_teacher_accuracy
        self.teacher_fails = self.teacher_low and not self.significant
        self.kept = self.tuned.accuracy / teacher_accuracy if not self.teacher_low else float("nan")
        self.cost_ratio = cost(self.tuned) / cost(self.teacher)
        self.latency_ratio = latency_p50(self.tuned) / latency_p50(self.teacher)
        self.unit = "per 1k requests" if self.tuned.cost_per_1k_requests is not UNSET else "per 1M output tokens"
        # A ratio counts as cheaper or faster only below this (benchmark.verdict.min_serving_gain): load-test noise.
        self.min_gain = rules.min_serving_gain
        self.p_prompted = p_value(self.tests, names.STUDENT_PROMPTED)
        self.versus_prompted = None
        self.prompted_cost_ratio = float("nan")
        self.saving_over_prompting_means_nothing: str | None = None
        if self.prompted:
            self.versus_prompted = _against_prompted(self.tuned, self.prompted, self.p_prompted, rules.significance)
            self.prompted_cost_ratio = cost(self.tuned) / cost(self.prompted)
            # The same judgement as the break-even's: a cost ratio is a saving only where the tuned student
            # answers at least as well, above zero, after a teacher that had something to teach.
            self.saving_over_prompting_means_nothing = why_no_break_even(
                systems, names.STUDENT_PROMPTED, rules, self.p_prompted
            )
        self.change = report.forgetting.change or None
        self.even = report.break_even or None
        # Open-ended tasks: the judge's pairwise comparison with the teacher says "near the teacher" instead of
        # a share of its pass rate: as good when the win + tie share's interval reaches 50%.
        judged = report.judge.systems.get(names.STUDENT_TUNED) if report.judge else None
        versus = judged.vs_teacher if judged else None
        self.versus_teacher: PairSummary | None = versus if versus and versus.n else None
        self.as_good_as_teacher = self.versus_teacher.win_or_tie_ci95[1] >= 0.5 if self.versus_teacher else None
        self.judge_untrustworthy = judge_cannot_rank(report.judge, rules)


def p_value(tests: dict[str, PairedComparison], other: str) -> float | None:
    """The paired test's p-value of the tuned student against `other`; None where none was run."""
    test = tests.get(other)
    return test.p_value if test is not None else None


def _findings(report: Report, facts: _Facts) -> list[str]:
    """The measured sentences, before the conclusion: the cause when the teacher failed, then accuracy,
    prompting, cost, failures, forgetting, payback."""
    significance = f", paired McNemar p = {facts.p_base:.3g}" if facts.p_base is not None else ""
    kept_ci = report.comparisons.kept_of_teacher.ci95 if report.comparisons.kept_of_teacher else None
    kept = facts.kept
    if facts.teacher_low:
        keeps = "too low to state a share of it"
    else:
        keeps = f"so the tuned student keeps {kept:.0%} of it{_interval(kept_ci)}"
    parts = [_nothing_to_distill(report, facts)] if facts.teacher_fails else []
    if facts.teacher_low and not facts.teacher_fails:
        parts.append(_taught_though_low(report, facts))
    measure = "pass rate by the judge" if report.judge else "accuracy"
    parts.append(
        f"Fine-tuning moved the student's {measure} from {facts.base.accuracy:.1%} to {facts.tuned.accuracy:.1%} "
        f"({facts.gain:+.1%}{significance}); the teacher scores {facts.teacher.accuracy:.1%}, {keeps}."
    )
    if facts.prompted:
        comparable = facts.saving_over_prompting_means_nothing is None
        parts.append(
            f"Prompting the untuned student with the teacher's full prompt instead scores "
            f"{facts.prompted.accuracy:.1%}"
            + (f" (p = {facts.p_prompted:.3g} against the tuned student)" if facts.p_prompted is not None else "")
            + f" and costs ${cost(facts.prompted):.4f} {facts.unit}"
            + (
                f", so the tuned student serves at {facts.prompted_cost_ratio:.2f}x the cost of prompting"
                + _within_noise(facts, facts.prompted_cost_ratio)
                + "."
                if comparable
                else "."
            )
        )
    if not facts.teacher_low:  # a cost ratio to a teacher that cannot do the task is no saving
        parts.append(
            f"Serving it costs {facts.cost_ratio:.2f}x the teacher (${cost(facts.tuned):.4f} vs "
            f"${cost(facts.teacher):.4f} {facts.unit}) and its p50 latency is {facts.latency_ratio:.2f}x the "
            f"teacher's{_within_noise(facts, facts.cost_ratio, facts.latency_ratio)}."
        )
    if facts.versus_teacher:
        parts.append(_judged_against_teacher(report.judge, facts))
    failing = _where_it_fails(report)
    if failing:
        parts.append(failing)
    if report.coverage:
        parts.append(_coverage(report.coverage))
    parts += _tuned_variants(report, facts.unit)
    if facts.change:
        tuned_probe = report.forgetting.systems.get(names.STUDENT_TUNED)
        trained = tuned_probe.task_categories if tuned_probe else None
        outside = f" (outside its {', '.join(trained)} questions, the task's own skill)" if trained else ""
        change = facts.change
        parts.append(
            f"On the general probe{outside}, accuracy changed by {change.accuracy:+.1%}"
            f"{_probe_p(change.accuracy_test)} and the leakage rate by {change.leakage_rate:+.1%}"
            f"{_probe_p(change.leakage_rate_test)}."
        )
    versus_teacher = report.forgetting.change_vs_teacher or None
    if versus_teacher:
        parts.append(
            "Against the teacher it replaces (the student is pruned from it), the tuned student's probe accuracy "
            f"differs by {versus_teacher.accuracy:+.1%}{_probe_p(versus_teacher.accuracy_test)} and its leakage "
            f"rate by {versus_teacher.leakage_rate:+.1%}{_probe_p(versus_teacher.leakage_rate_test)}: the general "
            "ability this deployment gives up."
        )
    if facts.even:
        parts.append(_spent(facts.even))
    return parts


def _probe_p(test: McNemarCounts | UnsetType) -> str:
    """ " (paired McNemar p = 0.42)" for a probe change with its paired test (older reports have none)."""
    return f" (paired McNemar p = {test.p_value:.2g})" if test else ""


def _judged_against_teacher(judge: JudgeSection, facts: _Facts) -> str:
    """The open-ended verdict's sentences: the tuned student against the teacher, pairwise, and the judge's trust."""
    v = facts.versus_teacher
    low, high = v.win_or_tie_ci95
    standing = (
        "as good as the teacher by this judge (the interval reaches 50%)"
        if facts.as_good_as_teacher
        else "below the teacher by this judge (the interval stays under 50%)"
    )
    return (
        f"Judged pairwise against the teacher by `{judge.model}`, each pair in both orders, the tuned student "
        f"wins {v.win}, ties {v.tie} and loses {v.loss} of {v.n} (win + tie {v.win_or_tie_rate:.0%}, "
        f"95% CI {low:.0%}-{high:.0%}): {standing}; at equal length its win rate would be "
        f"{v.length_controlled_win_rate:.0%} against {v.win_rate:.0%} as measured (its answers average "
        f"{v.mean_words:.0f} words, the teacher's {v.teacher_mean_words:.0f}). " + judge_reliability_sentence(judge)
    )


def judge_cannot_rank(judge: JudgeSection | None, rules: VerdictConfig) -> str | None:
    """Why the judge cannot rank the systems ("it followed the order shown in 98% of pairs"); None when it can
    (or there is no judge)."""
    if not judge:
        return None
    r = judge.reliability
    reasons = []
    if r.position_bias_rate is not None and r.position_bias_rate > rules.max_judge_position_bias:
        reasons.append(f"it followed the order the answers were shown in for {r.position_bias_rate:.0%} of pairs")
    distinct = r.distinct_grades
    if distinct is not UNSET and len(distinct) <= 1 and r.grades > 1:
        reasons.append(
            f"it gave all {r.grades} answers the grade {distinct[0]}" if distinct else "no grade was readable"
        )
    return " and ".join(reasons) or None


def judge_reliability_sentence(judge: JudgeSection) -> str:
    """How far the judge can be trusted, in one sentence from report.json's `judge.reliability`."""
    r = judge.reliability
    said = []
    if r.pairs:
        bias = r.position_bias_rate
        said.append(
            f"its choice followed the order the answers were shown in for {r.position_biased} of "
            f"{r.pairs - r.pairs_unparsed} pairs" + (f" ({bias:.0%}, position bias)" if bias is not None else "")
        )
    if r.pairs_identical:
        said.append(f"{r.pairs_identical} answers identical to the teacher's were ties, the judge not asked")
    said.append(
        f"{r.grades_unparsed} of {r.grades} grades and {r.pairs_unparsed} of {r.pairs} pairwise replies were unreadable"
    )
    if r.distinct_grades:
        said.append(f"the grades it gave: {', '.join(map(str, r.distinct_grades))}")
    if r.teacher_grade_mean not in (None, UNSET):
        said.append(
            f"it grades the teacher's own answers {r.teacher_grade_mean:.1f} of 10 on average "
            f"(pass rate {r.teacher_pass_rate:.0%})"
        )
    if r.reference_agreement:
        said.append(
            "where references exist, its pairwise choice agrees with "
            + " and ".join(
                f"{metric.replace('_', '-').upper() if metric == 'rouge_l' else 'chrF'}'s ordering in "
                + (f"{a.agreement:.0%} of {a.n} pairs" if a.n else "no pairs")
                for metric, a in r.reference_agreement.items()
            )
            + " (50% is chance)"
        )
    return "How far to trust the judge: " + "; ".join(said) + "."


def _spent(even: BreakEven) -> str:
    """What distilling cost, and when it pays back against the teacher and against prompting (no payback is
    stated where the saving means nothing: see costs.why_no_break_even). One clause for both when they come out
    the same (the embedded default's prompted student is the teacher's model with its prompt)."""
    vs_prompted = even.vs_prompted or None
    same = vs_prompted is not None and (vs_prompted.skipped, vs_prompted.requests) == (even.skipped, even.requests)
    whom = "the teacher or prompting" if same else "the teacher"
    one_off = even.one_off_usd  # cents on a CPU demo ($0.0104), dollars on a GPU node
    spent = f"Distilling cost ${one_off:,.2f}" if one_off >= 1 else f"Distilling cost ${one_off:.4f}"
    if even.generate_usd_at_list_price is None:
        spent += f" (generate + train on {even.pipeline_hardware})"
    else:
        spent += f" (the hosted teacher's tokens at its list price, and train on {even.pipeline_hardware})"
    if even.skipped:
        spent += f"; no break-even against {whom} is stated: {even.skipped}"
    elif even.requests is None:
        spent += f" and never pays back against {whom}: the tuned student is not cheaper per request"
    else:
        spent += f", paid back against {whom} after {_payback(even, even.requests_per_day)}"
    if same or vs_prompted is None:
        return spent + "."
    if vs_prompted.skipped:
        spent += f"; none against prompting: {vs_prompted.skipped}"
    elif vs_prompted.requests is not None:
        spent += f"; against prompting it pays back after {_payback(vs_prompted)}"
    else:
        spent += "; against prompting it never pays back"
    return spent + "."


def _nothing_to_distill(report: Report, facts: _Facts) -> str:
    """The verdict's first sentence when the teacher failed: that, and why, from the filter's counts."""
    n = report.test_examples
    accuracy = facts.teacher.accuracy
    count = f" ({round(accuracy * n)} of {n})" if n else ""
    sentence = f"There was nothing to distill: the teacher scores {accuracy:.1%}{count} on the held-out test examples"
    kept = report.filter
    if kept and kept.samples_in:
        dropped = ", ".join(f"{name} {count}" for name, count in sorted(kept.dropped.items(), key=lambda i: -i[1]))
        sentence += f", and the filter kept {kept.samples_kept} of its {kept.samples_in} training answers"
        sentence += f" (dropped: {dropped})" if dropped else ""
        if kept.teacher_verified is not None:
            sentence += f"; {kept.teacher_verified} of them passed the task's scorer"
    return sentence + "."


def _taught_though_low(report: Report, facts: _Facts) -> str:
    """The first sentence when the teacher scores near zero on the test, yet its training answers moved the
    student measurably: they taught something, so the run is judged, but against no share of the teacher."""
    teacher = facts.teacher
    how = " answering constrained to the labels, as it taught," if teacher.constrained else ""
    return (
        f"The teacher{how} scores only {teacher.accuracy:.1%} on the held-out test examples, yet training on the "
        f"answers it gave moved the student measurably, so they taught something; no share of the teacher or "
        "saving over it is stated."
    )


def _conclusion(report: Report, facts: _Facts, rules: VerdictConfig) -> str:
    """The one-line verdict, in order of what settles it: no measurable gain, prompting did better or as well
    for no more cost, a regression on base capabilities, worth it for cost only, worth it, or mixed."""
    significant = facts.significant
    broken = all_regressions(report, rules)
    forgot = bool(broken)
    also_forgot = " The tuned student also regressed on base capabilities." if forgot else ""
    cheaper_than_prompting = lower_beyond_noise(facts.prompted_cost_ratio, rules)
    if facts.teacher_fails:
        return (
            "Verdict: not worth it — the teacher cannot do this task as configured, so there was nothing to distill; "
            "fix the teacher first (a stronger teacher.model, the prompt, teacher.sampling.max_tokens or stop, or "
            "how answers are read), then rerun."
        )
    if not significant:
        return "Verdict: not worth it — fine-tuning did not measurably beat the untuned student."
    if facts.versus_prompted == "worse":
        return (
            "Verdict: not worth it — prompting the untuned student did better"
            + (", though at a higher cost per request." if cheaper_than_prompting else ", for no measurably more cost.")
            + also_forgot
        )
    if facts.versus_prompted == "tie" and not cheaper_than_prompting:
        return (
            "Verdict: not worth it — prompting the untuned student did as well for no measurably more cost per "
            "request; fine-tuning bought nothing." + also_forgot
        )
    if forgot and all(line.startswith(AGAINST_THE_TEACHER) for line in broken):
        return (
            "Verdict: not worth it as trained — the pruned student does the task, but against the teacher it replaces "
            f"it gives up base capabilities ({'; '.join(line.removeprefix(AGAINST_THE_TEACHER) for line in broken)}); "
            "keep more layers (student.prune.keep_layers), or mix more of the teacher's general answers in "
            "(train.replay.fraction with train.replay.source teacher), or accept the loss for a narrow deployment."
        )
    if forgot:
        return (
            "Verdict: not worth it as trained — the task gain came with a regression on base capabilities "
            f"({_regression_rule(rules)}); " + levers_sentence(report)
        )
    if facts.versus_prompted == "tie":
        vs_prompted = facts.even.vs_prompted if facts.even else None
        requests = vs_prompted.requests if vs_prompted else None
        paid_back = f", paid back after {requests:,.0f} requests" if requests else ""
        return (
            f"Verdict: worth it for cost only — prompting the untuned student did as well, but the tuned student "
            f"serves at {facts.prompted_cost_ratio:.2f}x its cost per request{paid_back}."
        )
    short = _short_of_worth_it(facts, rules)
    if not short:
        judged = " (as the judge sees it: weigh its reliability above)" if facts.as_good_as_teacher is not None else ""
        return (
            f"Verdict: worth it — the tuned student does the task near the teacher's level{judged}, faster and cheaper."
        )
    return f"Verdict: mixed — fine-tuning helped, but {' and '.join(short)}; weigh that before shipping it."


def _short_of_worth_it(facts: _Facts, rules: VerdictConfig) -> list[str]:
    """What keeps a tuned student that beat its untuned self from "worth it": the teacher's level, faster, cheaper
    (each with the setting that draws its line). Empty: worth it."""
    short = []
    if facts.teacher_low:
        short.append(
            f"the teacher it would replace scores {facts.teacher.accuracy:.1%} here, too low to measure the student "
            "against (benchmark.verdict.min_teacher_accuracy)"
        )
    elif facts.as_good_as_teacher is False:
        short.append("the judge does not rate it as good as the teacher")
    elif facts.as_good_as_teacher is None and facts.kept < rules.min_kept_of_teacher:
        short.append(
            f"it keeps {facts.kept:.0%} of the teacher's accuracy, under the {rules.min_kept_of_teacher:.0%} that "
            "counts as the teacher's level (benchmark.verdict.min_kept_of_teacher)"
        )
    line = f"{1 - rules.min_serving_gain:.2f}x, benchmark.verdict.min_serving_gain"
    if not lower_beyond_noise(facts.latency_ratio, rules):
        short.append(f"its p50 latency is {facts.latency_ratio:.2f}x the teacher's (faster counts below {line})")
    if not lower_beyond_noise(facts.cost_ratio, rules):
        short.append(f"it costs {facts.cost_ratio:.2f}x the teacher {facts.unit} (cheaper counts below {line})")
    return short


def _within_noise(facts: _Facts, *ratios: float) -> str:
    """A note for ratios to 1 closer than benchmark.verdict.min_serving_gain: not counted as a difference."""
    if not any(abs(1 - r) < facts.min_gain for r in ratios):
        return ""
    return f" (a difference under {facts.min_gain:.0%}, within one load test's noise, is not counted)"


def _regression_rule(rules: VerdictConfig) -> str:
    """'probe accuracy down more than 5 points or leakage up more than 10', from the configured rules."""
    said = []
    if rules.max_probe_accuracy_drop is not None:
        said.append(f"probe accuracy down more than {rules.max_probe_accuracy_drop * 100:.3g} points")
    if rules.max_leakage_increase is not None:
        said.append(f"leakage up more than {rules.max_leakage_increase * 100:.3g}")
    return " or ".join(said)


def _interval(values: list[float] | None) -> str:
    return f" (95% CI {values[0]:.0%}-{values[1]:.0%})" if values and all(v == v for v in values) else ""


def _payback(even: Payback, requests_per_day: float | None = None) -> str:
    rate = f" at {requests_per_day:,.0f} requests/day" if requests_per_day else ""
    return f"{even.requests:,.0f} requests ({even.days:.1f} days{rate})"


def _against_prompted(tuned: SystemResult, prompted: SystemResult, p_value: float | None, significance: float) -> str:
    """'better', 'worse' or 'tie': the tuned student against the prompted one, by the paired test where there is one."""
    differs = p_value is None or p_value < significance
    if differs and prompted.accuracy > tuned.accuracy:
        return "worse"
    if differs and tuned.accuracy > prompted.accuracy:
        return "better"
    return "tie"


def _tuned_variants(report: Report, unit: str) -> list[str]:
    """A sentence per other system serving the tuned student (e.g. given retrieved context, the background
    note's test of "fine-tuning learns style, not facts"): its accuracy and cost, against the tuned student."""
    systems, tests = report.systems, report.comparisons.student_tuned_vs
    teacher, tuned = systems[names.TEACHER], systems[names.STUDENT_TUNED]
    sentences = []
    for name, m in systems.items():
        same_student = m.model is not UNSET and (m.model, m.serving) == (tuned.model, tuned.serving)
        if name == names.STUDENT_TUNED or not same_student:
            continue
        p = p_value(tests, name)
        served = f"trained with the `{tuned.prompt_style}` prompt and served the `{m.prompt_style}` one ({name})"
        sentences.append(
            f"The tuned student {served} scores {m.accuracy:.1%}"
            + (f" (p = {p:.3g} against the tuned student)" if p is not None else "")
            + f" at ${cost(m):.4f} {unit}, {cost(m) / cost(teacher):.2f}x the teacher."
        )
    return sentences


def _coverage(coverage: CategoryCoverage) -> str:
    """'Its training data showed 44 of the 77 labels of the test split: ...': a label never shown cannot be learned."""
    word = coverage.word
    shown = coverage.categories - len(coverage.untrained)
    trained = (
        f"{coverage.trained_accuracy:.1%} on test examples of those (n={coverage.trained_n})"
        if coverage.trained_accuracy is not None
        else "no test example of those"
    )
    return (
        f"Its training data showed {shown} of the {coverage.categories} {word} of the test split: it scores "
        f"{trained} and {coverage.untrained_accuracy:.1%} on the {len(coverage.untrained)} {word} it never saw "
        f"(n={coverage.untrained_n}), which it could not learn."
    )


def _where_it_fails(report: Report) -> str:
    """The verdict's sentence on the named failure modes: the tuned student's largest category gap to the
    teacher (a distribution cliff) and the failure modes it shows more often than the teacher."""
    teacher, tuned = report.systems[names.TEACHER], report.systems[names.STUDENT_TUNED]
    if tuned.category_accuracy is UNSET or teacher.category_accuracy is UNSET:
        return ""
    parts = []
    gaps = {c: teacher.category_accuracy[c] - a for c, a in tuned.category_accuracy.items()}
    worst = max(gaps, key=gaps.get) if len(gaps) > 1 else None
    if worst is not None and gaps[worst] > 0:
        parts.append(
            f"its largest gap to the teacher is on `{worst}` examples ({tuned.category_accuracy[worst]:.0%} vs "
            f"{teacher.category_accuracy[worst]:.0%})"
        )
    worse = [
        f"{mode} in {rate:.0%} of answers (teacher {teacher.failure_rates.get(mode, 0.0):.0%})"
        for mode, rate in tuned.failure_rates.items()
        if rate > teacher.failure_rates.get(mode, 0.0)
    ]
    if worse:
        parts.append("it shows " + ", ".join(worse))
    return ("Where it fails: " + "; ".join(parts) + ".") if parts else ""
