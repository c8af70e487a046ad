"""Rule-based verifier: is a model's final answer equal to the reference answer?

Pipeline per sample (score_samples):

1. extract   stillhouse.tasks.verify.extract.extract_answer finds the final answer (boxed, ####, ...).
2. fast path In the calling process: normalise both answers; identical strings, or two plain
             numbers ("1,234", "$5.00", "50%", "1/2", "-3", "\\frac{3}{4}"), are decided exactly
             with fractions.Fraction. This settles almost every GSM8K sample without sympy.
3. symbolic  Everything else goes to Math-Verify (parse both sides with LaTeX + expression
             extraction, then verify), in worker processes, once per distinct (answer, reference)
             pair: the N samples of a problem often share answers.

Safety: model text is never executed. Nothing here calls eval/exec/sympify/parse_expr; the only way
from model text into sympy is Math-Verify's parser. Huge or pathological answers (10^{10^{10}},
100k-digit numbers, deep nesting) are refused by a cheap pre-screen or stopped by a time limit and
come back as correct=False with an error, never as a hang.

Time limits, and why not Math-Verify's own: Math-Verify's `parsing_timeout` / `timeout_seconds`
use signal.alarm with whole seconds, give parse(pred), parse(ref) and verify a separate budget each
(so an item may take three times the limit), and turn a timeout into a silent `False` (we want an
error message). We call Math-Verify with both set to None and wrap the whole item in one
setitimer-based limit (`_time_limit`), which is also signal-based and so only works on a process's
main thread. Worker processes run items on their main thread. On top of that the parent is a hard
guard: a worker that reports no progress for `timeout_s + max(2, timeout_s)` seconds (a hang in C
code that no signal interrupts) or that dies is killed and replaced; the item it was on gets
correct=False with an error and the rest of its chunk is re-queued.

workers=0 runs in process. On the main thread the same time limit applies; off the main thread
(Prefect task runners, the tests) signals are unavailable, so an item has no time limit there and
only the pre-screen protects against pathological input. Prefer workers >= 1 (the default) there:
worker processes have their own main thread and the full protection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import re
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from pathlib import Path
from typing import Any

from stillhouse.tasks.verify.extract import MAX_ANSWER_CHARS, Extraction, extract_answer, unwrap_boxed

__all__ = [
    "VerifyItem",
    "VerifyResult",
    "VerifyInputError",
    "ItemTimeout",
    "extract_answer",
    "Extraction",
    "normalize_answer",
    "answers_match",
    "score_samples",
    "verify_jsonl",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyItem:
    response: str
    reference: str


@dataclass(frozen=True)
class VerifyResult:
    """Verdict for one sample. error is None unless something went wrong (timeout, bad input, ...);
    a plain wrong or missing answer is correct=False with error=None."""

    extracted: str | None
    correct: bool
    format_ok: bool
    error: str | None
    method: str | None


class VerifyInputError(OSError):
    """The input file of verify_jsonl cannot be read."""


class ItemTimeout(BaseException):
    """Raised from SIGALRM inside `_time_limit`. A BaseException so that the `except Exception`
    blocks in Math-Verify and sympy cannot swallow it."""


# --------------------------------------------------------------------------- normalisation

_OUTER_MATH = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
# Percent is treated as a unit and dropped on both sides, never rescaled: "5%" matches 5, and 5%
# does not match 0.05 (a GSM8K reference "5" is in the unit the question asked for).
_PERCENT_SUFFIX = re.compile(r"(?:\s*(?:\\%|%|\\text\{\s*\\?%\s*\})|\s+percent)$", re.IGNORECASE)


_SIZING = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![A-Za-z])\s*")
# TeX reads "\frac12" as \frac{1}{2} and "\sqrt2" as \sqrt{2}: one-character arguments.
_SHORT_ARGS = re.compile(r"\\(d?frac|sqrt)\s*(\d)(\d)?")


def _brace_short_args(m: re.Match[str]) -> str:
    if m.group(1) == "sqrt":
        return f"\\sqrt{{{m.group(2)}}}" + (m.group(3) or "")
    if m.group(3) is None:
        return m.group(0)  # "\frac1{x}": leave to Math-Verify
    return f"\\{m.group(1)}{{{m.group(2)}}}{{{m.group(3)}}}"


def normalize_answer(answer: str) -> str:
    """Strip presentation that never changes the value: outer $...$ or \\boxed{}, a sentence period,
    currency dollars, a trailing percent sign, unicode minus, \\dfrac/\\tfrac, \\! spacing."""
    s = answer.strip()
    if len(s) > 2 * MAX_ANSWER_CHARS:
        return s  # refused as too long anyway; keeps the regex work bounded
    for _ in range(4):  # a few layers, e.g. "$\boxed{5\%}$."
        before = s
        if s.endswith(".") and not s.endswith(".."):
            s = s[:-1].rstrip()
        for opener, closer in _OUTER_MATH:
            if s.startswith(opener) and s.endswith(closer) and len(s) >= len(opener) + len(closer):
                s = s[len(opener) : len(s) - len(closer)].strip()
                break
        s = unwrap_boxed(s)
        s = _PERCENT_SUFFIX.sub("", s).strip()
        if s == before:
            break
    s = s.replace("\u2212", "-").replace("\\!", "")
    s = _SIZING.sub("", s)  # \left( -> (
    s = _SHORT_ARGS.sub(_brace_short_args, s)  # \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    # Outer math delimiters are gone; any $ left is a currency sign (or a stray delimiter).
    s = s.replace("\\$", "").replace("$", "")
    return s.strip()


# --------------------------------------------------------------------------- fast exact path

# Trailing unit words are dropped ("18 apples", "5 \text{ cm}", "90^\circ") unless the word changes
# the value or is maths.
_VALUE_WORDS = frozenset(
    "pi and or to of sqrt times cdot mod div plus minus over squared cubed half halves thousand "
    "thousands million millions billion billions trillion hundred hundreds dozen dozens percent "
    "infinity inf".split()
)
_DEGREES = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|°|\\degree)\s*$")
_TEXT_UNIT = re.compile(r"\s*\\(?:text|textbf|mbox|mathrm)\s*\{\s*([A-Za-z][A-Za-z .]*)\}\s*$")
_WORD_UNIT = re.compile(r"\s+([A-Za-z]{2,})\.?\s*$")
_DECIMAL = re.compile(
    r"(?P<sign>[-+]?)\s*"
    r"(?:(?P<int>\d{1,3}(?:(?:,|\{,\}|\\,)\d{3})+|\d+)(?:\.(?P<frac>\d*))?|\.(?P<frac_only>\d+))"
    r"(?:[eE](?P<exp>[-+]?\d{1,3}))?"
)
_FRACTION = re.compile(
    r"(?P<sign>[-+]?)\s*(?:(?P<whole>\d+)(?:\s+(?=\d+\s*/)|\s*(?=\\frac)))?(?:"
    r"\\frac\s*\{\s*(?P<n1>\d+)\s*\}\s*\{\s*(?P<d1>\d+)\s*\}"
    r"|\\frac(?P<n2>\d)(?P<d2>\d)"
    r"|(?P<n3>\d+)\s*/\s*(?P<d3>\d+))"
)
# Two decimals that round to the same 6 places are equal (what Math-Verify does for floats, so
# 0.333333 matches 1/3), but only if they also agree to 1e-5 relative: tiny numbers must not all
# collapse to 0.
_ABS_TOL = Fraction(1, 2_000_000)
_REL_TOL = Fraction(1, 100_000)


def _strip_units(s: str) -> str:
    for _ in range(3):
        before = s
        s = _DEGREES.sub("", s)
        m = _TEXT_UNIT.search(s)
        if m and not any(w.lower() in _VALUE_WORDS for w in m.group(1).split()):
            s = s[: m.start()]
        m = _WORD_UNIT.search(s)
        if m and m.group(1).lower() not in _VALUE_WORDS:
            s = s[: m.start()]
        s = s.strip()
        if s == before:
            break
    return s


def plain_number(answer: str) -> tuple[Fraction, bool] | None:
    """(exact value, written_as_decimal) if a normalised answer is a plain number, else None."""
    s = _strip_units(answer)
    m = _DECIMAL.fullmatch(s)
    if m:
        int_part = re.sub(r"\{,\}|\\,|,", "", m.group("int") or "") or "0"
        frac_part = m.group("frac") or m.group("frac_only") or ""
        value = Fraction(int(int_part + frac_part), 10 ** len(frac_part))
        if m.group("exp"):
            value *= Fraction(10) ** int(m.group("exp"))
        approx = bool(frac_part) or m.group("exp") is not None
        return (-value if m.group("sign") == "-" else value), approx
    m = _FRACTION.fullmatch(s)
    if m:
        num = int(m.group("n1") or m.group("n2") or m.group("n3"))
        den = int(m.group("d1") or m.group("d2") or m.group("d3"))
        if den == 0:
            return None
        value = Fraction(num, den)
        if m.group("whole"):
            if num >= den:  # "4 5/3" is not a mixed number; let Math-Verify read it
                return None
            value += int(m.group("whole"))  # mixed number: 4 2/3 = 14/3
        return (-value if m.group("sign") == "-" else value), False
    return None


def _numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    if a[0] == b[0]:
        return True
    if not (a[1] or b[1]):  # both exact (integers, fractions): exact comparison only
        return False
    diff = abs(a[0] - b[0])
    return diff <= _ABS_TOL and diff <= _REL_TOL * max(abs(a[0]), abs(b[0]))


_Num = tuple[Fraction, bool]
_INF = re.compile(r"([-+]?)\s*\\infty")
_SEQUENCE = re.compile(r"(\(|\[|\\\{)(.*)(\)|\]|\\\})", re.DOTALL)


def _sequence_element(s: str) -> _Num | str | None:
    s = s.strip()
    m = _INF.fullmatch(s)
    if m:
        return "-oo" if m.group(1) == "-" else "oo"
    return plain_number(s)


_LESS = r"(<|\\le(?:q|qslant)?(?![A-Za-z])|≤)"
_GREATER = r"(>|\\ge(?:q|qslant)?(?![A-Za-z])|≥)"
_NUM_TEXT = r"([-+]?\s*[\d.,/]+|[-+]?\s*\\frac\{\d+\}\{\d+\})"
_CHAIN = re.compile(rf"{_NUM_TEXT}\s*{_LESS}\s*[A-Za-z]\s*{_LESS}\s*{_NUM_TEXT}")
_UPPER = re.compile(rf"[A-Za-z]\s*{_LESS}\s*{_NUM_TEXT}")
_LOWER = re.compile(rf"[A-Za-z]\s*{_GREATER}\s*{_NUM_TEXT}")


def _relation_as_interval(answer: str) -> tuple[str, tuple[_Num | str, ...]] | None:
    """"2 < x \\le 5" -> ("(]", (2, 5)); "x > 3" -> ("()", (3, oo)). Only increasing chains."""
    def strict(op: str) -> bool:
        return op in "<>"

    if m := _CHAIN.fullmatch(answer):
        lo, op1, op2, hi = plain_number(m.group(1)), m.group(2), m.group(3), plain_number(m.group(4))
        if lo is None or hi is None or not lo[0] < hi[0]:
            return None
        return ("(" if strict(op1) else "[") + (")" if strict(op2) else "]"), (lo, hi)
    if m := _UPPER.fullmatch(answer):
        hi = plain_number(m.group(2))
        return (None if hi is None else ("(" + (")" if strict(m.group(1)) else "]"), ("-oo", hi)))
    if m := _LOWER.fullmatch(answer):
        lo = plain_number(m.group(2))
        return (None if lo is None else (("(" if strict(m.group(1)) else "[") + ")", (lo, "oo")))
    return None


def plain_sequence(answer: str) -> tuple[str, tuple[_Num | str, ...]] | None:
    """(kind, elements) if a normalised answer is a tuple, interval or set of plain numbers.

    kind: "()" (open interval or point: the same comparison either way), "[]", "[)", "(]"
    (intervals), or "set" for \\{a, b\\} and bare lists "a, b" (Math-Verify reads both as sets).
    """
    if any(c in answer for c in "<>≤≥") or "\\le" in answer or "\\ge" in answer:
        return _relation_as_interval(answer)
    m = _SEQUENCE.fullmatch(answer)
    if m:
        opener, inner, closer = m.groups()
        if (opener == "\\{") != (closer == "\\}"):
            return None
        kind = "set" if opener == "\\{" else opener + closer
    elif ", " in answer:  # "1,234" is a number, "1, 234" a list
        kind, inner = "set", answer
    else:
        return None
    parts = inner.split(",")
    if kind not in ("set", "()") and len(parts) != 2:
        return None
    elements = tuple(_sequence_element(p) for p in parts)
    if any(e is None for e in elements) or len(elements) < (1 if kind == "set" else 2):
        return None
    return kind, elements  # type: ignore[return-value]


def _elements_equal(a: _Num | str, b: _Num | str) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return _numbers_equal(a, b)


def _sequences_equal(a: tuple[str, tuple], b: tuple[str, tuple]) -> bool | None:
    """Same comparison as Math-Verify for sequences of the same kind and for intervals; None for a
    set against a tuple/interval (Math-Verify has special rules there, e.g. (1, 2) matches 1, 2)."""
    if a[0] != b[0]:
        if a[0] != "set" and b[0] != "set" and len(a[1]) == len(b[1]) == 2:
            return False  # two intervals with different brackets: (5, 8) is not [5, 8)
        return None
    if a[0] != "set":
        return len(a[1]) == len(b[1]) and all(map(_elements_equal, a[1], b[1]))
    # Sets: every element of one has an equal element in the other (duplicates collapse).
    return all(any(_elements_equal(x, y) for y in b[1]) for x in a[1]) and all(
        any(_elements_equal(x, y) for x in a[1]) for y in b[1]
    )


def _quick_verdict(pred: str, ref: str) -> tuple[bool, str | None] | None:
    """Decide without sympy when possible (both arguments normalised). None = needs Math-Verify."""
    if not ref:
        return False, "empty reference"
    if not pred:
        return False, None
    if len(pred) > MAX_ANSWER_CHARS:
        return False, f"answer longer than {MAX_ANSWER_CHARS} chars"
    if len(ref) > MAX_ANSWER_CHARS:
        return False, f"reference longer than {MAX_ANSWER_CHARS} chars"
    if pred == ref or ("," not in pred and pred.replace(" ", "") == ref.replace(" ", "")):
        return True, None  # (not for commas: "1, 234" is a list, "1,234" a number)
    a, b = plain_number(pred), plain_number(ref)
    if a is not None and b is not None:
        return _numbers_equal(a, b), None
    # Tuples, intervals and sets of plain numbers, and a number against a set ("find all": a
    # partial answer 1 for {1, 2} is wrong; 1 for {1} is right).
    sa = ("set", (a,)) if a is not None else plain_sequence(pred)
    sb = ("set", (b,)) if b is not None else plain_sequence(ref)
    if sa is not None and sb is not None:
        same = _sequences_equal(sa, sb)
        if same is not None:
            return same, None
    return None


# --------------------------------------------------------------------------- pre-screen

_MAX_NESTING = 20
# Math-Verify's LaTeX grammar is exponential in runs of bare braces: "{{{{{{{{{{1}}}}}}}}}}" alone
# takes seconds; real answers never open more than a few braces in a row.
_BRACE_RUN = re.compile(r"\{(?:\s*\{){4,}")
_MAX_DIGITS = 10_000  # a number with more digits than this is not a real final answer
_NUMERIC_TOWER = re.compile(r"\d+(?:\s*(?:\^|\*\*)\s*[{(]?\s*\d+)+")
# What a "!" applies to: "100000!", "(10^{10})!", "{10^{6}}!".
_FACTORIAL_ARG = re.compile(r"(?:\(([^()]{1,200})\)|\{([^{}]{1,200})\}|(\d+))\s*!")
_MAX_FACTORIAL = 100_000


# Program text is not an answer. Math-Verify would find "=1" in "globals().update(PWNED=1)" and
# call it correct, so code-shaped answers are refused before parsing (nothing is ever executed).
_CODE_LIKE = re.compile(
    r"__|\bimport\s+\w|(?<!\\)\blambda\b|"  # not LaTeX's \lambda
    r"(?<!\\)\b(?:exec|eval|compile|globals|locals|getattr|setattr|open|system|popen|print)\s*\(|"
    r"\)\s*\.\s*[A-Za-z_]\w*\s*\(|\b[A-Za-z_]\w*\.[A-Za-z_]\w*\s*\("
)


def _tower_log10(nums: list[int]) -> float:
    """log10 of nums[0] ** nums[1] ** ... (right-associative); inf when astronomically large."""
    top = nums[-1]
    log_value = math.log10(top) if top > 0 else -math.inf
    for base in reversed(nums[:-1]):
        if base <= 1 or log_value == -math.inf:
            log_value = -math.inf if base == 0 else 0.0
            continue
        if log_value > 300:  # the exponent alone has more than 300 digits
            return math.inf
        log_value = (10.0**log_value) * math.log10(base)
    return log_value


def _pathology(s: str) -> str | None:
    """Why a (normalised) answer is unsafe to hand to sympy, or None. Cheap; O(len(s))."""
    if _CODE_LIKE.search(s):
        return "looks like program code, not an answer"
    depth = deepest = 0
    for c in s:
        if c in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "})]":
            depth -= 1
    if deepest > _MAX_NESTING or _BRACE_RUN.search(s):
        return f"nested too deeply (depth {deepest})"
    for m in _NUMERIC_TOWER.finditer(s):
        nums = [int(x) for x in re.findall(r"\d+", m.group())]
        if _tower_log10(nums) > _MAX_DIGITS:
            return f"number with more than {_MAX_DIGITS} digits"
    for m in _FACTORIAL_ARG.finditer(s):
        arg = next(g for g in m.groups() if g is not None).strip()
        if not re.fullmatch(r"[\d\s^*{}()]+", arg):
            continue  # symbolic, e.g. (n+1)!
        nums = [int(x) for x in re.findall(r"\d+", arg)]
        if _tower_log10(nums) > math.log10(_MAX_FACTORIAL):
            return f"factorial of a number above {_MAX_FACTORIAL}"
    return None


# --------------------------------------------------------------------------- time limit


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise ItemTimeout in the block after `seconds` (SIGALRM via setitimer; float seconds).

    A no-op off the main thread, where signals cannot be used. An outer timer that was running
    (e.g. pytest-timeout's) is restored with the time it had left.
    """
    if (
        not seconds
        or seconds <= 0
        or threading.current_thread() is not threading.main_thread()
        or not hasattr(signal, "setitimer")
    ):
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise ItemTimeout()

    old_handler = signal.signal(signal.SIGALRM, _raise)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            left = max(old_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, old_interval)


