"""Rule-based verifier: is a model's final answer equal to the reference answer?

Pipeline per sample (score_samples):

1. extract   stillhouse.tasks.verify.extract.extract_answer finds the final answer (boxed, ####, ...,
             else the last math span or plain number); extract_reference reads the reference (its
             last box when it is a solution text). Policies: docs/verifier.md.
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

import logging
import math
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from stillhouse.tasks.verify.equivalence import (
    ItemTimeout,
    _parse,
    quick_verdict,
    _symbolic_match,
    answers_match,
    normalize_answer,
)
from stillhouse.tasks.verify.extract import Extraction, extract_answer, extract_reference
from stillhouse.tasks.verify.pool import _prestart_workers_context, _run_pool

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
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        # A negative or NaN limit would time every item out at once and mark it wrong, silently.
        raise ValueError(f"timeout_s must be a positive, finite number of seconds, got {timeout_s!r}")
    items = list(items)
    if items and workers != 0 and not multiprocessing.current_process().daemon:
        _prestart_workers_context()
    results: list[VerifyResult | None] = [None] * len(items)
    extractions: dict[int, Extraction] = {}
    pairs: list[tuple[str, str]] = []  # distinct (answer, reference) for Math-Verify
    owners: list[list[int]] = []  # owners[k]: the items that share pairs[k]
    index: dict[tuple[str, str], int] = {}
    ref_cache: dict[str, str | tuple[str]] = {}  # the N samples of a problem share its reference
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
        ref = _reference_answer(reference, ref_cache)
        if isinstance(ref, tuple):  # the reference has no usable answer
            results[i] = VerifyResult(ext.answer, False, ext.format_ok, ref[0], ext.method)
            continue
        key = (normalize_answer(ext.answer), ref)
        quick = quick_verdict(*key)
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


def _reference_answer(reference: str, cache: dict[str, str | tuple[str]]) -> str | tuple[str]:
    """The normalised answer of a reference (its box if it is a solution text, see
    extract_reference), or (error message,) when it has none."""
    if reference not in cache:
        ext = extract_reference(reference)
        if ext.answer is None:
            cache[reference] = (ext.error or "empty reference",)
        else:
            cache[reference] = normalize_answer(ext.answer)
    return cache[reference]


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

