"""Find the final answer in a model response.

Pure string work (no sympy, no Math-Verify), so it is cheap enough to run in the parent process for
every sample before anything is sent to a worker. Every search is bounded: `\\boxed` and `####` are
found with `str.rfind` (linear, in C), braces are scanned at most MAX_ANSWER_CHARS far, answers
longer than that are reported as errors; the phrase patterns only look at the last TAIL_CHARS of
the text and the last-number fallback at the last FALLBACK_TAIL_CHARS. A 10 MB response costs
milliseconds, never a hang.

Formats, in priority order (the first one present wins; within a format the last occurrence wins,
because models restate and correct themselves):

    boxed            \\boxed{...} / \\fbox{...} with balanced braces (adjacent boxes joined, see below)
    final_answer_is  Minerva: "Final Answer: The final answer is X. I hope it is correct."
    hash             GSM8K: "#### X"
    answer_is        "The answer is X", "Answer: X", "**Final answer:** X"
    bold             "... so she has **18** apples" (short bold span with a digit or LaTeX in it)
    last_math        fallback: the last math span ($..$, $$..$$, \\(..\\), \\[..\\]) near the end
                     (format_ok=False): what a grader reads when a chat answer has no marker
    last_number      fallback: the last number in plain text, never a fragment of LaTeX
                     (format_ok=False; both fallbacks can be switched off)

References go through `extract_reference`: a reference that is a whole solution yields its last
box (several adjacent boxes as one list), a LaTeX-wrapped one loses its wrapper, and one made of
math spans joined by "and"/"or" becomes one list. Policies for ambiguous forms: docs/verifier.md.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from stillhouse.tasks.verify.numbers import NUMBER_IN_TEXT

__all__ = ["Extraction", "extract_answer", "extract_reference", "unwrap_boxed", "MAX_ANSWER_CHARS"]

# Longest answer we accept. Real final answers (even matrices) are far shorter; beyond this we
# report an error rather than hand a giant string to a symbolic parser.
MAX_ANSWER_CHARS = 1_000
# Explicit-format phrases are looked for only near the end: that is where the final answer is, and
# it bounds regex work on degenerate (looping, megabyte-long) generations.
TAIL_CHARS = 32_768
FALLBACK_TAIL_CHARS = 4_096
# How many adjacent boxes ("\boxed{1} and \boxed{2}") are joined into one answer at most.
MAX_JOINED_BOXES = 8
_MAX_SKIPPED_BOXES = 32


@dataclass(frozen=True)
class Extraction:
    """The answer found in a response.

    answer: the answer text as written (tidied: no outer $...$, no trailing period), or None.
    method: which format produced it (see module docstring), or None.
    format_ok: True when it came from an explicit answer format, False for the fallback / nothing.
    error: set when an answer was located but rejected (e.g. longer than MAX_ANSWER_CHARS).
    """

    answer: str | None
    method: str | None
    format_ok: bool
    error: str | None = None


_NONE = Extraction(None, None, False)

# Program text is not an answer. Math-Verify would find "=1" in "globals().update(PWNED=1)" and
# call it correct, so code-shaped answers are refused before parsing (nothing is ever executed).
_CODE_LIKE = re.compile(
    r"__|\bimport\s+\w|(?<!\\)\blambda\b|"  # not LaTeX's \lambda
    r"(?<!\\)\b(?:exec|eval|compile|globals|locals|getattr|setattr|open|system|popen|print)\s*\(|"
    r"\)\s*\.\s*[A-Za-z_]\w*\s*\(|\b[A-Za-z_]\w*\.[A-Za-z_]\w*\s*\(|"
    # A call with no arguments ("(foo: 1)()", "f()") and Python's walrus: never a math answer, and
    # Math-Verify would read the 1 of "(foo: 1)()" as the whole answer.
    r"\(\s*\)|:="
)


# --------------------------------------------------------------------------- boxed

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# One token of a brace scan: an escaped character (so \{ and \} do not count) or a brace.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
# What may sit between two boxes for them to count as one multi-part answer.
_BOX_JOINER = re.compile(
    r"[\s$]*(?:,|;|\band\b|\\text\{\s*and\s*\}|\\quad)[\s$,]*(?:\band\b)?[\s$]*"
    r"(?:[A-Za-z]\s*=\s*)?[\s$]*"  # "x = \boxed{1} and x = \boxed{2}"
)
# Wider gaps that still say "and": "\boxed{1} papers and \boxed{2}", "\boxed{(3, 3)} \text{ for part
# (a) and } \boxed{(1, 1)}", "\(\boxed{1}\) and \(\boxed{-2}\)", "\boxed{1}\boxed{2}". A gap that is a
# sentence, corrects itself ("is wrong, the answer is") or has no "and" keeps only the last box.
_BOX_GAP_MARKUP = re.compile(r"\\(?:quad|qquad|text|mbox|textnormal|[()\[\],;!])|[{}$\s,;()=]|_\{?\w{1,3}\}?")
_BOX_GAP_STOP = frozenset(
    "is was are wrong not no but wait actually answer answers correct incorrect instead however so then "
    "therefore thus final hmm oops check mistake error also".split()
)


def _scan_braced(text: str, open_idx: int) -> tuple[int, str | None]:
    """Scan a {...} group starting at text[open_idx] == '{'.

    Returns (end index just past the closing brace, None) or (-1, reason) with reason "unclosed" or
    "too_long". The scan never goes further than MAX_ANSWER_CHARS past the opening brace.
    """
    limit = min(len(text), open_idx + MAX_ANSWER_CHARS + 2)
    depth = 0
    for tok in _BRACE_TOKEN.finditer(text, open_idx, limit):
        c = tok.group()
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return tok.end(), None
    return -1, ("too_long" if limit < len(text) else "unclosed")


def _find_box(text: str, end: int) -> tuple[int, int, str | None, str | None] | None:
    """The last \\boxed / \\fbox that starts before `end`.

    Returns (start, stop, content, error) or None when there is none. Malformed boxes (no brace,
    never closed) are skipped: a truncated "\\boxed{5" is not an answer in boxed format, and an
    earlier complete box (or a later fallback) may still be.
    """
    commands = [cmd for cmd in _BOX_COMMANDS if text.find(cmd, 0, end) >= 0]
    # Skipping malformed boxes is capped so "\boxed{\boxed{..." repeated a million times stays cheap.
    for _ in range(_MAX_SKIPPED_BOXES):
        if end <= 0 or not commands:
            return None
        start = max(text.rfind(cmd, 0, end) for cmd in commands)
        if start < 0:
            return None
        cmd_len = len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox")
        i = start + cmd_len
        if i < len(text) and text[i].isalpha():  # \boxedx, \fboxsep: another command
            end = start
            continue
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            stop, err = _scan_braced(text, i)
            if stop > 0:
                return start, stop, text[i + 1 : stop - 1], None
            if err == "too_long":
                return start, len(text), None, f"boxed answer longer than {MAX_ANSWER_CHARS} chars"
        elif i > start + cmd_len and i < len(text):
            # "\boxed 5": TeX takes the next token; models use it for short answers.
            m = re.match(r"[^\s$]+", text[i : i + MAX_ANSWER_CHARS])
            if m:
                return start, i + m.end(), m.group(), None
        end = start
    return None


def unwrap_boxed(s: str) -> str:
    """The content of `s` if all of `s` is one \\boxed{...} / \\fbox{...}; else `s` unchanged."""
    s = s.strip()
    if not s.startswith(_BOX_COMMANDS):
        return s
    cmd = next(c for c in _BOX_COMMANDS if s.startswith(c))
    found = _find_box(s, len(cmd))  # the box that starts at 0
    if found is None or found[0] != 0 or found[2] is None or found[1] != len(s):
        return s
    return found[2].strip()


def _boxes_adjacent(text: str, gap_start: int, gap_end: int) -> bool:
    """Do two boxes separated by text[gap_start:gap_end] form one multi-part answer?"""
    if gap_end - gap_start > 60:
        return False
    if gap_end - gap_start <= 40 and _BOX_JOINER.fullmatch(text, gap_start, gap_end):
        return True
    gap = text[gap_start:gap_end]
    if "." in gap or "\n\n" in gap:
        return False
    rest = _BOX_GAP_MARKUP.sub(" ", gap)
    words = rest.split()
    if not all(w.isalpha() for w in words):
        return False
    if not words:
        return True  # "\boxed{1}\boxed{2}", "\(\boxed{1}\), \(\boxed{2}\)"
    lowered = [w.lower() for w in words]
    return "and" in lowered and len(words) <= 6 and not _BOX_GAP_STOP.intersection(lowered)


def _extract_boxed(text: str) -> Extraction | None:
    found = _find_box(text, len(text))
    if found is None:
        return None
    start, _stop, content, error = found
    if error is not None:
        return Extraction(None, "boxed", True, error)
    parts = [content]
    # "x = \boxed{1} and \boxed{2}" answers a find-all question with two boxes: join them, or a
    # grader taking only the last box would mark a complete answer as partial.
    while len(parts) < MAX_JOINED_BOXES:
        prev = _find_box(text, start)
        if prev is None or prev[2] is None:
            break
        # Short gaps only: the joiner has several adjacent starred groups, and a long gap of spaces
        # would make a failing fullmatch backtrack polynomially.
        if not _boxes_adjacent(text, prev[1], start):
            break
        start = prev[0]
        parts.append(prev[2])
    parts.reverse()
    unique = list(dict.fromkeys(p.strip() for p in parts))
    return _finish(", ".join(unique), "boxed")


# --------------------------------------------------------------------------- phrase formats

# Phrase anchors: we take the LAST anchor and read the answer after it (a greedy "anchor + rest of
# line" pattern would swallow a later restatement on the same line).
_FINAL_ANSWER_IS = re.compile(r"final answer is\s*:?\s*", re.IGNORECASE)
_MINERVA_TAIL = re.compile(r"(.+?)\.?\s*I hope it is correct", re.IGNORECASE)
_HASH = re.compile(r"####[ \t]*")
# "the answer is", "Answer:", "**Final Answer:** x", "final answer: x"
_ANSWER_IS = re.compile(r"\banswer(?:\*\*)?(?:\s+is|\s*:)(?:\*\*)?[ \t:]*", re.IGNORECASE)
_IS = re.compile(r"\b(?:is|are|equals)\s+")
_BOLD = re.compile(r"\*\*([^*\n]{1,120})\*\*")
# A sentence ends at a period followed by space/end (not the dot in 3.5), or at a semicolon.
_SENTENCE_END = re.compile(r"\.(?=\s|$|\*)|;|\s+(?:because|since|which|so that|as)\b")
# ", which ..." ends the answer too, but ", 2" and ", and 3" (lists) do not.
_CLAUSE_COMMA = re.compile(r",\s+(?!and\b|or\b)(?=[A-Za-z]{2,})")
_MATH_OPEN = {"$$": "$$", "$": "$", "\\(": "\\)", "\\[": "\\]"}


def _last_match(pattern: re.Pattern[str], text: str, pos: int) -> re.Match[str] | None:
    last = None
    for last in pattern.finditer(text, pos):
        pass
    return last


def _cut_phrase(raw: str) -> str:
    """The answer part of the text following 'the answer is'.

    If it starts with a math span ($...$, \\(...\\)), the span is the answer; otherwise it runs to
    the end of the sentence or clause.
    """
    s = raw.strip().lstrip("*: ").strip()
    for opener, closer in _MATH_OPEN.items():
        if s.startswith(opener):
            close = s.find(closer, len(opener))
            if close > 0:
                return s[: close + len(closer)]
            break
    m = _SENTENCE_END.search(s)
    if m:
        s = s[: m.start()]
    m = _CLAUSE_COMMA.search(s)
    if m:
        s = s[: m.start()]
    return s


def _tidy(answer: str) -> str:
    """Strip markup around an answer: whitespace, bold stars, sentence period, outer $...$."""
    s = answer.strip()
    for _ in range(3):  # a few layers, e.g. "**$5$**."
        before = s
        s = s.strip().strip("*").rstrip(",;:").strip()
        if s.endswith(".") and not s.endswith(".."):  # sentence period, not an ellipsis
            s = s[:-1].rstrip()
        for opener, closer in _MATH_OPEN.items():
            if s.startswith(opener) and s.endswith(closer) and len(s) >= len(opener) + len(closer):
                s = s[len(opener) : len(s) - len(closer)].strip()
                break
        if s == before:
            break
    return s


def _finish(answer: str, method: str, format_ok: bool = True) -> Extraction | None:
    answer = _tidy(answer)
    if not answer:
        return None
    if len(answer) > MAX_ANSWER_CHARS:
        return Extraction(None, method, format_ok, f"answer longer than {MAX_ANSWER_CHARS} chars")
    # An inner \boxed ("The final answer is $\boxed{5}$" after a malformed outer box) is unwrapped.
    if "\\boxed" in answer or "\\fbox" in answer:
        inner = _extract_boxed(answer)
        if inner is not None and inner.answer:
            return Extraction(inner.answer, method, format_ok)
        if inner is None:
            # "The answer is \boxed{42" (never closed: a cut-off or garbled reply) is no answer in
            # any format: Math-Verify would close the box itself and call it correct.
            return Extraction(None, method, False, "unclosed \\boxed{...} in the answer")
    return Extraction(answer, method, format_ok)


def _rest_of_line(text: str, pos: int) -> str:
    """Text from pos to the end of its line, at most MAX_ANSWER_CHARS + 1 chars (so that an
    over-long answer is still detected as such)."""
    end = text.find("\n", pos, pos + MAX_ANSWER_CHARS + 2)
    return text[pos : end if end >= 0 else pos + MAX_ANSWER_CHARS + 1]


def _extract_phrase(text: str, pos: int) -> Extraction | None:
    m = _last_match(_FINAL_ANSWER_IS, text, pos)
    if m:
        rest = _rest_of_line(text, m.end())
        minerva = _MINERVA_TAIL.match(rest)
        found = _finish(minerva.group(1) if minerva else _cut_phrase(rest), "final_answer_is")
        if found:
            return found
    # "####" is found with rfind over the whole text (cheap), so a giant answer after it is
    # reported as too long instead of silently missed.
    hash_pos = text.rfind("####")
    if hash_pos >= 0:
        found = _finish(_rest_of_line(text, _HASH.match(text, hash_pos).end()), "hash")
        if found:
            return found
    m = _last_match(_ANSWER_IS, text, pos)
    if m:
        phrase = _cut_phrase(_rest_of_line(text, m.end()))
        if _PROSE.search(_TEXT_GROUP.sub(" ", phrase)):
            # "Final Answer: The volume of $ABCD$ is 120." -> what follows the last " is ".
            tail_is = _last_match(_IS, phrase, 0)
            if tail_is and phrase[tail_is.end() :].strip() and not _PROSE.search(phrase[tail_is.end() :]):
                phrase = phrase[tail_is.end() :]
        found = _finish(phrase, "answer_is")
        if found:
            return found
    return None


def _extract_bold(text: str) -> Extraction | None:
    # Only the end of the text: bold earlier on is headings ("**Step 1:**"), not answers.
    m = _last_match(_BOLD, text, max(0, len(text) - 600))
    if m is None:
        return None
    content = m.group(1).strip()
    if content.endswith(":") or not re.search(r"[\d\\]", content):
        return None
    if re.match(r"(?i)step\s*\d", content):
        return None
    return _finish(content, "bold")


# --------------------------------------------------------------------------- fallbacks

# The last math span is looked for in the last MATH_TAIL_CHARS only (bounded work).
MATH_TAIL_CHARS = 4_096
# Prose inside a "$...$" pair means the pair is two currency dollars, not math: "$2 each, so $".
_PROSE = re.compile(r"(?<![\\A-Za-z{])[A-Za-z]{2,}\s+[A-Za-z]{2,}(?![A-Za-z}])")
_TEXT_GROUP = re.compile(r"\\(?:text|textbf|textnormal|mbox|mathrm|operatorname)\s*\{[^{}]*\}")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)(?:\\\\)*\$\$?")


def _is_math(content: str, inline: bool) -> bool:
    """Does a span's content read as math (not prose between two currency dollars)?"""
    if not content.strip() or (inline and "\n" in content):
        return False  # policy: inline $...$ and \(...\) do not span lines (docs/verifier.md)
    return not _PROSE.search(_TEXT_GROUP.sub(" ", content))