# --------------------------------------------------------------------------- Math-Verify path


@lru_cache(maxsize=1)
def _math_verify() -> tuple[Any, list[Any]]:
    """Import Math-Verify lazily: the fast path and extraction do not need sympy."""
    import math_verify
    import math_verify.grader
    import math_verify.parser

    # We pass parsing_timeout=None / timeout_seconds=None and enforce our own limit (module
    # docstring); without this each process would log Math-Verify's "timeout is disabled" warning.
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    config = [math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig()]
    return math_verify, config


@lru_cache(maxsize=4096)
def _parse(answer: str) -> tuple[Any, ...]:
    """Math-Verify parse of one normalised answer; cached because references repeat N times.

    The answer is wrapped in \\boxed{} so Math-Verify treats all of it as the answer (it would
    otherwise search it for an answer, e.g. take the last number of "1, 2").
    """
    mv, config = _math_verify()
    return tuple(mv.parse("\\boxed{" + answer + "}", extraction_config=config, parsing_timeout=None))


def _magnitudes_agree(gold: Sequence[Any], pred: Sequence[Any]) -> bool:
    """Guard against Math-Verify's numeric comparison chopping tiny differences to zero.

    Math-Verify evaluates (a - b) with chop=True, so 1/2004! "equals" 1/2006!. For two constant
    expressions we require agreement to 1e-5 relative. Anything we cannot evaluate is left alone.
    """
    import sympy

    g = next((x for x in gold if isinstance(x, sympy.Expr)), None)
    p = next((x for x in pred if isinstance(x, sympy.Expr)), None)
    if g is None or p is None or g.free_symbols or p.free_symbols:
        return True
    try:
        gv, pv = g.evalf(30), p.evalf(30)
        scale = max(abs(gv), abs(pv))
        if scale == 0:
            return True
        return bool(abs(gv - pv) <= sympy.Float("1e-5") * scale)
    except (TypeError, ValueError, ArithmeticError, AttributeError):
        return True


