"""Numbers as people write them: the one place that parses them.

Four readers, each with the grammar its caller needs (they differ on purpose, and the verdicts
and votes built on them are pinned by tests):

- `plain_number`: the verifier's fast path. An extracted, normalised answer with units dropped
  ("18 apples", "5 \\text{ cm}"), thousands separators (',', '{,}', '\\,'), decimals with an
  exponent, fractions ('3/4', '\\frac{3}{4}', '\\frac34') and mixed numbers ('4 2/3') -> (exact value,
  written as a decimal). `numbers_equal` compares two of them (decimals within 1e-6 / 1e-5 rel.).
- `numeric_value`: the majority vote's value of a teacher's answer: '$' and a trailing '.' dropped,
  spaces ignored, '\\dfrac'/'\\tfrac' read; no units, no mixed numbers.
- `plain_number_text`: a source's reference answer as the canonical digits ('1,234' -> '1234'),
  or None when it is not a plain number.
- `NUMBER_IN_TEXT`: where a number stands in free text (the extractor's last-number fallback).

>>> plain_number("1,234.50")
(Fraction(2469, 2), True)
>>> numeric_value("$12")
Fraction(12, 1)
>>> plain_number_text("+1 234")
'1234'
"""

from __future__ import annotations

import re
from fractions import Fraction

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


def trailing_unit(answer: str) -> str | None:
    """The unit word at the end of an answer, folded for comparison ("5 \\text{ Meters}" -> "meter"),
    or None. Same grammar as the fast path's unit stripping; degrees are not a unit here.

    >>> trailing_unit("5 \\\\text{ cm}"), trailing_unit("12 apples"), trailing_unit("5")
    ('cm', 'apple', None)
    """
    s = _DEGREES.sub("", answer.strip())
    m = _TEXT_UNIT.search(s)
    word = m.group(1) if m and not any(w.lower() in _VALUE_WORDS for w in m.group(1).split()) else None
    if word is None:
        m = _WORD_UNIT.search(s)
        word = m.group(1) if m and m.group(1).lower() not in _VALUE_WORDS else None
    if word is None:
        return None
    word = word.lower().replace(" ", "").rstrip(".")
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


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


def numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    if a[0] == b[0]:
        return True
    if not (a[1] or b[1]):  # both exact (integers, fractions): exact comparison only
        return False
    diff = abs(a[0] - b[0])
    return diff <= _ABS_TOL and diff <= _REL_TOL * max(abs(a[0]), abs(b[0]))


# --------------------------------------------------------------------------- votes

_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_PLAIN_DECIMAL = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$")
_RATIO = re.compile(r"^([-+]?\d+)/(\d+)$")
_LATEX_FRAC = re.compile(r"^([-+]?)\\[dt]?frac\{(\d+)\}\{(\d+)\}$")


def strip_answer(ans: str) -> str:
    """An answer without surrounding '$' signs and a trailing '.'."""
    s = ans.strip()
    s = re.sub(r"^\\\$|^\$", "", s).strip()
    s = re.sub(r"\$$", "", s).strip()
    return s.rstrip(".").strip()


def numeric_value(ans: str) -> Fraction | None:
    """Exact value of a plain number ('1,000', '-2.50', '3/4', '\\frac{1}{2}', '$12'), else None."""
    s = strip_answer(ans).replace(" ", "")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    try:
        if _PLAIN_DECIMAL.match(s):
            return Fraction(s)
        if m := _RATIO.match(s):
            return Fraction(int(m.group(1)), int(m.group(2))) if int(m.group(2)) else None
        if m := _LATEX_FRAC.match(s):
            den = int(m.group(3))
            return Fraction(int(m.group(1) + m.group(2)), den) if den else None
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None



def compact_number(ans: str) -> str:
    """A plain number's vote form: no spaces, no thousands commas ('1, 000' stays a list)."""
    compact = ans.replace(" ", "")
    if _THOUSANDS.match(compact):
        compact = compact.replace(",", "")
    return compact

# --------------------------------------------------------------------------- references

# Thousands groups may be separated by ',', a space, nbsp or thin space, but only in groups of 3:
# '1 234' is a number, '12 34' is not.
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:[,\s]\d{3})+|\d+)(?:\.\d+)?")
_SIGN_GAP = re.compile(r"^([-+]?)\s+")


def plain_number_text(text: str) -> str | None:
    """A plain number as canonical digits ('$1,234' -> '1234', '- 5' -> '-5', '12.50' stays), else None.

    Thousands groups may use ',', a space, nbsp or thin space, but only in groups of 3.
    """
    number = _SIGN_GAP.sub(r"\1", text.replace("$", "").replace("\u2212", "-").strip())
    if _PLAIN_NUMBER.fullmatch(number):
        return re.sub(r"[,\s]", "", number).lstrip("+")
    return None


# --------------------------------------------------------------------------- decimal comma

_DECIMAL_COMMA = re.compile(r"[-+]?\d+,\d+")
_THOUSANDS_GROUPS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+")
_POINT_DECIMAL = re.compile(r"[-+]?\d*\.\d+")


def decimal_comma_value(answer: str, reference: str) -> Fraction | None:
    """The value of an answer written with a decimal comma ("2,5", "1000,99"), read that way only
    when the reference is a single decimal written with a point and the answer's comma cannot be a
    thousands separator (docs/verifier.md). None otherwise.

    >>> decimal_comma_value("2,5", "2.5")
    Fraction(5, 2)
    >>> decimal_comma_value("1,234", "1.234") is None  # thousands separator: 1234
    True
    """
    if not (_DECIMAL_COMMA.fullmatch(answer) and _POINT_DECIMAL.fullmatch(reference)):
        return None
    if _THOUSANDS_GROUPS.fullmatch(answer):
        return None
    return Fraction(answer.replace(",", "."))


# --------------------------------------------------------------------------- free text


# A number as people write it: 1,234.5 | -3 | 0.25 | 3/4 | .5 (unicode minus too). Not inside a
# word or identifier (x2, v1.5), hence the look-behind.
# A comma followed by one or two digits ("1000,99") is a decimal comma (docs/verifier.md); the
# comparison decides whether that reading is taken.
NUMBER_IN_TEXT = re.compile(
    r"(?<![\w.])[-−]?(?:\d{1,3}(?:,\d{3})+|\d+(?:,\d{1,2}(?![\d,]))?)?(?:\.\d+|(?<=\d))(?:/\d+)?(?!\w)"
)