def _dollar_spans(tail: str, limit: int = 1) -> list[tuple[int, int, str, bool]]:
    """(start, end, content, inline) of $...$ and $$...$$ spans, paired from the end of the text.

    Pairing from the end is right where the answer is: "costs $2 each, so $9 \\times 2 = 18$"
    pairs the last two dollars. Pairs that read as prose are dropped.
    """
    marks = [(m.end() - (2 if m.group().endswith("$$") else 1), m.end()) for m in _UNESCAPED_DOLLAR.finditer(tail)]
    spans = []
    i = len(marks) - 1
    while i >= 1:
        (c_start, c_end), (o_start, o_end) = marks[i], marks[i - 1]
        double = c_end - c_start == 2
        if double != (o_end - o_start == 2):
            i -= 1
            continue
        content = tail[o_end:c_start]
        if _is_math(content, inline=not double):
            spans.append((o_start, c_end, content, not double))
            if len(spans) >= limit:
                break
            i -= 2
        else:
            i -= 1
    return spans


def _bracket_span(tail: str, opener: str, closer: str) -> tuple[int, int, str, bool] | None:
    close = tail.rfind(closer)
    if close < 0:
        return None
    start = tail.rfind(opener, 0, close)
    if start < 0:
        return None
    content = tail[start + len(opener) : close]
    inline = opener == "\\("
    return (start, close + len(closer), content, inline) if _is_math(content, inline) else None