def _symbolic_match(pred: str, ref: str, timeout_s: float | None) -> tuple[bool, str | None]:
    for side, text in (("answer", pred), ("reference", ref)):
        problem = _pathology(text)
        if problem:
            return False, f"{side} refused: {problem}"
    try:
        with _time_limit(timeout_s):
            mv, _ = _math_verify()
            gold = _parse(ref)
            if not gold:
                return False, "reference could not be parsed"
            target = _parse(pred)
            if not target:
                return False, None
            # allow_set_relation_comp: "2 < x < 5" answers "(2, 5)" (Math-Verify only allows it when
            # the prediction is the set).
            ok = mv.verify(
                list(gold), list(target), timeout_seconds=None, allow_set_relation_comp=True
            )
            if ok and not _magnitudes_agree(gold, target):
                ok = False
            return bool(ok), None
    except ItemTimeout:
        return False, f"timed out after {timeout_s:g}s"
    except RecursionError:
        return False, "expression too deeply nested"
    except Exception as exc:  # a verifier bug must cost one sample, not the batch
        log.debug("verification failed for %.80r vs %.80r", pred, ref, exc_info=True)
        return False, f"{type(exc).__name__}: {exc}"[:300]


def answers_match(
    predicted: str, reference: str, timeout_s: float | None = 5.0
) -> tuple[bool, str | None]:
    """(is `predicted` the same answer as `reference`, error message or None).

    Both are answer strings (already extracted), LaTeX or plain. Plain numbers are compared exactly
    here; everything else goes through Math-Verify within `timeout_s` (main thread only: off it
    there is no time limit, see module docstring).
    """
    pred, ref = normalize_answer(predicted), normalize_answer(reference)
    quick = _quick_verdict(pred, ref)
    if quick is not None:
        return quick
    return _symbolic_match(pred, ref, timeout_s)


