"""The teacher's majority answer for a generated problem: group equivalent answers, vote.

>>> vote(["12", "12.0", "7", None], 0.5).answer
'12'
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from stillhouse.tasks.verify.numbers import compact_number, numeric_value, strip_answer

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- majority vote

def _fast_clusters(answers: list[str | None]) -> dict[tuple[str, Any], list[int]]:
    """Group answers by exact numeric value (plain numbers) or by whitespace/case-free text.

    key -> member indices, keys in order of first appearance (deterministic). None/blank skipped.
    """
    clusters: dict[tuple[str, Any], list[int]] = {}
    for i, a in enumerate(answers):
        if a is None or not strip_answer(a):
            continue
        val = numeric_value(a)
        if val is not None:
            key: tuple[str, Any] = ("num", val)
        else:
            key = ("txt", re.sub(r"\s+", "", strip_answer(a)).casefold())
        clusters.setdefault(key, []).append(i)
    return clusters


def _pairs_to_check(answers: list[str | None]) -> list[tuple[str, str]]:
    """The representative pairs `vote` may ask `equivalent` about (not both plain numbers)."""
    clusters = _fast_clusters(answers)
    keys = list(clusters)
    reps = [answers[clusters[k][0]] for k in keys]
    return [
        (reps[i], reps[j])
        for i in range(len(keys))
        for j in range(i + 1, len(keys))
        if not (keys[i][0] == "num" and keys[j][0] == "num")
    ]


@dataclass(frozen=True)
class Vote:
    answer: str | None  # the reference, or None when no cluster reaches the threshold (or a tie)
    agreement: float  # share of ALL samples in the largest cluster (None answers count against)
    in_majority: tuple[bool, ...]  # per sample: does it hold the majority answer
    clusters: int  # distinct answers after grouping equivalents
    tie: bool  # two clusters share the top count


def vote(
    answers: list[str | None],
    threshold: float,
    *,
    equivalent: Callable[[str, str], bool] | None = None,
) -> Vote:
    """Group equivalent answers and elect the largest group.

    Grouping is exact numeric value for plain numbers, else whitespace/case-insensitive text; then
    `equivalent(a, b)` (e.g. the verifier's Math-Verify check) may merge groups where at least one
    side is not a plain number. A tie for the top group elects nothing: picking either would be a
    coin flip presented as a reference answer.
    """
    n = len(answers)
    clusters = _fast_clusters(answers)
    keys = list(clusters)
    if equivalent is not None and len(keys) > 1:
        parent = list(range(len(keys)))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for i in range(len(keys)):
            for j in range(i + 1, len(keys)):
                if keys[i][0] == "num" and keys[j][0] == "num":
                    continue  # both exact numbers: their values already decided it
                if find(i) == find(j):
                    continue
                a = answers[clusters[keys[i]][0]]
                b = answers[clusters[keys[j]][0]]
                try:
                    same = equivalent(a, b)
                except Exception:  # a verifier failure means "not shown equal"
                    log.debug("equivalence check failed for %r vs %r", a, b, exc_info=True)
                    same = False
                if same:
                    parent[find(j)] = find(i)
        merged: dict[int, list[int]] = {}
        for idx, key in enumerate(keys):
            merged.setdefault(find(idx), []).extend(clusters[key])
        groups = [sorted(m) for m in merged.values()]
    else:
        groups = [clusters[k] for k in keys]
    if not groups or n == 0:
        return Vote(None, 0.0, tuple(False for _ in answers), 0, False)
    groups.sort(key=lambda g: (-len(g), g[0]))
    top = groups[0]
    agreement = len(top) / n
    tie = len(groups) > 1 and len(groups[1]) == len(top)
    members = set(top)
    in_majority = tuple(i in members for i in range(n))
    if tie or agreement < threshold - 1e-9:
        return Vote(None, agreement, in_majority if not tie else tuple(False for _ in answers), len(groups), tie)
    return Vote(_representative([answers[i] for i in top]), agreement, in_majority, len(groups), False)


def _representative(members: list[str]) -> str:
    """The group's most common surface form (first seen on ties); plain numbers lose commas/$."""
    forms: dict[str, int] = {}
    for a in members:
        s = strip_answer(a)
        forms[s] = forms.get(s, 0) + 1
    best = max(forms, key=lambda f: forms[f])  # max keeps the first of equal counts
    if numeric_value(best) is not None:
        return compact_number(best)
    return best


def verifier_equivalence(
    answer_lists: Iterable[list[str | None]], *, timeout_s: float = 5.0, workers: int | None = 0
) -> Callable[[str, str], bool] | None:
    """An `equivalent(a, b)` for `vote`, decided up front by the verifier for every pair that the
    votes over `answer_lists` can ask about, in one `score_samples` call.

    Going through score_samples (not answers_match in this process) keeps Math-Verify in worker
    processes when workers >= 1, where its time limit works even if we run on a Prefect thread.
    None if the verifier is not importable (then grouping is by value/text only).
    """
    try:
        from stillhouse.tasks.verify.score import score_samples
    except ImportError:
        log.warning("stillhouse.tasks.verify.score unavailable; majority votes group answers by value/text only")
        return None
    pairs = sorted({p for answers in answer_lists for p in _pairs_to_check(answers)})
    table: dict[tuple[str, str], bool] = {}
    if pairs:
        # The answers are already extracted: box one side so the verifier extracts it verbatim.
        results = score_samples(
            [("\\boxed{" + a + "}", b) for a, b in pairs],
            last_number_fallback=False,
            timeout_s=timeout_s,
            workers=workers,
        )
        for pair, res in zip(pairs, results, strict=True):
            table[pair] = bool(res.correct)
            if res.error:
                log.debug("equivalence %r vs %r: %s", pair[0], pair[1], res.error)

    def equivalent(a: str, b: str) -> bool:
        return table.get((a, b), False) or table.get((b, a), False)

    return equivalent