_SPAN_JOINER = re.compile(r"\s{0,3}(?:,|;|,?\s{0,3}(?:and|or))\s{0,3}")


def _extract_last_math(text: str) -> Extraction | None:
    """The last math span near the end of the text, as a careful grader would read an unmarked
    answer; None when there is none (or the last one is not plainly math)."""
    offset = max(0, len(text) - MATH_TAIL_CHARS)
    tail = text[offset:]
    spans = _dollar_spans(tail, limit=1)
    for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
        found = _bracket_span(tail, opener, closer)
        if found:
            spans.append(found)
    if not spans:
        # No delimiters at all, but the whole (short) response is one LaTeX expression: "\frac{10}{9}".
        bare = text.strip()
        if (
            "\\" in bare
            and len(bare) <= 200
            and "\\boxed" not in bare
            and "\\fbox" not in bare
            and _is_math(bare, inline=True)
        ):
            return _finish(bare, "last_math", format_ok=False)
        return None
    start, end, content, _inline = max(spans, key=lambda sp: sp[1])
    last_number = _last_match(NUMBER_IN_TEXT, tail, end)
    if last_number is not None and not _inside_latex(tail, last_number.start(), last_number.end()):
        return None  # a plain number after the last math span is the later answer
    content = content.strip()
    # "The roots are $x = 2$ and $x = 3$": spans joined by "and"/"or"/"," are one list, or a
    # grader taking only the last one would accept 3 for {2, 3}.
    parts = [content]
    for prev_start, prev_end, prev_content, _ in _dollar_spans(tail[:start], limit=MAX_JOINED_BOXES):
        if len(parts) >= MAX_JOINED_BOXES or not _SPAN_JOINER.fullmatch(tail, prev_end, start):
            break
        parts.append(prev_content.strip())
        start = prev_start
    if len(parts) > 1:
        content = ", ".join(reversed(parts))
    # A display block of several equations: the last line is the answer.
    if "\\\\" in content and "\\begin" not in content:
        content = content.rsplit("\\\\", 1)[-1].strip() or content
    return _finish(content, "last_math", format_ok=False)


