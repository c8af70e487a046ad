"""Verifier: answer extraction, equivalence, the worker pool and its guards, JSONL scoring.

The behaviour table lives in verifier_cases.py (also imported by worker processes). It is run
case by case in process, then whole through worker processes from a thread, in process from a
thread (no signals there), and through a pickle round trip (as TRL's tests/test_rewards.py does).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from stillhouse.tasks.verify import equivalence, pool, score
from stillhouse.tasks.verify.extract import Extraction, extract_answer
from stillhouse.tasks.verify.equivalence import answers_match, normalize_answer
from stillhouse.tasks.verify.jsonl import verify_jsonl
from stillhouse.tasks.verify.score import VerifyInputError, VerifyItem, VerifyResult, score_samples

try:  # tests/ may become a package; worker processes import the module under the same name
    from tests.unit import verifier_cases as vc
except ImportError:
    import verifier_cases as vc

pytestmark = pytest.mark.unit

CASES = vc.CASES


def _check(case: vc.Case, result: VerifyResult) -> list[str]:
    problems = []
    if result.correct != case.correct:
        problems.append(f"correct={result.correct}, expected {case.correct}")
    if case.extracted is not vc.ANY and result.extracted != case.extracted:
        problems.append(f"extracted={result.extracted!r}, expected {case.extracted!r}")
    if (case.id in vc.ERROR_CASES) != (result.error is not None):
        problems.append(f"error={result.error!r}")
    return problems


def _check_all(results: list[VerifyResult]) -> None:
    assert len(results) == len(CASES)
    failures = {c.id: p for c, r in zip(CASES, results) if (p := _check(c, r))}
    assert not failures, failures


# --------------------------------------------------------------------------- the table


def test_table_is_large_and_ids_unique():
    assert len(CASES) >= 150
    assert len({c.id for c in CASES}) == len(CASES)
    assert vc.ERROR_CASES <= {c.id for c in CASES}
    assert {c.correct for c in CASES} == {True, False}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: vc.Case):
    (result,) = score_samples([(case.response, case.reference)], workers=0, timeout_s=5.0)
    assert not _check(case, result), (case, result)


def test_table_through_workers_from_a_thread():
    """Worker processes have their own main thread, so Math-Verify's signal-based limits work
    even when the caller is a thread (Prefect task runners)."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["results"] = score_samples(
                [(c.response, c.reference) for c in CASES], workers=2, timeout_s=5.0
            )
        except BaseException as exc:  # surfaced below
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive()
    assert "error" not in out, out.get("error")
    _check_all(out["results"])


def test_table_in_process_from_a_thread():
    """workers=0 off the main thread: no signals, no time limit; the pre-screen still refuses the
    pathological answers and every verdict is the same."""
    out: dict[str, object] = {}
    t = threading.Thread(
        target=lambda: out.update(
            results=score_samples([VerifyItem(c.response, c.reference) for c in CASES], workers=0)
        )
    )
    t.start()
    t.join(timeout=120)
    assert not t.is_alive()
    _check_all(out["results"])


def test_pickle_round_trip_of_inputs_and_results():
    items = pickle.loads(pickle.dumps([VerifyItem(c.response, c.reference) for c in CASES]))
    results = score_samples(items, workers=0)
    _check_all(results)
    assert pickle.loads(pickle.dumps(results)) == results


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "answer", "method", "format_ok"),
    [
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "boxed", True),
        ("so \\fbox{3}", "3", "boxed", True),
        ("Final Answer: The final answer is $5$. I hope it is correct.", "5", "final_answer_is", True),
        ("The final answer is 12", "12", "final_answer_is", True),
        ("work\n#### 72", "72", "hash", True),
        ("The answer is 42.", "42", "answer_is", True),
        ("**Answer:** 42", "42", "answer_is", True),
        ("She has **18** apples.", "18", "bold", True),
        ("so she has 18 apples", "18", "last_number", False),
        ("nothing here", None, None, False),
        ("", None, None, False),
    ],
)
def test_extraction_methods(text, answer, method, format_ok):
    assert extract_answer(text) == Extraction(answer, method, format_ok)


def test_fallback_can_be_turned_off():
    assert extract_answer("so she has 18 apples", last_number_fallback=False).answer is None
    assert extract_answer("\\boxed{5", last_number_fallback=False).answer is None
    # explicit formats are unaffected
    assert extract_answer("#### 18", last_number_fallback=False).answer == "18"
    (res,) = score_samples([("so 18", "18")], workers=0, last_number_fallback=False)
    assert (res.correct, res.extracted, res.method) == (False, None, None)


