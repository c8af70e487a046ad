"""The feedback half of a round on a real (tiny, random) model: evaluate -> split -> synthesize.

The tiny model writes garbage, so these tests check the bookkeeping a real model would go through:
k samples per pool problem, pass rates in [0, 1] that equal the rows, accuracy per eval set that
equals the rows, and for synthesis that every generation is either kept or dropped with a reason.
One scripted-backend test pins the arithmetic with answers that are actually right.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from stillhouse.tasks.backends.base import Completion
from stillhouse.tasks.config import EvalConfig, PromptsConfig, SamplingConfig, SplitConfig, SynthesisConfig
from stillhouse.tasks.evaluation import POOL, cap_eval_problems, evaluate_student
from stillhouse.tasks.problems import Problem
from stillhouse.tasks.split import split_by_pass_rate
from stillhouse.tasks.synthesis.synthesize import DROP_REASONS, synthesize

EVAL = [
    Problem.make("What is 2 + 3?", "5", source="arith", split="eval"),
    Problem.make("What is 10 - 4?", "6", source="arith", split="eval"),
    Problem.make("What is 3 times 3?", "9", source="arith", split="eval"),
    Problem.make("Ann has 4 pens and buys 2 more. How many pens does she have?", "6", source="words", split="eval"),
    Problem.make("A box has 7 eggs; 3 break. How many eggs are whole?", "4", source="words", split="eval"),
]
POOL_PROBLEMS = [
    Problem.make("Tom has 5 apples and buys 3 more. How many apples does Tom have now?", "8", source="seed"),
    Problem.make("A train goes 60 miles per hour for 2 hours. How far does it go?", "120", source="seed"),
    Problem.make("Sam reads 20 pages a day. How many pages does he read in 5 days?", "100", source="seed"),
]


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir):
    from stillhouse.tasks.backends.hf import HFBackend

    backend = HFBackend(tiny_model_dir, dtype="float32", device="cpu", batch_size=8)
    yield backend
    backend.close()


def _recompute(rows):
    per_set: dict[str, list[bool]] = defaultdict(list)
    per_pool: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        (per_pool[r["problem_id"]] if r["eval_set"] == POOL else per_set[r["eval_set"]]).append(r["correct"])
    return per_set, per_pool


@pytest.mark.integration
def test_evaluate_student_on_tiny_model(tiny_backend):
    cfg = EvalConfig(max_new_tokens=16, pool_k=3, pool_temperature=0.8)
    res = evaluate_student(tiny_backend, EVAL, POOL_PROBLEMS, cfg, PromptsConfig(), seed=7)

    assert len(res.rows) == len(EVAL) + cfg.pool_k * len(POOL_PROBLEMS)
    eval_rows = [r for r in res.rows if r["eval_set"] != POOL]
    pool_rows = [r for r in res.rows if r["eval_set"] == POOL]
    assert all(r["sample_index"] == 0 and r["temperature"] == 0.0 for r in eval_rows)
    for p in POOL_PROBLEMS:
        assert sorted(r["sample_index"] for r in pool_rows if r["problem_id"] == p.id) == [0, 1, 2]
    for r in res.rows:
        assert isinstance(r["response"], str) and isinstance(r["correct"], bool)
        assert r["extracted"] is None or isinstance(r["extracted"], str)

    per_set, per_pool = _recompute(res.rows)
    assert res.eval_counts == {"arith": 3, "words": 2}
    assert set(res.accuracy) == {"arith", "words"}
    for name, flags in per_set.items():
        assert res.accuracy[name] == pytest.approx(sum(flags) / len(flags))
    assert set(res.pass_rates) == {p.id for p in POOL_PROBLEMS}
    for pid, rate in res.pass_rates.items():
        assert 0.0 <= rate <= 1.0
        assert rate == pytest.approx(sum(per_pool[pid]) / cfg.pool_k)
    summary = res.summary()
    assert summary["pool_problems"] == 3 and 0.0 <= summary["overall_accuracy"] <= 1.0

    # Same seed -> same samples (the backend seeds every request on its own).
    again = evaluate_student(tiny_backend, EVAL, POOL_PROBLEMS, cfg, PromptsConfig(), seed=7)
    assert [r["response"] for r in again.rows] == [r["response"] for r in res.rows]
    assert [r["seed"] for r in again.rows] == [r["seed"] for r in res.rows]


@pytest.mark.integration
def test_max_eval_problems_keeps_every_eval_set(tiny_backend):
    cfg = EvalConfig(max_new_tokens=4, pool_k=1, max_eval_problems=3)
    res = evaluate_student(tiny_backend, EVAL, [], cfg, PromptsConfig())
    assert res.eval_counts == {"arith": 2, "words": 1} and res.skipped_eval == 2
    assert res.pass_rates == {} and all(r["eval_set"] != POOL for r in res.rows)


@pytest.mark.integration
def test_feedback_round_on_tiny_model_counts_add_up(tiny_backend):
    """evaluate -> split -> synthesize with the tiny model as student and teacher."""
    ev = evaluate_student(
        tiny_backend, EVAL, POOL_PROBLEMS, EvalConfig(max_new_tokens=8, pool_k=2), PromptsConfig()
    )
    split_cfg = SplitConfig()
    split = split_by_pass_rate(ev.pass_rates, split_cfg.easy_threshold, split_cfg.hard_threshold)
    assert sum(split.counts.values()) == len(POOL_PROBLEMS)
    easy = split.select(POOL_PROBLEMS, "easy") or POOL_PROBLEMS[:1]  # make sure both operations run
    hard = split.select(POOL_PROBLEMS, "hard")

    cfg = SynthesisConfig(reference_samples=2, max_new_tokens=48, min_question_chars=5)
    sampling = SamplingConfig(max_new_tokens=16, seed=1)
    res = synthesize(tiny_backend, easy, hard, POOL_PROBLEMS, EVAL, 0, cfg, PromptsConfig(), sampling)

    assert res.generated == len(easy) + len(hard) == len(res.records)
    assert res.generated == res.kept + sum(res.dropped.values())
    assert set(res.dropped) == set(DROP_REASONS)
    for rec in res.records:
        if rec["status"] == "dropped":
            assert rec["reason"] in DROP_REASONS
        else:
            assert rec["status"] == "kept" and rec["reason"] is None and rec["problem_id"]
    for p in res.problems:
        assert p.round_introduced == 1 and p.operation in ("harder", "similar") and p.parent_id
    assert len(res.solutions) == res.kept * cfg.reference_samples


class RightAnswers:
    """Answers `\\boxed{<reference>}` for the given sample indices of each key, nonsense otherwise."""

    name = "scripted"

    def __init__(self, answers: dict[str, str], right: dict[str, set[int]]):
        self.answers, self.right = answers, right

    def sample(self, requests, params, progress=None):
        out = []
        for r in requests:
            q = next(q for q in self.answers if q in r.messages[-1]["content"])
            ok = r.sample_index in self.right.get(q, set())
            text = f"so \\boxed{{{self.answers[q]}}}" if ok else "I do not know"
            out.append(Completion(r.key, r.sample_index, text, 3, 3, "stop"))
        return out

    def close(self):
        pass


@pytest.mark.unit
def test_evaluate_student_arithmetic_with_known_answers():
    answers = {p.question: p.answer for p in EVAL + POOL_PROBLEMS}
    right = {
        EVAL[0].question: {0}, EVAL[1].question: {0}, EVAL[3].question: {0},  # arith 2/3, words 1/2
        POOL_PROBLEMS[0].question: {0, 1, 2, 3},  # 4/4
        POOL_PROBLEMS[1].question: {1},  # 1/4
    }
    cfg = EvalConfig(pool_k=4)
    res = evaluate_student(RightAnswers(answers, right), EVAL, POOL_PROBLEMS, cfg, PromptsConfig())
    assert res.accuracy == {"arith": pytest.approx(2 / 3), "words": pytest.approx(0.5)}
    assert res.overall_accuracy == pytest.approx(3 / 5)
    assert res.pass_rates == {POOL_PROBLEMS[0].id: 1.0, POOL_PROBLEMS[1].id: 0.25, POOL_PROBLEMS[2].id: 0.0}
    split = split_by_pass_rate(res.pass_rates, 0.75, 0.25)
    assert split.labels == {POOL_PROBLEMS[0].id: "easy", POOL_PROBLEMS[1].id: "hard", POOL_PROBLEMS[2].id: "hard"}


@pytest.mark.unit
def test_pool_sampling_uses_its_temperature_and_top_p_and_eval_is_greedy():
    seen = []

    class Recording(RightAnswers):
        def sample(self, requests, params, progress=None):
            seen.append((requests[0].key.split("/")[0], params))
            return super().sample(requests, params, progress)

    answers = {p.question: p.answer for p in EVAL + POOL_PROBLEMS}
    cfg = EvalConfig(pool_k=2, pool_temperature=0.9, pool_top_p=0.8)
    evaluate_student(Recording(answers, {}), EVAL, POOL_PROBLEMS, cfg, PromptsConfig())
    params = dict(seen)
    assert (params["pool"].temperature, params["pool"].top_p) == (0.9, 0.8)  # top_p was 1.0 whatever the config
    assert params["eval"].temperature == 0.0


@pytest.mark.unit
def test_cap_eval_problems_round_robin():
    assert [p.source for p in cap_eval_problems(EVAL, 4)] == ["arith", "arith", "words", "words"]
    assert cap_eval_problems(EVAL, None) == EVAL
    assert cap_eval_problems(EVAL, 99) == EVAL


class WritesProblems:
    """Real backend for everything except the problem-writing prompts, which get fixed problems:
    the tiny model never writes a parseable question, and this test is about the solve-and-vote
    half running on a real model."""

    name = "writes-problems"

    def __init__(self, inner, texts: list[str]):
        self.inner, self.texts = inner, texts

    def sample(self, requests, params, progress=None):
        writing = [i for i, r in enumerate(requests) if "Write a new" in r.messages[-1]["content"]]
        if len(writing) == len(requests):
            return [
                Completion(r.key, r.sample_index, f"Problem: {self.texts[i % len(self.texts)]}", 5, 5, "stop")
                for i, r in enumerate(requests)
            ]
        assert not writing
        return self.inner.sample(requests, params, progress)

    def close(self):
        pass


@pytest.mark.integration
def test_synthesis_votes_with_the_real_model(tiny_backend):
    texts = [
        "A shop sells 14 pencils a day for 6 days, then 9 a day for 3 days. How many pencils in all?",
        "A pool fills at 35 liters a minute and drains at 12. How many liters after 9 minutes?",
        "A shop sells 14 pencils a day for 6 days, then 9 a day for 3 days. How many pencils in all?",
    ]
    cfg = SynthesisConfig(reference_samples=3, agreement_threshold=0.34)
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=5)
    res = synthesize(
        WritesProblems(tiny_backend, texts), POOL_PROBLEMS[:2], POOL_PROBLEMS[2:], POOL_PROBLEMS, EVAL,
        4, cfg, PromptsConfig(), sampling,
    )
    assert res.generated == 3 and res.dropped["duplicate_new"] == 1
    voted = [r for r in res.records if r["agreement"] is not None]
    assert len(voted) == 2  # two distinct problems reached the teacher's vote
    assert res.kept + res.dropped["no_agreement"] == 2
    assert res.generated == res.kept + sum(res.dropped.values())
    for rec in voted:
        assert 0.0 <= rec["agreement"] <= 1.0
    assert len(res.solutions) == res.kept * 3
    for p in res.problems:
        assert p.round_introduced == 5 and p.answer


@pytest.mark.unit
def test_wilson_interval_holds_the_estimate_stays_in_bounds_and_narrows_with_n():
    from stillhouse.tasks.evaluation import wilson_interval

    for n in (1, 4, 6, 30, 500):
        for k in range(0, n + 1, max(1, n // 7)):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert wilson_interval(0, 0) is None
    widths = [wilson_interval(n // 2, n)[1] - wilson_interval(n // 2, n)[0] for n in (6, 60, 600)]
    assert widths[0] > widths[1] > widths[2]
    # 95%: for 50/100 the interval is about +-0.097 (normal approximation +-0.098).
    lo, hi = wilson_interval(50, 100)
    assert hi - lo == pytest.approx(2 * 1.96 * 0.05, rel=0.02)


@pytest.mark.unit
def test_every_shown_accuracy_has_its_interval_and_n():
    from stillhouse.tasks.report import _markdown
    from stillhouse.tasks.run_view import history_markdown, round_markdown

    answers = {p.question: p.answer for p in EVAL + POOL_PROBLEMS}
    res = evaluate_student(RightAnswers(answers, {EVAL[0].question: {0}}), EVAL, POOL_PROBLEMS,
                           EvalConfig(pool_k=1), PromptsConfig())
    s = res.summary()
    assert s["eval_counts"] == {"arith": 3, "words": 2} and s["eval_total"] == 5
    lo, hi = s["accuracy_ci"]["arith"]
    assert lo < 1 / 3 < hi
    metrics = {"round": 0, "teacher_accuracy": 0.5, "student_accuracy": s["accuracy"],
               "eval_counts": s["eval_counts"], "student_overall": s["overall_accuracy"], "eval_total": 5}
    for md in (history_markdown("run", "run-abc123", [metrics], None),
               round_markdown("run", "run-abc123", metrics, [metrics], None, rounds_total=1)):
        assert "0.333 [" in md and "n=3" in md and "n=2" in md and "0.200 [" in md and "n=5" in md
    assert "0.200 [" in _markdown("run", [metrics]) and "n=5" in _markdown("run", [metrics])
