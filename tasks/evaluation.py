"""Evaluate the student after a round's training (FDD step 6).

Two measurements, both through the Backend interface only (the caller builds the student backend,
e.g. an HFBackend on base + adapter; vLLM drops in later without changes here):

- eval sets: greedy (T=0) pass@1 accuracy, one sample per problem, grouped by `Problem.source`;
- training pool: `pool_k` samples per problem at `pool_temperature`, the share correct is the
  problem's pass rate, which the split step turns into easy / hard.

Every sample is returned as a plain row (problem_id, eval_set, sample_index, response, extracted,
correct, ...), so accuracy and pass rates can be recomputed from the stored rows alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from stillhouse.tasks.backends.base import Backend, Progress, SampleRequest, SamplingParams, derive_seed
from stillhouse.tasks.config import EvalConfig, PromptsConfig, VerifierConfig
from stillhouse.tasks.problems import Problem

log = logging.getLogger(__name__)

POOL = "pool"  # the eval_set name of training-pool rows


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion (None for n = 0): honest at small n and at 0 or 1,
    where the normal approximation gives [0, 0] or intervals outside [0, 1].

    >>> [round(x, 3) for x in wilson_interval(3, 6)]
    [0.188, 0.812]
    >>> [round(x, 3) for x in wilson_interval(0, 6)]
    [0.0, 0.39]
    """
    if n <= 0:
        return None
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    # At 0 or n correct the bound is exactly 0 or 1 (rounding would leave it a hair inside).
    lo = 0.0 if correct == 0 else max(0.0, center - half)
    hi = 1.0 if correct == n else min(1.0, center + half)
    return lo, hi


def accuracy_text(accuracy: float | None, n: int | None) -> str:
    """An accuracy as it is shown everywhere: value, 95% interval and n.

    >>> accuracy_text(0.5, 6)
    '0.500 [0.188, 0.812] n=6'
    """
    if accuracy is None or not n:
        return "-"
    lo, hi = wilson_interval(round(accuracy * n), n)
    return f"{accuracy:.3f} [{lo:.3f}, {hi:.3f}] n={n}"


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]  # one per sample, eval rows first, then pool rows
    accuracy: dict[str, float]  # eval set -> greedy pass@1
    eval_counts: dict[str, int]  # eval set -> problems evaluated
    pass_rates: dict[str, float]  # pool problem id -> share of its pool_k samples correct
    skipped_eval: int = 0  # eval problems left out by max_eval_problems
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def overall_accuracy(self) -> float | None:
        """Micro average over every evaluated problem (None when there were none)."""
        total = sum(self.eval_counts.values())
        if not total:
            return None
        return sum(self.accuracy[s] * n for s, n in self.eval_counts.items()) / total

    def summary(self) -> dict[str, Any]:
        rates = list(self.pass_rates.values())
        total = sum(self.eval_counts.values())
        overall = self.overall_accuracy
        return {
            "accuracy": dict(self.accuracy),
            "eval_counts": dict(self.eval_counts),
            "accuracy_ci": {s: wilson_interval(round(a * self.eval_counts[s]), self.eval_counts[s])
                            for s, a in self.accuracy.items()},
            "overall_accuracy": overall,
            "overall_ci": wilson_interval(round(overall * total), total) if overall is not None else None,
            "eval_total": total,
            "pool_problems": len(rates),
            "pool_mean_pass_rate": sum(rates) / len(rates) if rates else None,
            "skipped_eval": self.skipped_eval,
        }


def cap_eval_problems(problems: list[Problem], cap: int | None) -> list[Problem]:
    """At most `cap` problems, taken round-robin over eval sets (in order of first appearance) so
    that every set stays represented; order within a set is kept. Deterministic."""
    if cap is None or len(problems) <= cap:
        return list(problems)
    by_set: dict[str, list[int]] = {}
    for idx, p in enumerate(problems):
        by_set.setdefault(p.source, []).append(idx)
    chosen: set[int] = set()
    i = 0
    while len(chosen) < cap:
        for positions in by_set.values():
            if i < len(positions) and len(chosen) < cap:
                chosen.add(positions[i])
        i += 1
    return [p for idx, p in enumerate(problems) if idx in chosen]


def _unique(problems: list[Problem], what: str) -> list[Problem]:
    seen: set[str] = set()
    out = []
    for p in problems:
        if p.id in seen:
            continue
        seen.add(p.id)
        out.append(p)
    if len(out) != len(problems):
        log.warning("evaluation: %d duplicate %s problem ids ignored", len(problems) - len(out), what)
    return out