def test_extraction_priority_boxed_over_phrases_and_format_flag():
    ext = extract_answer("The answer is 4.\n#### 5\nso \\boxed{6}")
    assert (ext.answer, ext.method) == ("6", "boxed")
    assert extract_answer("The answer is 4.\n#### 5").method == "hash"


@pytest.mark.parametrize(
    "text",
    [
        "1" * 10_000_000,
        "\\boxed{" * 1_000_000,
        "{" * 10_000_000,
        "The answer is " * 700_000,
        "**1" * 3_000_000,
        "a " * 5_000_000 + "The answer is 5",
        "#### " + "9" * 5_000_000,
        "\\boxed{" + "x" * 5_000_000 + "}",
    ],
    ids=["digits", "open-boxes", "braces", "phrases", "bold", "long-prose", "hash-digits", "long-box"],
)
def test_extraction_is_bounded_on_10mb_inputs(text):
    started = time.monotonic()
    ext = extract_answer(text)
    assert time.monotonic() - started < 1.0
    assert ext.answer is None or len(ext.answer) <= 1000


def test_extraction_rejects_non_strings():
    with pytest.raises(TypeError):
        extract_answer(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("1,234", "1234", True),
        ("$1,234", "1234", True),
        ("5.00", "5", True),
        ("1/2", "0.5", True),
        ("-3", "\u22123", True),
        ("5", "500", False),
        ("0.05", "5", False),
        ("1e3", "1000", True),
        ("18 apples", "18", True),
        ("4 2/3", "14/3", True),  # mixed number
    ],
)
def test_plain_numbers_are_decided_without_math_verify(pred, ref, expected, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("Math-Verify called for plain numbers")

    monkeypatch.setattr(score, "_symbolic_match", forbidden)
    assert answers_match(pred, ref, timeout_s=1.0) == (expected, None)


def test_value_words_are_not_units():
    assert not answers_match("2 thousand", "2")[0]
    assert not answers_match("5 pi", "5")[0]
    assert answers_match("5 \\pi", "5\\pi")[0]


def test_percent_is_a_unit_and_never_rescaled():
    """Policy: GSM8K references are in the unit the question asks for, so "5%" answers 5; and
    Math-Verify's rescaling (50% == 0.5) is not applied, so 5 is never 500 nor 0.05."""
    assert answers_match("5%", "5")[0]
    assert answers_match("5.5\\%", "5.5")[0]  # Math-Verify alone says False here
    assert not answers_match("50%", "0.5")[0]  # Math-Verify alone says True here
    assert not answers_match("5%", "0.05")[0]
    assert not answers_match("500", "5%")[0]


def test_decimal_tolerance_policy():
    assert answers_match("0.333333", "\\frac{1}{3}")[0]  # agrees to 6 places
    assert not answers_match("0.333", "\\frac{1}{3}")[0]
    assert not answers_match("0.0000001", "0.0000002")[0]  # tiny numbers do not collapse to 0
    assert not answers_match("\\frac{1}{2004!}", "\\frac{1}{2006!}")[0]


def test_normalize_answer():
    assert normalize_answer(" $\\boxed{5\\%}$. ") == "5"
    assert normalize_answer("\\$1,234") == "1,234"
    assert normalize_answer("\\dfrac{1}{2}") == "\\frac{1}{2}"
    assert normalize_answer("\u22123") == "-3"


def test_time_limit_in_process_on_main_thread():
    started = time.monotonic()
    ok, err = answers_match("\\sum_{k=1}^{100000} k^{k}", "5", timeout_s=0.5)
    assert not ok and err and "timed out" in err
    assert time.monotonic() - started < 3.0


def test_time_limit_restores_an_outer_timer():
    """pytest-timeout (and callers) may have their own SIGALRM timer running."""
    fired = []

    def outer_handler(signum, frame):
        fired.append(signum)

    old = signal.signal(signal.SIGALRM, outer_handler)
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        assert answers_match("x^2+2x+1", "(x+1)^2", timeout_s=5.0) == (True, None)
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 90.0 < left <= 100.0
        assert signal.getsignal(signal.SIGALRM) is outer_handler
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired


def test_time_limit_in_worker_process():
    (res,) = score_samples([("\\boxed{\\sum_{k=1}^{100000} k^{k}}", "5")], workers=1, timeout_s=0.5)
    assert not res.correct
    assert res.error and "timed out" in res.error


# --------------------------------------------------------------------------- injection


def test_model_text_is_never_executed(tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    monkeypatch.delenv("STILLHOUSE_PWNED", raising=False)
    marker = "untouched"
    score.__dict__["_INJECTION_MARKER"] = marker
    payloads = [
        f"__import__('os').system('touch {sentinel}')",
        f"__import__('pathlib').Path('{sentinel}').touch()",
        f"open('{sentinel}', 'w').write('x')",
        "exec(\"import os; os.environ['STILLHOUSE_PWNED']='1'\")",
        "eval(\"__import__('os').environ.__setitem__('STILLHOUSE_PWNED', '1')\")",
        f"(lambda: __import__('subprocess').call(['touch', '{sentinel}']))()",
        "globals().update(_INJECTION_MARKER='pwned')",
        "__import__('stillhouse.tasks.verify.score').tasks.verify.score.__dict__.update(_INJECTION_MARKER='pwned')",
        f"1; import os; os.system('touch {sentinel}')",
        f"{{}}.__class__.__base__.__subclasses__()",
    ]
    wrappers = ["{}", "\\boxed{{{}}}", "The answer is {}", "#### {}", "$\\boxed{{{}}}$ and 1"]
    responses = [w.format(p) for p in payloads for w in wrappers]

    # Spy on the one place where Math-Verify hands text to sympy's parse_expr: only digits and
    # operators may ever get there, never model text.
    import math_verify.parser as mvp

    seen: list[str] = []
    real_parse_expr = mvp.parse_expr
    monkeypatch.setattr(mvp, "parse_expr", lambda s, **kw: (seen.append(s), real_parse_expr(s, **kw))[1])
    mvp.parse_expr_cached.cache_clear()
    equivalence._parse.cache_clear()

    for resp in responses:
        assert not answers_match(resp, "424242", timeout_s=2.0)[0]
    results = score_samples([(r, "424242") for r in responses], workers=0, timeout_s=2.0)
    assert not any(r.correct for r in results)
    results = score_samples([(r, "424242") for r in responses], workers=1, timeout_s=2.0)
    assert not any(r.correct for r in results)

    assert not sentinel.exists()
    assert "STILLHOUSE_PWNED" not in os.environ
    assert score.__dict__["_INJECTION_MARKER"] == marker
    assert all(re.fullmatch(r"[\d\s.+\-*/^()×÷]*", s) for s in seen), seen
    del score.__dict__["_INJECTION_MARKER"]


@pytest.mark.parametrize(
    "answer",
    ["(10)^{(10)^{(10)}}", "10^{9}!", "10^{9}!!", "\\binom{10^9}{10^5}", "{10^9 \\choose 10^5}",
     "\\Gamma(10^8)", "\\Gamma\\left(10^{8}\\right)", "(10^{10})^{10^{10}}"],
)
def test_prescreen_refuses_huge_values_before_math_verify(answer, monkeypatch):
    """Issue 16: these used to pass the pre-screen and cost the whole time limit each. Math-Verify
    must not even be asked (it would be, and hang until the limit, without the screen)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("Math-Verify parse reached for a pathological answer")

    monkeypatch.setattr(equivalence, "_parse", forbidden)
    ok, err = answers_match(answer, "5", timeout_s=30.0)
    assert not ok and err and err.startswith("answer refused:"), err


@pytest.mark.parametrize("answer", ["(foo: 1)()", "(\uff4c\uff41\uff4d\uff42\uff44\uff41: 1)()", "f()", "(x := 1)"])
def test_code_shaped_answers_are_refused_after_nfkc(answer):
    ok, err = answers_match(answer, "1", timeout_s=5.0)
    assert not ok and err and "program code" in err


def test_unclosed_box_after_a_phrase_gets_neither_credit_nor_format_bonus():
    (res,) = score_samples([("The answer is \\boxed{42", "42")], workers=0)
    assert (res.correct, res.format_ok, res.extracted) == (False, False, None)
    assert "unclosed" in res.error


# --------------------------------------------------------------------------- pool and guards


def test_hard_guard_recovers_from_hung_and_dead_workers():
    tasks = [(i, "same", "same") for i in range(12)]
    tasks[3] = (3, "HANG", "x")  # blocks SIGALRM: only the parent's hard guard can stop it
    tasks[7] = (7, "DIE", "x")  # the worker process exits mid-chunk
    tasks[9] = (9, "RAISE", "x")  # an exception inside the item function
    started = time.monotonic()
    out = pool._run_pool(tasks, timeout_s=0.5, workers=2, item_fn=vc.echo_item, chunk_size=6)
    assert time.monotonic() - started < 30
    assert set(out) == set(range(12))
    assert out[3][0] is False and "hard time limit" in out[3][1]
    assert out[7][0] is False and "died" in out[7][1]
    assert out[9] == (False, "ValueError: boom")
    assert all(out[i] == (True, None) for i in range(12) if i not in (3, 7, 9))


def test_score_samples_input_forms_and_bad_items():
    results = score_samples(
        [
            VerifyItem("#### 5", "5"),
            ("#### 5", "5"),
            ["#### 5", 5],  # numeric references (JSON datasets) are accepted
            ("#### 5", 5.0),
            (None, "5"),
            ("#### 5", None),
            ("#### 5",),
        ],
        workers=0,
    )
    assert [r.correct for r in results] == [True, True, True, True, False, False, False]
    assert all(r.error is None for r in results[:4])
    assert all(r.error for r in results[4:])


def test_empty_input():
    assert score_samples([]) == []


def test_cache_checks_each_distinct_pair_once(monkeypatch):
    calls: list[tuple[str, str]] = []
    real = score._symbolic_match

    def counting(pred, ref, timeout_s):
        calls.append((pred, ref))
        return real(pred, ref, timeout_s)

    monkeypatch.setattr(score, "_symbolic_match", counting)
    # (single letters such as x vs y are decided on the fast path since issue 17: use x+1 vs y+1)
    items = [("\\boxed{\\frac{\\sqrt2}{2}}", "\\frac{1}{\\sqrt2}")] * 6 + [("\\boxed{x+1}", "y+1")] * 2
    first = score_samples(items, workers=0)
    assert len(calls) == 2
    calls.clear()
    assert score_samples(items, workers=0, cache=False) == first
    assert len(calls) == 8
    assert [r.correct for r in first] == [True] * 6 + [False] * 2


# --------------------------------------------------------------------------- JSONL


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_verify_jsonl_scores_good_rows_and_reports_bad_ones(tmp_path):
    src = _write_lines(
        tmp_path / "in.jsonl",
        [
            json.dumps({"id": "a", "reference": "72", "response": "... #### 72"}),
            json.dumps({"id": "b", "reference": "72", "response": "The answer is 71."}),
            json.dumps({"id": "c", "response": "#### 5"}),
            "{not json",
            "",
            json.dumps([1, 2]),
            json.dumps({"id": "f", "reference": "\\frac12", "response": "so $\\boxed{0.5}$"}),
            json.dumps({"id": "g", "reference": "5", "response": 5}),
            json.dumps({"id": "h", "reference": 18, "response": "she has 18 apples"}),
        ],
    )
    out = tmp_path / "out.jsonl"
    summary = verify_jsonl(src, out, workers=0, reward_fn=lambda c, f: (1.0 if c else 0.0) + (0.1 if f else 0.0))
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8  # the blank line is skipped
    by_id = {r.get("id"): r for r in rows if "id" in r}
    assert by_id["a"]["correct"] is True and by_id["a"]["reward"] == pytest.approx(1.1)
    assert by_id["a"]["extracted"] == "72" and by_id["a"]["error"] is None
    assert by_id["b"]["correct"] is False and by_id["b"]["reward"] == pytest.approx(0.1)
    assert by_id["c"]["error"] == "row 3: missing field 'reference'"
    assert by_id["c"]["correct"] is False and by_id["c"]["reward"] == 0.0
    assert by_id["f"]["correct"] is True
    assert "row 8" in by_id["g"]["error"] and "response" in by_id["g"]["error"]
    assert by_id["h"]["correct"] is True and by_id["h"]["reward"] == pytest.approx(1.0)  # fallback
    bad = [r for r in rows if "id" not in r]
    assert [r["row"] for r in bad] == [4, 6]
    assert "invalid JSON" in bad[0]["error"] and "not a JSON object" in bad[1]["error"]
    assert summary["rows"] == 8 and summary["scored"] == 4 and summary["bad_rows"] == 4
    assert summary["correct"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_verify_jsonl_default_reward_and_overwrite(tmp_path):
    src = _write_lines(tmp_path / "in.jsonl", [json.dumps({"reference": "3", "response": "\\boxed{3}"})])
    out = tmp_path / "out.jsonl"
    out.write_text("old content\n")
    verify_jsonl(src, out, workers=0)
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row == {"reference": "3", "response": "\\boxed{3}", "extracted": "3", "correct": True,
                   "reward": 1.0, "error": None}
    nested = tmp_path / "a" / "b" / "out.jsonl"  # missing folders are created
    assert verify_jsonl(src, nested, workers=0)["correct"] == 1 and nested.exists()


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_verify_jsonl_unreadable_input_raises(tmp_path, kind):
    path = tmp_path / "nope.jsonl" if kind == "missing" else tmp_path
    with pytest.raises(VerifyInputError, match="cannot read"):
        verify_jsonl(path, tmp_path / "out.jsonl", workers=0)
    assert not (tmp_path / "out.jsonl").exists()