# "\frac{10}{9}", "x^2", "a_1", "\sqrt3": a digit next to these is part of LaTeX, not a number.
_LATEX_NEIGHBOUR = set("{}^_\\$")



def _extract_last_number(text: str) -> Extraction | None:
    start = max(0, len(text) - FALLBACK_TAIL_CHARS)
    tail = text[start:]
    m = _last_match(NUMBER_IN_TEXT, tail, 0)
    if m is None:
        return None
    if m.start() == 0 and start > 0 and text[start - 1].isdigit():
        # The number runs on before the window: thousands of digits, not an answer.
        return Extraction(None, "last_number", False, f"number longer than {FALLBACK_TAIL_CHARS} chars")
    if _inside_latex(tail, m.start(), m.end()):
        # Not sure what the answer is: no answer (reward 0) beats a fragment such as the 9 of
        # \frac{10}{9}. A false positive is worse than a miss.
        return Extraction(None, "last_number", False, "last number is part of a LaTeX expression")
    line_start = tail.rfind("\n", 0, m.start()) + 1
    line_end = tail.find("\n", m.end())
    line = tail[line_start : line_end if line_end >= 0 else len(tail)]
    if _CODE_LIKE.search(unicodedata.normalize("NFKC", line)):
        # "(foo: 1)()": the 1 of a line of program text is not an answer to the problem.
        return Extraction(None, "last_number", False, "last number is part of program code")
    return _finish(m.group(), "last_number", format_ok=False)


