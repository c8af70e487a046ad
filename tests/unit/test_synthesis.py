"""Synthesis: parsing teacher output, dedup, contamination, majority vote, and the counted pipeline.

The pipeline test uses a scripted backend (fixed texts per prompt): the test is about parsing,
filtering, voting and bookkeeping, not about a model. The real model runs in
tests/integration/test_evaluation.py.
"""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from stillhouse.tasks.backends.base import Completion
from stillhouse.tasks.config import PromptsConfig, SamplingConfig, SynthesisConfig
from stillhouse.tasks.problems import Problem
from stillhouse.tasks.synthesis.dedup import ContaminationIndex, DedupIndex, jaccard, word_ngrams
from stillhouse.tasks.synthesis.parse import parse_generated_problem
from stillhouse.tasks.synthesis.synthesize import DROP_REASONS, synthesize
from stillhouse.tasks.synthesis.vote import verifier_equivalence, vote
from stillhouse.tasks.verify.numbers import numeric_value


def majority_answer(answers, threshold, *, use_verifier=True, workers=0):
    """(answer, agreement) as synthesize() votes: value/text groups, merged by the verifier."""
    equivalent = verifier_equivalence([answers], workers=workers) if use_verifier else None
    v = vote(answers, threshold, equivalent=equivalent)
    return v.answer, v.agreement

pytestmark = pytest.mark.unit

CFG = SynthesisConfig()  # min 20 chars, max 1200, 3-grams, dedup 0.7, contamination 8-grams
PARENT = "Tom has 5 apples and buys 3 more. How many apples does Tom have now?"
COWS = "A farmer has 30 cows and sells a third of them. How many cows remain?"
MUFFINS = "A baker bakes 48 muffins and sells 3/4 of them. How many are left?"

# --------------------------------------------------------------------------- parse

PARSE_CASES = [
    # (id, teacher text, expected question or None, expected reason or None)
    ("prefix", f"Problem: {COWS}", COWS, None),
    ("no_prefix", COWS, COWS, None),
    ("chatter_then_prefix_then_solution",
     f"Sure! Here's a harder version of the problem:\n\nProblem: {COWS}\n\nSolution: 30/3 = 10, so 20.",
     COWS, None),
    ("chatter_line_no_prefix", f"Here is a new problem of similar difficulty:\n{COWS}", COWS, None),
    ("chatter_same_line", f"Sure! Here's the problem: {MUFFINS}", MUFFINS, None),
    ("bold_new_problem", f"**New problem:** {COWS}\n\n**Solution:** 30/3 = 10, 30 - 10 = 20", COWS, None),
    ("markdown_headings", f"### Harder Problem\n{COWS}\n### Solution\n20", COWS, None),
    ("inline_answer", f"{COWS} Answer: 20", COWS, None),
    ("gsm_answer_line", "A farmer has 30 cows and sells a third of them. Find the number left.\n#### 20",
     "A farmer has 30 cows and sells a third of them. Find the number left.", None),
    ("code_fence", f"```\nProblem: {COWS}\n```", COWS, None),
    ("think_block", f"<think>let me vary the numbers</think>Problem: {MUFFINS}", MUFFINS, None),
    ("two_problems_keep_first", f"Problem 1: {MUFFINS}\nProblem 2: {COWS}", MUFFINS, None),
    ("quoted", f'"{MUFFINS}"', MUFFINS, None),
    ("imperative_no_question_mark", "Compute the sum of all positive divisors of $360$.",
     "Compute the sum of all positive divisors of $360$.", None),
    ("latex_final_answer", "Question: Let $f(x)=x^2+3x$. Evaluate $f(f(1))$.\nFinal Answer: 28",
     "Let $f(x)=x^2+3x$. Evaluate $f(f(1))$.", None),
    ("multiline_kept", "Problem: A shop sells pens at $2 each.\nAnn buys 7 pens.\nHow much does she pay?",
     "A shop sells pens at $2 each.\nAnn buys 7 pens.\nHow much does she pay?", None),
    ("empty", "", None, "empty"),
    ("whitespace", "  \n\t ", None, "empty"),
    ("only_solution", "Solution: 12 + 3 = 15. The answer is 15.", None, "empty"),
    ("unfinished_think", "<think>I should write a problem about", None, "empty"),
    ("too_short", "Problem: Why?", None, "too_short"),
    ("too_long", "Problem: " + "A farmer has 30 cows. " * 100 + "How many?", None, "too_long"),
    ("no_question", "A farmer has 30 cows. He likes cows very much and his farm is big.",
     None, "not_a_question"),
    ("copy_of_parent", PARENT, None, "copy_of_parent"),
    ("copy_with_prefix_and_case", "Problem: " + PARENT.upper(), None, "copy_of_parent"),
    ("near_copy_of_parent",
     "Tom has 5 apples and buys 3 more. How many apples does Tom have now in total?",
     None, "copy_of_parent"),
]