# --------------------------------------------------------------------------- worker pool

_Task = tuple[int, str, str]  # (key index, predicted, reference)
_ItemFn = Callable[[str, str, float], tuple[bool, str | None]]
_STARTUP_LIMIT_S = 120.0
_MAX_START_FAILURES = 3

_ctx_lock = threading.Lock()
_ctx: Any = None


def _mp_context() -> Any:
    """forkserver where available: workers fork from a server that already imported sympy and
    Math-Verify (a pool starts in milliseconds, not seconds), and, unlike plain fork, it is safe
    when the caller has threads (Prefect task runners, the tests)."""
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            if "forkserver" in multiprocessing.get_all_start_methods():
                _ctx = multiprocessing.get_context("forkserver")
                _ctx.set_forkserver_preload(["stillhouse.tasks.verify.verifier", "math_verify"])
            else:
                _ctx = multiprocessing.get_context("spawn")
    return _ctx


def _prestart_workers_context() -> None:
    """Start the forkserver now, so that its imports (sympy, Math-Verify: seconds) overlap with the
    caller's extraction work instead of delaying the first worker. Once per process; best effort."""
    ctx = _mp_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        try:
            forkserver.ensure_running()
        except Exception:  # the pool start will report real problems
            log.debug("verifier: could not pre-start the forkserver", exc_info=True)