def _inside_latex(tail: str, start: int, end: int) -> bool:
    """Is the number tail[start:end] a fragment of LaTeX (inside math, or next to {}^_\\)?"""
    if tail[max(0, start - 12) : start].rstrip("{ ").endswith(("\\boxed", "\\fbox")):
        return False  # a truncated box "\boxed{5": the number is the whole answer
    prev = tail[start - 1] if start > 0 else " "
    nxt = tail[end] if end < len(tail) else " "
    if prev == "$" and not _UNESCAPED_DOLLAR.search(tail, end):
        return False  # a currency sign: "so she pays $18 in total"
    if prev in _LATEX_NEIGHBOUR or nxt in _LATEX_NEIGHBOUR:
        return True
    # Inside an open math span: an odd number of unescaped dollars before it, or an unclosed \\( / \\[.
    if len(_UNESCAPED_DOLLAR.findall(tail, 0, start)) % 2 == 1:
        return True
    return any(tail.rfind(o, 0, start) > tail.rfind(c, 0, start) for o, c in (("\\(", "\\)"), ("\\[", "\\]")))


# --------------------------------------------------------------------------- references

# Math spans joined by words: "$1$ and $2$ and $3$", "$21,16$ or $11$".
_REF_SPAN_JOINER = re.compile(r"\s*(?:,|;|\band\b|\bor\b)?\s*(?:\band\b|\bor\b)?\s*")
# Longest reference read as written; longer ones must end in a box (MATH solutions) or a marker.
MAX_REFERENCE_CHARS = 1_000_000
_SHORT_REFERENCE_CHARS = 200