@pytest.mark.parametrize(("text", "question", "reason"), [c[1:] for c in PARSE_CASES],
                         ids=[c[0] for c in PARSE_CASES])
def test_parse_generated_problem(text, question, reason):
    assert parse_generated_problem(text, PARENT, CFG) == (question, reason)


def test_parse_none_text_is_empty():
    assert parse_generated_problem(None, PARENT, CFG) == (None, "empty")


def test_parse_limits_come_from_config():
    cfg = SynthesisConfig(min_question_chars=200)
    assert parse_generated_problem(COWS, PARENT, cfg) == (None, "too_short")
    cfg = SynthesisConfig(max_question_chars=30)
    assert parse_generated_problem(COWS, PARENT, cfg) == (None, "too_long")


def test_harder_variant_with_new_numbers_is_not_a_copy():
    harder = ("Tom has 15 apples and buys 7 more, then gives half of all his apples to Ann. "
              "How many apples does Tom keep?")
    assert parse_generated_problem(harder, PARENT, CFG) == (harder, None)


# --------------------------------------------------------------------------- n-grams, dedup

def test_word_ngrams_and_jaccard():
    assert word_ngrams("A b, C d!", 3) == {("a", "b", "c"), ("b", "c", "d")}
    assert word_ngrams("one two", 3) == {("one", "two")}  # shorter than n: one whole gram
    assert word_ngrams("", 3) == frozenset()
    a, b = word_ngrams("a b c d", 2), word_ngrams("a b c e", 2)  # {ab, bc, cd} vs {ab, bc, ce}
    assert jaccard(a, b) == pytest.approx(2 / 4)


def test_dedup_exact_is_whitespace_insensitive():
    idx = DedupIndex(3, 0.7).add_all([("p1", COWS), ("p2", MUFFINS)])
    m = idx.match("  A farmer has 30 cows  and sells a third\nof them. How many cows remain?")
    assert (m.key, m.kind, m.score) == ("p1", "exact", 1.0)


def test_dedup_near_duplicate_found_and_scored():
    idx = DedupIndex(3, 0.7).add_all([("p1", COWS), ("p2", MUFFINS)])
    near = "A farmer has 30 cows and sells a third of them. How many cows remain now?"
    m = idx.match(near)
    assert m.key == "p1" and m.kind == "near"
    # 13 of the 14 grams shared, the new text has one more gram: 13 / (13 + 14 - 13) ... by hand:
    assert m.score == pytest.approx(jaccard(word_ngrams(near, 3), word_ngrams(COWS, 3)))
    assert m.score >= 0.7
    assert idx.match(near.upper()).key == "p1"  # case does not matter for near duplicates


def test_dedup_different_problem_is_not_a_duplicate():
    idx = DedupIndex(3, 0.7).add_all([("p1", COWS), ("p2", MUFFINS)])
    assert idx.match("A farmer has 45 goats and sells two fifths of them. How many goats does he keep?") is None
    assert idx.match("") is None