def _worker_main(conn: Connection, item_fn: _ItemFn, timeout_s: float) -> None:
    """Worker process: check tasks one by one, sending each verdict as soon as it is known, so the
    parent can tell which task a hung or dead worker was on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    try:
        conn.send(("ready", os.getpid()))
        while (chunk := conn.recv()) is not None:
            for idx, pred, ref in chunk:
                try:
                    ok, err = item_fn(pred, ref, timeout_s)
                except Exception as exc:
                    ok, err = False, f"{type(exc).__name__}: {exc}"[:300]
                conn.send((idx, bool(ok), err))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass


@dataclass
class _Worker:
    process: Any
    conn: Connection
    started: float
    ready: bool = False
    pending: deque[_Task] = field(default_factory=deque)
    last_progress: float = 0.0


def _start_worker(ctx: Any, item_fn: _ItemFn, timeout_s: float) -> _Worker:
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    proc = ctx.Process(
        target=_worker_main, args=(child_conn, item_fn, timeout_s), daemon=True, name="stillhouse-verifier"
    )
    proc.start()
    child_conn.close()  # so the parent sees EOF when the worker dies
    return _Worker(proc, parent_conn, started=time.monotonic())


def _stop_worker(w: _Worker, *, kill: bool) -> None:
    if kill:
        w.process.kill()
    w.process.join(timeout=5)
    w.conn.close()


class _PoolUnavailable(Exception):
    """Worker processes cannot be started here (e.g. the caller's __main__ is not importable)."""


def _run_pool(
    tasks: list[_Task],
    *,
    timeout_s: float,
    workers: int,
    item_fn: _ItemFn = answers_match,
    chunk_size: int | None = None,
) -> dict[int, tuple[bool, str | None]]:
    """Run item_fn over tasks in `workers` processes with a hard per-item guard (module docstring).

    Returns {task index: (ok, error)} for every task. item_fn must be a top-level function. If
    workers cannot be started at all, the remaining tasks run in this process (logged).
    """
    results: dict[int, tuple[bool, str | None]] = {}
    if not tasks:
        return results
    n = max(1, min(workers, len(tasks)))
    size = chunk_size or max(1, min(64, math.ceil(len(tasks) / (n * 4))))
    queue: deque[list[_Task]] = deque(tasks[i : i + size] for i in range(0, len(tasks), size))
    hard_limit = timeout_s + max(2.0, timeout_s)
    ctx = _mp_context()
    pool: list[_Worker] = []
    start_failures = 0

    def start() -> None:
        nonlocal start_failures
        try:
            pool.append(_start_worker(ctx, item_fn, timeout_s))
        except OSError as exc:
            start_failures += 1
            log.warning("verifier: cannot start a worker process: %s", exc)
            if start_failures > _MAX_START_FAILURES:
                raise _PoolUnavailable(str(exc)) from exc

    def retire(w: _Worker, reason: str) -> None:
        """Kill w; its current task fails with `reason`, the rest of its chunk is re-queued."""
        nonlocal start_failures
        _stop_worker(w, kill=True)
        pool.remove(w)
        if w.pending:
            culprit = w.pending.popleft()
            results[culprit[0]] = (False, reason)
            log.warning("verifier: %s (answer %.80r)", reason, culprit[1])
            if w.pending:
                queue.appendleft(list(w.pending))
        elif not w.ready:
            start_failures += 1
            if start_failures > _MAX_START_FAILURES:
                raise _PoolUnavailable(reason)
        if queue:
            start()

    try:
        for _ in range(min(n, len(queue))):
            start()
        while len(results) < len(tasks):
            now = time.monotonic()
            for w in pool:
                if w.ready and not w.pending and queue:
                    chunk = queue.popleft()
                    w.conn.send(chunk)
                    w.pending.extend(chunk)
                    w.last_progress = now
            deadlines = [
                w.last_progress + hard_limit if w.pending else w.started + _STARTUP_LIMIT_S
                for w in pool
                if w.pending or not w.ready
            ]
            wait_s = max(0.0, min(deadlines, default=now + 1.0) - now)
            for conn in wait_connections([w.conn for w in pool], timeout=wait_s):
                w = next(w for w in pool if w.conn is conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    w.process.join(timeout=1)
                    code = w.process.exitcode
                    retire(w, f"verifier worker died (exit code {code}) on this answer"
                           if w.ready else f"verifier worker exited at start (exit code {code})")
                    continue
                if msg[0] == "ready":
                    w.ready = True
                    continue
                idx, ok, err = msg
                w.pending.popleft()
                results[idx] = (ok, err)
                w.last_progress = time.monotonic()
            now = time.monotonic()
            for w in list(pool):
                if w.pending and now - w.last_progress > hard_limit:
                    retire(w, f"hard time limit: worker killed after {hard_limit:g}s on this answer")
                elif not w.ready and now - w.started > _STARTUP_LIMIT_S:
                    retire(w, f"verifier worker not ready after {_STARTUP_LIMIT_S:g}s")
            if not pool and queue:
                start()
    except _PoolUnavailable as exc:
        # Typical cause: the caller's __main__ cannot be re-imported by the workers (code piped to
        # `python -`). Scoring must not fail for that; it just loses the process isolation.
        log.warning("verifier: worker processes unavailable (%s); checking %d answers in process",
                    exc, len(tasks) - len(results))
        for idx, pred, ref in tasks:
            if idx not in results:
                results[idx] = item_fn(pred, ref, timeout_s)
    finally:
        for w in pool:
            with contextlib.suppress(OSError, ValueError):
                w.conn.send(None)
        for w in pool:
            w.process.join(timeout=2)
            _stop_worker(w, kill=w.process.is_alive())
    return results


# --------------------------------------------------------------------------- scoring


def _as_pair(item: Any) -> tuple[str, str] | str:
    """(response, reference) from a VerifyItem or a 2-sequence, or an error message."""
    if isinstance(item, VerifyItem):
        response, reference = item.response, item.reference
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        response, reference = item
    else:
        return f"expected VerifyItem or (response, reference), got {type(item).__name__}"
    if not isinstance(response, str):
        return f"response must be a string, got {type(response).__name__}"
    # JSON datasets often store GSM8K references as numbers.
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        reference = str(reference)
    if not isinstance(reference, str):
        return f"reference must be a string or number, got {type(reference).__name__}"
    return response, reference


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def score_samples(
    items: Iterable[VerifyItem] | Iterable[tuple[str, str]],
    *,
    last_number_fallback: bool = True,
    timeout_s: float = 5.0,
    workers: int | None = None,
    cache: bool = True,
) -> list[VerifyResult]:
    """Verify every (response, reference); results in input order.

    Extraction and the fast path run here; the rest goes to Math-Verify in `workers` processes
    (None = one per available core, 0 = in this process: see the module docstring for the
    time-limit trade-off). cache: check each distinct (answer, reference) pair once per call.
    """
    items = list(items)
    if items and workers != 0 and not multiprocessing.current_process().daemon:
        _prestart_workers_context()
    results: list[VerifyResult | None] = [None] * len(items)
    extractions: dict[int, Extraction] = {}
    pairs: list[tuple[str, str]] = []  # distinct (answer, reference) for Math-Verify
    owners: list[list[int]] = []  # owners[k]: the items that share pairs[k]
    index: dict[tuple[str, str], int] = {}
    for i, item in enumerate(items):
        pair = _as_pair(item)
        if isinstance(pair, str):
            results[i] = VerifyResult(None, False, False, pair, None)
            continue
        response, reference = pair
        ext = extractions[i] = extract_answer(response, last_number_fallback=last_number_fallback)
        if ext.answer is None:
            results[i] = VerifyResult(None, False, ext.format_ok, ext.error, ext.method)
            continue
        key = (normalize_answer(ext.answer), normalize_answer(reference))
        quick = _quick_verdict(*key)
        if quick is not None:
            results[i] = VerifyResult(ext.answer, quick[0], ext.format_ok, quick[1], ext.method)
        elif cache and key in index:
            owners[index[key]].append(i)
        else:
            index[key] = len(pairs)
            pairs.append(key)
            owners.append([i])

    if pairs:
        log.debug("verifier: %d samples; %d need Math-Verify as %d pairs",
                  len(items), sum(map(len, owners)), len(pairs))
    for (ok, err), group in zip(_check_symbolic(pairs, timeout_s, workers), owners, strict=True):
        for i in group:
            ext = extractions[i]
            results[i] = VerifyResult(ext.answer, ok, ext.format_ok, err, ext.method)
    return results  # type: ignore[return-value]  # every slot is filled


def _check_symbolic(
    pairs: list[tuple[str, str]], timeout_s: float, workers: int | None
) -> list[tuple[bool, str | None]]:
    if not pairs:
        return []
    n_workers = _default_workers() if workers is None else workers
    if n_workers > 0 and multiprocessing.current_process().daemon:
        log.warning("verifier: daemon processes cannot start workers; checking in process")
        n_workers = 0
    if n_workers == 0:
        if threading.current_thread() is not threading.main_thread():
            log.debug("verifier: in process off the main thread: no per-item time limit")
        return [_symbolic_match(p, r, timeout_s) for p, r in pairs]
    tasks = [(i, p, r) for i, (p, r) in enumerate(pairs)]
    done = _run_pool(tasks, timeout_s=timeout_s, workers=n_workers, item_fn=_symbolic_match)
    return [done[i] for i in range(len(tasks))]


# --------------------------------------------------------------------------- JSONL


def _row_error(row: dict[str, Any], message: str) -> dict[str, Any]:
    return {**row, "extracted": None, "correct": False, "reward": 0.0, "error": message}


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], list[tuple[int, VerifyItem]]]:
    """Output rows (bad ones already filled in) and (row position, item) for the good ones."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise VerifyInputError(f"cannot read verifier input {path}: {exc.strerror or exc}") from exc
    out: list[dict[str, Any]] = []
    todo: list[tuple[int, VerifyItem]] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            out.append(_row_error({"row": lineno}, f"row {lineno}: invalid JSON ({exc})"))
            continue
        if not isinstance(row, dict):
            out.append(_row_error({"row": lineno}, f"row {lineno}: not a JSON object"))
            continue
        missing = [f for f in ("reference", "response") if f not in row or row[f] is None]
        if missing:
            fields = ", ".join(repr(f) for f in missing)
            out.append(_row_error(row, f"row {lineno}: missing field {fields}"))
            continue
        pair = _as_pair((row["response"], row["reference"]))
        if isinstance(pair, str):
            out.append(_row_error(row, f"row {lineno}: {pair}"))
            continue
        todo.append((len(out), VerifyItem(*pair)))
        out.append(row)
    return out, todo


def _write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    """Temp file in the destination folder, fsync, then os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def verify_jsonl(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    last_number_fallback: bool = True,
    timeout_s: float = 5.0,
    workers: int | None = None,
    reward_fn: Callable[[bool, bool], float] | None = None,
) -> dict[str, Any]:
    """Score a JSONL file of {reference, response} rows; write each row plus extracted, correct,
    reward and error to out_path (atomically). Bad rows get an error naming the row and field
    and reward 0.0; the others are scored. Raises VerifyInputError if in_path cannot be read.

    reward_fn(correct, format_ok) -> float; default 1.0 / 0.0 on correctness.
    """
    started = time.monotonic()
    out_path = Path(out_path)
    rows, todo = _read_rows(Path(in_path))
    scores = score_samples(
        [item for _, item in todo],
        last_number_fallback=last_number_fallback,
        timeout_s=timeout_s,
        workers=workers,
    )
    for (pos, _), res in zip(todo, scores, strict=True):
        reward = reward_fn(res.correct, res.format_ok) if reward_fn else float(res.correct)
        rows[pos] = {
            **rows[pos],
            "extracted": res.extracted,
            "correct": res.correct,
            "reward": float(reward),
            "error": res.error,
        }
    _write_jsonl_atomic(out_path, rows)
    n_correct = sum(r.correct for r in scores)
    return {
        "rows": len(rows),
        "scored": len(todo),
        "bad_rows": len(rows) - len(todo),
        "correct": n_correct,
        "accuracy": n_correct / len(todo) if todo else 0.0,
        "format_ok": sum(r.format_ok for r in scores),
        "errors": sum(1 for r in rows if r.get("error")),
        "seconds": round(time.monotonic() - started, 3),
        "output": str(out_path),
    }
