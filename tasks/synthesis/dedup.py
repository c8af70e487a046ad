"""Near-duplicate and contamination checks for generated problems: word n-gram indexes.

>>> idx = DedupIndex(n=2, threshold=0.5).add_all([("p1", "Tom has 3 apples. How many?")])
>>> idx.match("Tom has 3 apples. How many now?").key
'p1'
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from stillhouse.tasks.problems import Problem, normalize_question

# --------------------------------------------------------------------------- word n-grams

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Case-folded word/number tokens; punctuation and markup are ignored."""
    return _WORD.findall(text.casefold())


def word_ngrams(text: str | list[str], n: int) -> frozenset[tuple[str, ...]]:
    """The set of word n-grams; a text shorter than n words is one gram (so it stays comparable)."""
    toks = words(text) if isinstance(text, str) else text
    if not toks:
        return frozenset()
    if len(toks) < n:
        return frozenset([tuple(toks)])
    return frozenset(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


@dataclass(frozen=True)
class DuplicateMatch:
    key: str  # id of the problem it duplicates
    kind: str  # "exact" or "near"
    score: float  # Jaccard overlap (1.0 for exact)


class DedupIndex:
    """Exact and near-duplicate lookup over a growing set of questions.

    Exact: equal `normalize_question`. Near: word n-gram Jaccard >= threshold, found through an
    inverted index gram -> keys, so a query only scores the questions it shares a gram with (cheap
    for pools of thousands of problems; no MinHash needed at that size).
    """

    def __init__(self, n: int, threshold: float):
        self.n = n
        self.threshold = threshold
        self._exact: dict[str, str] = {}
        self._grams: dict[str, frozenset] = {}
        self._inverted: dict[tuple[str, ...], list[str]] = {}

    def __len__(self) -> int:
        return len(self._grams)

    def add(self, key: str, text: str) -> None:
        if key in self._grams:
            return
        self._exact.setdefault(normalize_question(text), key)
        grams = word_ngrams(text, self.n)
        self._grams[key] = grams
        for g in grams:
            self._inverted.setdefault(g, []).append(key)

    def add_all(self, items: Iterable[tuple[str, str]]) -> DedupIndex:
        for key, text in items:
            self.add(key, text)
        return self

    def match(self, text: str) -> DuplicateMatch | None:
        """The indexed question this one duplicates (the closest one), or None."""
        hit = self._exact.get(normalize_question(text))
        if hit is not None:
            return DuplicateMatch(hit, "exact", 1.0)
        grams = word_ngrams(text, self.n)
        if not grams:
            return None
        shared: dict[str, int] = {}
        for g in grams:
            for key in self._inverted.get(g, ()):
                shared[key] = shared.get(key, 0) + 1
        best: DuplicateMatch | None = None
        for key, inter in shared.items():
            score = inter / (len(grams) + len(self._grams[key]) - inter)
            if score >= self.threshold and (best is None or score > best.score):
                best = DuplicateMatch(key, "near", score)
        return best


class ContaminationIndex:
    """Every word n-gram of the eval problems; a candidate sharing one of them is contaminated.

    An eval question shorter than n words is kept whole and matched as a contiguous run of the
    candidate's words; an exact (normalize_question) copy is caught whatever its length.
    """

    def __init__(self, eval_items: Iterable[tuple[str, str]], n: int):
        self.n = n
        self._grams: dict[tuple[str, ...], str] = {}
        self._short: dict[int, dict[tuple[str, ...], str]] = {}  # length -> whole question -> id
        self._exact: dict[str, str] = {}
        for key, text in eval_items:
            self._exact.setdefault(normalize_question(text), key)
            toks = words(text)
            if not toks:
                continue
            if len(toks) < n:
                self._short.setdefault(len(toks), {}).setdefault(tuple(toks), key)
                continue
            for i in range(len(toks) - n + 1):
                self._grams.setdefault(tuple(toks[i : i + n]), key)

    @classmethod
    def from_problems(cls, problems: Iterable[Problem], n: int) -> ContaminationIndex:
        return cls(((p.id, p.question) for p in problems), n)

    def match(self, text: str) -> str | None:
        """The id of an eval problem sharing an n-gram with `text`, or None."""
        hit = self._exact.get(normalize_question(text))
        if hit is not None:
            return hit
        toks = words(text)
        for i in range(len(toks) - self.n + 1):
            hit = self._grams.get(tuple(toks[i : i + self.n]))
            if hit is not None:
                return hit
        for length, wholes in self._short.items():
            for i in range(len(toks) - length + 1):
                hit = wholes.get(tuple(toks[i : i + length]))
                if hit is not None:
                    return hit
        return None