def test_dedup_threshold_edge():
    # "a b c d" vs "a b c e" with 2-grams: Jaccard exactly 0.5
    assert DedupIndex(2, 0.5).add_all([("x", "a b c d")]).match("a b c e").key == "x"
    assert DedupIndex(2, 0.51).add_all([("x", "a b c d")]).match("a b c e") is None


def test_dedup_among_new_grows_with_adds():
    idx = DedupIndex(3, 0.7)
    assert idx.match(COWS) is None
    idx.add("new-1", COWS)
    assert idx.match(COWS.replace("remain?", "remain now?")).key == "new-1"
    assert len(idx) == 1


def test_dedup_picks_closest_of_several():
    idx = DedupIndex(2, 0.3).add_all([("far", "a b c d e f"), ("close", "a b c d e g")])
    assert idx.match("a b c d e g h").key == "close"


# --------------------------------------------------------------------------- contamination

EVAL_Q = "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning. How much does she make?"


def test_contamination_shared_8gram_is_flagged():
    idx = ContaminationIndex([("ev1", EVAL_Q)], 8)
    cand = "Bob has a farm. Janet's ducks lay 16 eggs per day. She eats none. How many eggs are left?"
    assert idx.match(cand) == "ev1"


def test_contamination_only_7_shared_words_is_clean():
    idx = ContaminationIndex([("ev1", EVAL_Q)], 8)
    # "janet s ducks lay 16 eggs per" is 7 words; the 8th differs
    cand = "Janet's ducks lay 16 eggs per week. How many eggs do they lay in a year?"
    assert idx.match(cand) is None


def test_contamination_case_and_punctuation_do_not_hide_a_match():
    idx = ContaminationIndex.from_problems(
        [Problem.make(EVAL_Q, "18", source="gsm8k", split="eval")], 8
    )
    assert idx.match("JANET'S DUCKS LAY 16 EGGS, PER DAY; SHE EATS three for lunch. How many?") is not None


def test_contamination_short_eval_question_embedded_or_exact():
    idx = ContaminationIndex([("short", "What is 7 times 8?")], 8)
    assert idx.match("What is 7 times 8?") == "short"
    assert idx.match("Ann asks: what is 7 times 8? Then add 4. What do you get?") == "short"
    assert idx.match("What is 7 times 9? Then add 4.") is None


# --------------------------------------------------------------------------- majority vote

def test_numeric_value_forms():
    assert numeric_value("1,000") == numeric_value("1000") == Fraction(1000)
    assert numeric_value("$12.50") == Fraction(25, 2)
    assert numeric_value("3/4") == numeric_value("\\frac{3}{4}") == numeric_value("0.75")
    assert numeric_value("-2") == Fraction(-2)
    assert numeric_value("12.") == Fraction(12)
    assert numeric_value("x+1") is None
    assert numeric_value("1,00") is None  # not a thousands grouping
    assert numeric_value("1/0") is None


@pytest.mark.parametrize(
    ("answers", "threshold", "expected"),
    [
        (["1,000", "1000", "1000.0", "999"], 0.5, ("1000", 0.75)),  # numeric equivalence
        (["7", "7", None, None], 0.5, ("7", 0.5)),  # Nones count against; 0.5 >= 0.5 keeps it
        (["7", "7", None, None], 0.51, (None, 0.5)),  # just below the threshold
        (["7", "7", "8", "8"], 0.5, (None, 0.5)),  # tie: no reference
        (["7", "7", "8", "8", "9"], 0.2, (None, 0.4)),  # tie at the top even under a low threshold
        (["7", "7", "7", "8", "8"], 0.6, ("7", 0.6)),  # 3/5 == 0.6 exactly
        ([None, None, None], 0.1, (None, 0.0)),
        ([], 0.5, (None, 0.0)),
        (["5"], 1.0, ("5", 1.0)),
        (["$5", "5", " 5 ", "5."], 1.0, ("5", 1.0)),
        (["A", "a", "B"], 0.6, ("A", 2 / 3)),  # text answers: case/space-insensitive
        (["1/2", "0.5", "\\frac{1}{2}", "2"], 0.7, ("1/2", 0.75)),
    ],
)
def test_majority_answer_table(answers, threshold, expected):
    ans, agreement = majority_answer(answers, threshold, use_verifier=False)
    assert (ans, agreement) == (expected[0], pytest.approx(expected[1]))


