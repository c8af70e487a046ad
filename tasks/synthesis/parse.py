"""Parse a teacher's reply into a problem statement, or say why it is not one."""

from __future__ import annotations

import re

from stillhouse.tasks.config import SynthesisConfig
from stillhouse.tasks.problems import Problem
from stillhouse.tasks.synthesis.dedup import jaccard, word_ngrams, words

# Parse rejects, in the order the checks run.
PARSE_REASONS = ("empty", "too_short", "too_long", "not_a_question", "copy_of_parent")

# --------------------------------------------------------------------------- parsing

_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?")
_PROBLEM_WORDS = r"(?:(?:new|harder|similar|modified|revised|rewritten|variant|updated|final|math|word)[ \t]+)*(?:problem|question)(?:[ \t]*\#?\d+)?"
# "Problem:", "**New problem:**", "### Harder Problem", "Question 1:" at the start of a line.
_PROBLEM_MARKER = re.compile(
    r"(?im)^[ \t>]*(?:"
    rf"(?:\#+[ \t]*)?(?:\*\*|__)?[ \t]*{_PROBLEM_WORDS}[ \t]*(?:\*\*|__)?[ \t]*:[ \t]*(?:\*\*|__)?"
    rf"|(?:\#+[ \t]*|\*\*|__)[ \t]*{_PROBLEM_WORDS}[ \t]*(?:\*\*|__)?[ \t]*$"
    r")"
)
_SECTION_WORDS = (
    r"(?:step[- ]by[- ]step[ \t]+)?(?:solution|solutions|answer|final[ \t]+answer|explanation|"
    r"reasoning|steps?(?:[ \t]*\d+)?|notes?|hints?|working|original[ \t]+problem|difficulty|changes|"
    r"rationale|why[ \t]+(?:it|this)[ \t]+is[ \t]+harder|verification)"
)
# "Solution (step by step):", "Answer to the new problem:"
_SECTION_TAIL = (
    r"(?:[ \t]*\([^)\n]{0,30}\))?"
    r"(?:[ \t]+(?:to|for|of)[ \t]+(?:the[ \t]+)?(?:(?:new|harder|above|this)[ \t]+)?(?:problem|question))?"
)
# A trailing section starts a line: "Solution:", "**Answer:** 42", "### Solution", "#### 42".
_TRAILER = re.compile(
    r"(?im)^[ \t>]*(?:"
    rf"(?:\#+[ \t]*)?(?:\*\*|__)?[ \t]*{_SECTION_WORDS}\b{_SECTION_TAIL}(?:\*\*|__)?[ \t]*:"
    rf"|(?:\#+[ \t]*|\*\*|__)[ \t]*{_SECTION_WORDS}\b"
    r"|\#\#\#\#[ \t]*[-+$\d]"
    r")"
)
# ... or follows a sentence on the same line: "How many apples? Answer: 12".
_INLINE_TRAILER = re.compile(
    r"(?i)(?<=[.?!)])[ \t]*(?:\*\*|__)?(?:solution|answer|final[ \t]+answer)(?:\*\*|__)?[ \t]*:"
)
_CHATTER = re.compile(
    r"(?i)^(?:sure|certainly|of course|okay|ok|absolutely|great|alright|here(?:'s|’s| is| are)|"
    r"below is|i(?:'d|’d| would| will|'ll|’ll| have| can)|let me|let's|let’s)\b"
)
_INTRO_LINE = re.compile(r"(?i)^[^\n?]{0,120}\b(?:version|problem|question|variant)\b[^\n?]{0,40}:\s*$")
_ASKS = re.compile(
    r"(?i)(?:^|[.!:;\n]\s*|\b(?:then|and|so)\s+)(?:\*\*)?"
    r"(?:find|compute|calculate|determine|evaluate|solve|simplify|express|show|prove|give|estimate|"
    r"work out|figure out|count|convert|what|how|which)\b"
)
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’"}


def _first_match_start(text: str, *patterns: re.Pattern, start: int = 0) -> int | None:
    found = [m.start() for p in patterns if (m := p.search(text, start))]
    return min(found) if found else None


def _drop_leading_chatter(text: str) -> str:
    """Remove 'Sure! Here is a harder version:' lines before the problem itself."""
    lines = text.split("\n")
    while lines:
        line = lines[0].strip()
        if not line:
            lines.pop(0)
            continue
        if _CHATTER.match(line):
            # "Sure! Here's the problem: A train ..." -> keep what follows the colon.
            head, colon, rest = line.partition(":")
            if colon and rest.strip() and "?" not in head:
                lines[0] = rest
                continue
            if line.endswith(":") or "?" not in line:
                lines.pop(0)
                continue
        elif _INTRO_LINE.match(line):
            lines.pop(0)
            continue
        break
    return "\n".join(lines)


def clean_generated_text(text: str) -> str:
    """The problem statement inside a teacher's reply (may be empty); no checks."""
    if not text:
        return ""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _THINK.sub("", text)
    if "</think>" in text.lower():  # the opening tag was part of the prompt
        text = text[text.lower().rfind("</think>") + len("</think>") :]
    if "<think>" in text.lower():  # thinking never finished: nothing after it is a problem
        text = text[: text.lower().find("<think>")]
    text = _FENCE.sub("", text).replace("```", "")
    marker = _PROBLEM_MARKER.search(text)
    if marker:
        text = text[marker.end() :]
        # A second "Problem:" means the model wrote several; keep the first.
        nxt = _PROBLEM_MARKER.search(text)
        if nxt and text[: nxt.start()].strip():
            text = text[: nxt.start()]
    else:
        text = _drop_leading_chatter(text)
    cut = _first_match_start(text, _TRAILER, _INLINE_TRAILER)
    if cut is not None:
        text = text[:cut]
    # Markdown that is formatting, not content (LaTeX `$...$` is content and stays).
    text = text.replace("**", "").replace("__", "")
    lines = [re.sub(r"^[ \t]*(?:#+|>)[ \t]*", "", ln) for ln in text.split("\n")]
    lines = [re.sub(r"[ \t]+", " ", ln).strip() for ln in lines]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] == _QUOTES[text[0]]:
        text = text[1:-1].strip()
    return text


def looks_like_question(text: str) -> bool:
    """A question mark, or a sentence that starts with Find/Compute/How/What/... ."""
    return "?" in text or bool(_ASKS.search(text))


def parse_generated_problem(
    text: str | None, parent_question: str, cfg: SynthesisConfig
) -> tuple[str | None, str | None]:
    """(question, None) for a usable problem, else (None, reason) with reason in PARSE_REASONS."""
    question = clean_generated_text(text or "")
    if not question:
        return None, "empty"
    if len(question) < cfg.min_question_chars:
        return None, "too_short"
    if len(question) > cfg.max_question_chars:
        return None, "too_long"
    if not looks_like_question(question):
        return None, "not_a_question"
    if words(question) == words(parent_question) or jaccard(
        word_ngrams(question, cfg.dedup_ngram), word_ngrams(parent_question, cfg.dedup_ngram)
    ) >= cfg.dedup_threshold:
        return None, "copy_of_parent"
    return question, None


