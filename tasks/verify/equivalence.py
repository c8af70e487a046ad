"""Are two extracted answers the same? Normalisation, the exact fast path, and Math-Verify.

`answers_match` is the whole check for one pair; the scorer (score.py) runs the fast path in the
calling process and `_symbolic_match` in worker processes (pool.py). See score.py's docstring for
the pipeline and why the time limit is ours, not Math-Verify's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import re
import signal
import threading
import time
import unicodedata
from collections.abc import Iterator, Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Any

from stillhouse.tasks.verify.extract import _CODE_LIKE, MAX_ANSWER_CHARS, unwrap_boxed
from stillhouse.tasks.verify.numbers import decimal_comma_value, numbers_equal, plain_number, trailing_unit

log = logging.getLogger(__name__)


class ItemTimeout(BaseException):
    """Raised from SIGALRM inside `_time_limit`. A BaseException so that the `except Exception`
    blocks in Math-Verify and sympy cannot swallow it."""


# --------------------------------------------------------------------------- normalisation

_OUTER_MATH = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
# Percent is treated as a unit and dropped on both sides, never rescaled: "5%" matches 5, and 5%
# does not match 0.05 (a GSM8K reference "5" is in the unit the question asked for).
_PERCENT_SUFFIX = re.compile(r"(?:\s*(?:\\%|%|\\text\{\s*\\?%\s*\})|\s+percent)$", re.IGNORECASE)


# Thousands separators between digit groups inside math: "10,\!455", "70{,}000", "1\,234".
_DIGIT_GROUP_SEP = re.compile(r"(?<=\d)(?:,\\!\s*|\{,\}|\{,\s\}|\\,|\\!)(?=\d{3}(?!\d))")
# An answer that is all one text group: "\text{Evelyn}", "\mathrm{E}", "\textbf{odd}".
_WHOLE_TEXT = re.compile(r"\\(?:text|textbf|textnormal|textit|mathrm|mbox)\s*\{([^{}\\$]*)\}")
_CHOICE = re.compile(r"\(\s*([A-Za-z])\s*\)")  # "(C)" is the choice C
_WORD = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")
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
    s = _DIGIT_GROUP_SEP.sub("", s)
    s = s.replace("\u2212", "-").replace("\\!", "").replace("\\cfrac", "\\frac")
    m = _WHOLE_TEXT.fullmatch(s)
    if m:  # policy: \text{E} is the bare E, \text{13} the number 13 (docs/verifier.md)
        s = m.group(1).strip()
    m = _CHOICE.fullmatch(s)
    if m:
        s = m.group(1)
    s = _SIZING.sub("", s)  # \left( -> (
    s = _SHORT_ARGS.sub(_brace_short_args, s)  # \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    # Outer math delimiters are gone; any $ left is a currency sign (or a stray delimiter).
    s = s.replace("\\$", "").replace("$", "")
    return s.strip()



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
    return numbers_equal(a, b)


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


def _words_verdict(pred: str, ref: str) -> bool | None:
    """Text answers (normalised: \\text{} already unwrapped). Single letters are symbols or choices
    and compare case-sensitively (E is not e); words of three or more letters ("Even", "odd",
    "Monday") compare case-insensitively. None when this is not a text answer.

    >>> _words_verdict("Even", "even"), _words_verdict("E", "e"), _words_verdict("x+1", "x")
    (True, False, None)
    """
    if not (_WORD.fullmatch(pred) and _WORD.fullmatch(ref)):
        return None
    if len(pred) <= 2 or len(ref) <= 2:
        # Symbols and choices; "ab" vs "ba" could be a product, but also the segments AB and BA:
        # not sure, so not equal (a miss rather than a false positive).
        return pred == ref
    return pred.lower() == ref.lower()


def quick_verdict(pred: str, ref: str) -> tuple[bool, str | None] | None:
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
        units = trailing_unit(pred), trailing_unit(ref)
        if None not in units and units[0] != units[1]:
            return False, None  # policy: "5 cm" does not answer "5 m" (docs/verifier.md)
        return numbers_equal(a, b), None
    words = _words_verdict(pred, ref)
    if words is not None:
        return words, None
    if b is not None and (comma := decimal_comma_value(pred, ref)) is not None:
        return numbers_equal((comma, True), b), None  # "2,5" answers 2.5 (docs/verifier.md)
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
# A power tower of literal numbers, with any grouping around the powers: "10^{10^{10}}",
# "(10)^{(10)^{(10)}}", "(10^{10})^{10^{10}}", "2**3**4". The grouping is read as right-associative
# powers, which can only overestimate: a tower refused here is huge either way.
_TOWER = r"\d+(?:[)}\]\s]*(?:\^|\*\*)[\s{(\[]*\d+)*"
_NUMERIC_TOWER = re.compile(r"\d+(?:[)}\]\s]*(?:\^|\*\*)[\s{(\[]*\d+)+")
# What a "!" applies to: "100000!", "(10^{10})!", "{10^{6}}!", "10^{9}!", "10^{9}!!".
_FACTORIAL_ARG = re.compile(r"(?:\(([^()]{1,200})\)|\{([^{}]{1,200})\}|(" + _TOWER + r")[)}\]\s]*)\s*!")
# Gamma(x) is (x - 1)!: "\Gamma(10^8)", "\Gamma\left(10^{8}\right)" (sizing is normalised away).
_GAMMA_ARG = re.compile(r"\\Gamma\s*[({\[]\s*(" + _TOWER + r")")
# Binomial coefficients of literal numbers: "\binom{10^9}{10^5}", "{10^9 \choose 10^5}".
_BINOM_ARGS = re.compile(
    r"\\[dt]?binom\s*\{\s*(" + _TOWER + r")[)}\]\s]*\}\s*\{\s*(" + _TOWER + r")"
    r"|(" + _TOWER + r")[)}\]\s]*\\choose\s*[{(]*\s*(" + _TOWER + r")"
)
_MAX_FACTORIAL = 100_000




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


def _tower_value_log10(text: str) -> float:
    """log10 of a `_TOWER` match ("10^{9}" -> 9.0, "7" -> 0.845...)."""
    return _tower_log10([int(x) for x in re.findall(r"\d+", text)])


def _binom_log10(n_log: float, k_log: float) -> float:
    """log10 of C(n, k) for n = 10**n_log, k = 10**k_log; inf when astronomically large."""
    if n_log > 300 or k_log > 300:
        return math.inf
    n, k = 10.0**n_log, 10.0**k_log
    if k > n:
        return 0.0  # C(n, k) = 0 for k > n
    k = min(k, n - k)
    if n < 1e15:
        return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(10)
    return k * n_log  # an upper bound: C(n, k) <= n**k


def _pathology(s: str) -> str | None:
    """Why a (normalised) answer is unsafe to hand to sympy, or None. Cheap; O(len(s)).

    Screened after NFKC normalisation, so that full-width or other compatibility forms of code
    ("(ｌａｍｂｄａ: 1)()") are caught like their ASCII forms.

    >>> _pathology("\\\\binom{10^9}{10^5}"), _pathology("\\\\binom{10}{3}")
    ('binomial coefficient with more than 10000 digits', None)
    """
    s = unicodedata.normalize("NFKC", s)
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
    for m in _GAMMA_ARG.finditer(s):
        if _tower_value_log10(m.group(1)) > math.log10(_MAX_FACTORIAL):
            return f"Gamma function of a number above {_MAX_FACTORIAL}"
    for m in _BINOM_ARGS.finditer(s):
        n, k = (g for g in m.groups() if g is not None)
        if _binom_log10(_tower_value_log10(n), _tower_value_log10(k)) > _MAX_DIGITS:
            return f"binomial coefficient with more than {_MAX_DIGITS} digits"
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


_APPROX = re.compile(r"\\approx|≈")


def _symbolic_match(pred: str, ref: str, timeout_s: float | None) -> tuple[bool, str | None]:
    if _APPROX.search(pred) and len(pred) <= MAX_ANSWER_CHARS:
        # Policy: "\frac{70}{9} \approx 7.78" answers both 70/9 and 7.78: one side must match.
        parts = [p.strip() for p in _APPROX.split(pred) if p.strip()]
        errors = []
        for part in parts[:4]:
            quick = quick_verdict(part, ref)
            ok, err = quick if quick is not None else _symbolic_match(part, ref, timeout_s)
            if ok:
                return True, None
            errors.append(err)
        return False, next((e for e in errors if e), None)
    for side, text in (("answer", pred), ("reference", ref)):
        problem = _pathology(text)
        if problem:
            return False, f"{side} refused: {problem}"
    # Imported before the time limit starts: importing sympy can take seconds on a loaded machine,
    # and a timeout inside the import would leave a half-imported module that fails every later
    # item of this process ("module 'math_verify' has no attribute 'grader'").
    mv, _ = _math_verify()
    try:
        with _time_limit(timeout_s):
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
    quick = quick_verdict(pred, ref)
    if quick is not None:
        return quick
    return _symbolic_match(pred, ref, timeout_s)