def test_vote_members_and_representative():
    v = vote(["1,000", "1,000", "1000", None, "12"], 0.5)
    assert v.answer == "1000"  # most common surface form, commas dropped for plain numbers
    assert v.in_majority == (True, True, True, False, False)
    assert v.clusters == 2 and not v.tie and v.agreement == pytest.approx(0.6)


def test_vote_merges_text_groups_with_an_equivalence_check():
    same = {frozenset({"x+1", "1+x"})}

    def equivalent(a, b):
        return frozenset({a, b}) in same

    assert vote(["x+1", "1+x", "x-1"], 0.6).answer is None  # plain text: three groups
    v = vote(["x+1", "1+x", "x-1"], 0.6, equivalent=equivalent)
    assert v.answer == "x+1" and v.agreement == pytest.approx(2 / 3)


def test_vote_equivalence_errors_mean_not_equal():
    def boom(a, b):
        raise TimeoutError("verifier timed out")

    v = vote(["x+1", "1+x", "1+x"], 0.5, equivalent=boom)
    assert v.answer == "1+x" and v.agreement == pytest.approx(2 / 3)


def test_vote_never_asks_equivalence_between_two_numbers():
    calls = []
    vote(["1", "2", "x"], 0.5, equivalent=lambda a, b: calls.append((a, b)) or False)
    assert ("1", "2") not in calls and len(calls) == 2


def test_majority_answer_with_the_real_verifier():
    answers = ["x+1", "1+x", "x + 1", "2x"]
    # text grouping alone: {x+1, x + 1} vs {1+x} vs {2x} -> 2/4
    assert majority_answer(answers, 0.5, use_verifier=False) == ("x+1", 0.5)
    # Math-Verify merges 1+x into x+1 -> 3/4
    ans, agreement = majority_answer(answers, 0.5, workers=0)
    assert ans == "x+1" and agreement == pytest.approx(0.75)


# --------------------------------------------------------------------------- the pipeline


class ScriptedBackend:
    """Returns texts chosen by what the last user message contains (the test is not about a model).

    gen: parent question -> generated text; solve: candidate question -> one text per sample index.
    """

    name = "scripted"

    def __init__(self, gen: dict[str, str], solve: dict[str, list[str]]):
        self.gen, self.solve = gen, solve
        self.calls = []

    def sample(self, requests, params, progress=None):
        self.calls.append((list(requests), params))
        out = []
        for r in requests:
            content = r.messages[-1]["content"]
            text = next((v[r.sample_index % len(v)] for k, v in self.solve.items() if k in content), None)
            if text is None:
                text = next((v for k, v in self.gen.items() if k in content), "")
            out.append(Completion(r.key, r.sample_index, text, 10, 5, "stop"))
            if progress:
                progress(len(out), len(requests))
        return out

    def close(self):
        pass


def P(q, a="1", source="gsm", **kw):
    return Problem.make(q, a, source=source, **kw)


E1 = P(PARENT, "8")
E2 = P("A box holds 12 eggs. How many eggs are in 4 boxes?", "48")
E3 = P("A cat sleeps 16 hours a day. How many hours does it sleep in a week?", "112")
E4 = P("Lily has 3 red balloons and 4 blue ones. How many balloons in all?", "7")
H1 = P("A train travels 60 miles per hour for 2.5 hours. How far does it travel?", "150")
H2 = P("Sam reads 20 pages a day. How many days to read a 300 page book?", "15")
H3 = P("A pizza has 8 slices. Ann eats 3. What fraction of the pizza is left?", "5/8")
H4 = P("A tank holds 50 liters and leaks 2 liters an hour. When is it empty?", "25")
MID = P("A shirt costs $20 and is on sale for 25% off. What is the sale price?", "15")
EVAL = P(EVAL_Q, "18", source="gsm8k-test", split="eval")

