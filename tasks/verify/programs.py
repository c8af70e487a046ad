"""Program-of-thought verification: run the response's program in the sandbox, score its output.

    >>> extract_program("Let me compute.\\n```python\\nprint(2 + 3)\\n```\\nDone.")
    'print(2 + 3)\\n'
    >>> extract_program("print(7)")
    'print(7)'

The program is the response's last fenced ```python block (else its last fenced block of any
language-less kind, else the whole response). It runs in a SandboxPool (tasks/sandbox); its printed
output is the answer text, checked by the same verifier as a chain-of-thought response against the
reference. A program that fails, hits a limit or prints nothing is a wrong sample whose `error` says
why. `score_responses` is the one entry point the steps use for either rationale.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from stillhouse.tasks.verify.score import VerifyResult, _as_pair, score_samples

# ```python ... ``` (also ```py / ```python3), or a bare ``` ... ``` block; an unclosed last fence
# (the model was cut at its token limit) still yields the code written so far.
_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_program(response: str) -> str:
    """The program in a response: last ```python block, else last bare ``` block, else all of it."""
    blocks = _FENCE.findall(response)
    python = [code for lang, code in blocks if lang]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    return response


@dataclass(frozen=True)
class ProgramVerdict:
    """A PoT sample's verdict and how its program ended (None for rows that never ran)."""

    verdict: VerifyResult
    program: object | None  # sandbox.pool.ProgramResult


def score_programs(items: Sequence, verifier, pool=None) -> list[ProgramVerdict]:
    """Run each (response, reference)'s program and score its output; results in input order.

    `pool`: an open SandboxPool to reuse; by default one is opened from verifier.sandbox (which
    refuses, raising SandboxUnavailable, below its min_level: nothing runs unsandboxed).
    """
    from stillhouse.tasks.sandbox.pool import SandboxPool

    pairs = [_as_pair(item) for item in items]
    todo = [i for i, p in enumerate(pairs) if not isinstance(p, str)]
    if pool is None and todo:
        with SandboxPool(verifier.sandbox) as own:
            runs = own.run_many([extract_program(pairs[i][0]) for i in todo])
    else:
        runs = pool.run_many([extract_program(pairs[i][0]) for i in todo]) if todo else []
    ran = dict(zip(todo, runs, strict=True))
    # The verifier reads the printed output like any response (its last number, a box, ...).
    clean = [i for i in todo if ran[i].failure is None]
    scores = dict(zip(clean, score_samples(
        [(ran[i].stdout, pairs[i][1]) for i in clean],
        last_number_fallback=True, timeout_s=verifier.timeout_s, workers=verifier.workers,
    ), strict=True))
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, str):
            out.append(ProgramVerdict(VerifyResult(None, False, False, pair, None), None))
        elif i in scores:
            s = scores[i]
            # For a program, the "format" is having run cleanly and printed an answer.
            out.append(ProgramVerdict(VerifyResult(s.extracted, s.correct, s.extracted is not None,
                                                   s.error, "program"), ran[i]))
        else:
            r = ran[i]
            out.append(ProgramVerdict(VerifyResult(None, False, False,
                                                   f"program: {r.failure} (isolation level {r.level})",
                                                   "program"), r))
    return out


def score_responses(items: Sequence, verifier, pool=None) -> list[VerifyResult]:
    """Verdicts for (response, reference) pairs under verifier.rationale: cot reads the text,
    pot runs the program (see score_programs)."""
    if verifier.rationale == "pot":
        return [v.verdict for v in score_programs(items, verifier, pool)]
    return score_samples(items, last_number_fallback=verifier.last_number_fallback,
                         timeout_s=verifier.timeout_s, workers=verifier.workers)