def evaluate_student(
    backend: Backend,
    eval_problems: list[Problem],
    pool_problems: list[Problem],
    cfg: EvalConfig,
    prompts: PromptsConfig,
    *,
    verifier: VerifierConfig | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> EvalResult:
    """Greedy pass@1 per eval set and pool_k-sample pass rates on the pool (see module docstring).

    Seeds: derive_seed(seed, 'eval/<id>' or 'pool/<id>', sample_index); greedy decoding ignores
    them, the pool samples are reproducible from them.
    """
    from stillhouse.tasks.prompts import solve_messages
    from stillhouse.tasks.verify.programs import score_responses

    verifier = verifier or VerifierConfig()
    all_evals = _unique(list(eval_problems), "eval")
    if any(p.source == POOL for p in all_evals):
        raise ValueError(f"an eval set may not be named {POOL!r}: that name marks training-pool rows")
    evals = cap_eval_problems(all_evals, cfg.max_eval_problems)
    skipped = len(all_evals) - len(evals)
    pool = _unique(list(pool_problems), "pool")

    def requests(problems: list[Problem], prefix: str, k: int) -> list[SampleRequest]:
        out = []
        for p in problems:
            msgs = tuple(solve_messages(p.question, prompts))
            key = f"{prefix}/{p.id}"
            out.extend(SampleRequest(key, i, msgs, derive_seed(seed, key, i)) for i in range(k))
        return out

    eval_params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=cfg.max_new_tokens)
    pool_params = SamplingParams(
        temperature=cfg.pool_temperature, top_p=cfg.pool_top_p, max_new_tokens=cfg.max_new_tokens
    )
    eval_reqs = requests(evals, "eval", 1)
    pool_reqs = requests(pool, POOL, cfg.pool_k)
    eval_comps = backend.sample(eval_reqs, eval_params, progress) if eval_reqs else []
    pool_comps = backend.sample(pool_reqs, pool_params, progress) if pool_reqs else []
    for reqs, comps in ((eval_reqs, eval_comps), (pool_reqs, pool_comps)):
        if len(comps) != len(reqs):
            raise RuntimeError(f"backend returned {len(comps)} completions for {len(reqs)} requests")

    # (problem, eval_set) per request, in request order.
    owners = [(p, p.source) for p in evals] + [
        (p, POOL) for p in pool for _ in range(cfg.pool_k)
    ]
    all_reqs = eval_reqs + pool_reqs
    all_comps = eval_comps + pool_comps
    # One scoring call for everything: the verifier's (or the sandbox's) worker pool starts once.
    # pot: the student's programs run in the same sandbox as the teacher's.
    scores = score_responses(
        [(c.text, p.answer) for c, (p, _) in zip(all_comps, owners, strict=True)], verifier
    )

    rows: list[dict[str, Any]] = []
    for req, comp, (p, eval_set), score in zip(all_reqs, all_comps, owners, scores, strict=True):
        rows.append(
            {
                "problem_id": p.id,
                "eval_set": eval_set,
                "sample_index": req.sample_index,
                "response": comp.text,
                "extracted": score.extracted,
                "correct": bool(score.correct),
                "format_ok": bool(score.format_ok),
                "error": score.error,
                "finish_reason": comp.finish_reason,
                "completion_tokens": comp.completion_tokens,
                "temperature": eval_params.temperature if eval_set != POOL else pool_params.temperature,
                "seed": req.seed,
            }
        )

    correct_by_set: dict[str, int] = {}
    eval_counts: dict[str, int] = {}
    pool_correct: dict[str, int] = {p.id: 0 for p in pool}
    for row in rows:
        if row["eval_set"] == POOL:
            pool_correct[row["problem_id"]] += row["correct"]
        else:
            s = row["eval_set"]
            eval_counts[s] = eval_counts.get(s, 0) + 1
            correct_by_set[s] = correct_by_set.get(s, 0) + row["correct"]
    accuracy = {s: correct_by_set[s] / n for s, n in eval_counts.items()}
    pass_rates = {pid: c / cfg.pool_k for pid, c in pool_correct.items()}
    result = EvalResult(
        rows=rows,
        accuracy=accuracy,
        eval_counts=eval_counts,
        pass_rates=pass_rates,
        skipped_eval=skipped,
        meta={
            "pool_k": cfg.pool_k,
            "pool_temperature": cfg.pool_temperature,
            "pool_top_p": cfg.pool_top_p,
            "max_new_tokens": cfg.max_new_tokens,
            "seed": seed,
            "backend": getattr(backend, "name", type(backend).__name__),
        },
    )
    log.info("evaluation: %s", result.summary())
    return result