NEW_E1 = "Tom has 15 apples and buys 985 more, then counts them. How many apples does Tom have now in all?"
NEW_H1 = "A car drives 50 miles per hour for 3 hours. How many miles does the car cover?"
NEW_E2 = "A crate holds 24 boxes of 12 eggs each. How many eggs are in 5 crates?"

GEN = {
    E1.question: f"Sure! Here is a harder version:\n\nProblem: {NEW_E1}\n\nSolution: 15 + 985 = 1000",
    H1.question: f"**New problem:** {NEW_H1}",
    E2.question: f"Problem: {NEW_E2}",
    H2.question: "Problem: Sam reads many pages every day and enjoys his books a lot.",  # not a question
    E3.question: "Problem: Janet's ducks lay 16 eggs per day. She eats two. How many remain?",  # eval 8-gram
    H3.question: f"Problem: {MID.question}",  # duplicate of a pool problem
    E4.question: "",  # empty
    H4.question: f"Problem: {NEW_E2}",  # the same as E2's new problem: duplicate among new ones
}
SOLVE = {
    NEW_E1: ["So \\boxed{1,000}", "Total \\boxed{1000}", "\\boxed{1000}", "\\boxed{999}"],
    NEW_H1: ["\\boxed{150}", "\\boxed{150}", "I am not sure", "\\boxed{150}"],
    NEW_E2: ["\\boxed{1440}", "\\boxed{1440}", "\\boxed{1200}", "\\boxed{60}"],  # 2/4 < 0.6
}
POOL = [E1, E2, E3, E4, H1, H2, H3, H4, MID]
SCFG = SynthesisConfig(reference_samples=4, agreement_threshold=0.6, temperature=0.9, max_new_tokens=64)
SAMPLING = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=128, seed=3)


@pytest.fixture
def run():
    def _run(cfg=SCFG, **kw):
        backend = ScriptedBackend(GEN, SOLVE)
        res = synthesize(
            backend, [E1, E2, E3, E4], [H1, H2, H3, H4], POOL, [EVAL], 2, cfg, PromptsConfig(), SAMPLING,
            **kw,
        )
        return res, backend

    return _run


def test_synthesize_counts_every_generation(run):
    res, _ = run()
    assert res.generated == 8 == len(res.records)
    assert res.kept == 2
    assert res.generated == res.kept + sum(res.dropped.values())
    assert set(res.dropped) == set(DROP_REASONS)
    assert {r: c for r, c in res.dropped.items() if c} == {
        "no_agreement": 1, "not_a_question": 1, "contaminated": 1,
        "duplicate_pool": 1, "empty": 1, "duplicate_new": 1,
    }
    by_parent = {r["parent_id"]: r for r in res.records}
    assert by_parent[E2.id]["reason"] == "no_agreement"
    assert by_parent[H4.id]["reason"] == "duplicate_new"  # E2 came first in candidate order
    assert by_parent[H3.id]["reason"] == "duplicate_pool" and MID.id in by_parent[H3.id]["detail"]
    assert by_parent[E3.id]["reason"] == "contaminated" and EVAL.id in by_parent[E3.id]["detail"]
    for rec in res.records:
        assert (rec["status"] == "kept") == (rec["reason"] is None)
        assert rec["status"] in ("kept", "dropped")
    assert res.counts["kept_by_operation"] == {"harder": 1, "similar": 1}


def test_synthesize_lineage_and_references(run):
    res, _ = run()
    harder, similar = res.problems  # candidate order: E1 (harder) before H1 (similar)
    assert harder.question == NEW_E1 and harder.answer == "1000"
    assert (harder.parent_id, harder.operation, harder.round_introduced) == (E1.id, "harder", 3)
    assert similar.question == NEW_H1 and similar.answer == "150"
    assert (similar.parent_id, similar.operation, similar.round_introduced) == (H1.id, "similar", 3)
    for p in res.problems:
        assert p.split == "train" and p.source == "gsm/synth"
        assert p.id == Problem.make(p.question, p.answer, source="x").id
        assert json.loads(p.meta)["agreement"] == pytest.approx(0.75)