def extract_reference(reference: str) -> Extraction:
    """The answer a reference stands for (see module docstring).

    >>> extract_reference("Thus $x = \\\\boxed{5}$.").answer
    '5'
    >>> extract_reference("$1$ and $2$ and $3$").answer
    '1, 2, 3'
    >>> extract_reference("$(3, 2)$").answer
    '$(3, 2)$'
    """
    ref = reference.strip()
    if len(ref) > MAX_REFERENCE_CHARS:
        return Extraction(None, None, False, "reference too long")
    if "\\boxed" in ref or "\\fbox" in ref:
        found = _extract_boxed(ref)  # the last box of a solution (adjacent boxes as one list)
        if found is not None:
            return found
    if "####" in ref:  # a GSM8K solution with its "#### N" line
        return extract_answer(ref, last_number_fallback=False)
    if ref.count("$") >= 4 and len(ref) <= MAX_ANSWER_CHARS:
        spans = [(m.start(), m.end(), m.group(1)) for m in re.finditer(r"(?<!\\)\$([^$]+)\$", ref)]
        gaps_ok = all(
            _REF_SPAN_JOINER.fullmatch(ref, a[1], b[0]) for a, b in zip(spans, spans[1:])
        ) and spans and spans[0][0] == 0 and spans[-1][1] == len(ref.rstrip(". "))
        if gaps_ok:
            return Extraction(", ".join(c.strip() for _, _, c in spans), "reference_spans", True)
    # Short references are answers as written ("no solution", "$125$ miles", "\text{Evelyn}"); only
    # long prose is a solution to read.
    if len(ref) <= _SHORT_REFERENCE_CHARS or (
        len(ref) <= MAX_ANSWER_CHARS and not _PROSE.search(_TEXT_GROUP.sub(" ", ref.replace("$", " ")))
    ):
        return Extraction(ref, None, True)
    # A solution text without a box: read it like a response (markers, then the last math span).
    found = extract_answer(ref)
    if found.answer is None and found.error is None:
        return Extraction(None, found.method, False, "no answer found in the reference")
    return found


# --------------------------------------------------------------------------- entry point


def extract_answer(text: str, *, last_number_fallback: bool = True) -> Extraction:
    """Find the final answer in `text` (see module docstring for formats and priorities).

    >>> extract_answer("so the ratio is $\\\\frac{10}{9}$.").answer
    '\\\\frac{10}{9}'
    >>> extract_answer("so the ratio is \\\\frac{10}{9}").error
    'last number is part of a LaTeX expression'
    """
    if not isinstance(text, str):
        raise TypeError(f"response must be str, got {type(text).__name__}")
    if not text or text.isspace():
        return _NONE
    found = _extract_boxed(text)
    if found is None:
        found = _extract_phrase(text, max(0, len(text) - TAIL_CHARS))
    if found is None:
        found = _extract_bold(text)
    if found is not None:
        return found
    if last_number_fallback:
        found = _extract_last_math(text) or _extract_last_number(text)
        if found is not None:
            return found
    return _NONE