def test_synthesize_solution_rows_for_kept_problems(run):
    res, _ = run()
    assert len(res.solutions) == 2 * SCFG.reference_samples
    rows = {(r["problem_id"], r["sample_index"]): r for r in res.solutions}
    harder, similar = res.problems
    assert [rows[(harder.id, i)]["correct"] for i in range(4)] == [True, True, True, False]
    assert [rows[(similar.id, i)]["correct"] for i in range(4)] == [True, True, False, True]
    assert rows[(similar.id, 2)]["extracted"] is None


def test_synthesize_sampling_params_and_seeds(run):
    res, backend = run()
    (gen_reqs, gen_params), (solve_reqs, solve_params) = backend.calls
    assert (gen_params.temperature, gen_params.max_new_tokens) == (0.9, 64)
    assert (solve_params.temperature, solve_params.top_p, solve_params.max_new_tokens) == (0.7, 0.9, 128)
    assert len(gen_reqs) == 8 and len(solve_reqs) == 3 * 4  # 3 candidates reach the vote
    assert len({r.seed for r in gen_reqs + solve_reqs}) == len(gen_reqs) + len(solve_reqs)
    res2, backend2 = run()
    assert [r.seed for r in backend2.calls[0][0]] == [r.seed for r in gen_reqs]
    assert res2.problems == res.problems
    _, backend3 = run(seed=99)
    assert [r.seed for r in backend3.calls[0][0]] != [r.seed for r in gen_reqs]


def test_synthesize_cap_drops_as_over_cap(run):
    res, _ = run(SCFG.model_copy(update={"max_per_round": 1}))
    assert res.kept == 1 and res.problems[0].question == NEW_E1
    assert res.dropped["over_cap"] == 1
    assert res.generated == res.kept + sum(res.dropped.values())


def test_synthesize_disabled_or_nothing_to_do(run):
    res, backend = run(SCFG.model_copy(update={"enabled": False}))
    assert (res.generated, res.kept, backend.calls) == (0, 0, [])
    backend = ScriptedBackend({}, {})
    res = synthesize(backend, [], [], POOL, [EVAL], 0, SCFG, PromptsConfig(), SAMPLING)
    assert (res.generated, res.kept, sum(res.dropped.values()), backend.calls) == (0, 0, 0, [])


def test_synthesize_source_suffix_not_repeated():
    parent = P(H1.question, "150", source="gsm/synth", round_introduced=1)
    backend = ScriptedBackend({H1.question: f"Problem: {NEW_H1}"}, SOLVE)
    res = synthesize(backend, [], [parent], [parent], [], 1, SCFG, PromptsConfig(), SAMPLING)
    assert [p.source for p in res.problems] == ["gsm/synth"]


def test_synthesize_vote_uses_the_verifier_for_symbolic_answers():
    from stillhouse.tasks.config import VerifierConfig

    q = "Let $n$ be a positive integer. Find a closed form for $n$ plus one, in terms of $n$."
    backend = ScriptedBackend(
        {H1.question: f"Problem: {q}"},
        {q: ["\\boxed{n+1}", "\\boxed{1+n}", "\\boxed{2n}", "\\boxed{n + 1}"]},
    )
    res = synthesize(
        backend, [], [H1], [H1], [], 0, SCFG, PromptsConfig(), SAMPLING, verifier=VerifierConfig(workers=0)
    )
    # text grouping alone gives {n+1, n + 1}: 2/4 < 0.6; Math-Verify adds 1+n: 3/4
    assert [p.answer for p in res.problems] == ["n+1"]
    assert [r["correct"] for r in res.solutions] == [True, True, False, True]
