"""Synthesis: the teacher writes new problems from the student's feedback (FDD step 8).

For each easy problem the teacher writes a harder variant, for each hard one a new problem of
similar difficulty. Every generation then passes, in this order:

  parse          strip prefixes, chatter, markdown and appended solutions; reject empty/short/long
                 outputs, outputs that ask nothing, and copies of the parent
  contamination  any shared word n-gram (size `contamination_ngram`) with an eval problem rejects it
  dedup          exact (normalize_question) or near (word n-gram Jaccard >= dedup_threshold)
                 duplicates of the pool, then of the problems already accepted this round
  vote           the teacher solves it `reference_samples` times; the majority answer (by
                 equivalence) becomes the reference if it holds >= agreement_threshold of ALL samples
  cap            `max_per_round` keeps the first survivors in candidate order

Every generation ends either kept or dropped with one reason; `SynthesisResult.records` has one row
per generation saying which, so nothing disappears silently (generated == kept + sum(dropped)).

The pure pieces (parse, n-gram indexes, majority vote) need no model. The verifier and prompts
modules are imported inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from stillhouse.tasks.backends.base import Backend, Progress, SampleRequest, SamplingParams, derive_seed
from stillhouse.tasks.config import PromptsConfig, SamplingConfig, SynthesisConfig, VerifierConfig
from stillhouse.tasks.problems import Problem, normalize_question
from stillhouse.tasks.synthesis.dedup import ContaminationIndex, DedupIndex
from stillhouse.tasks.synthesis.parse import PARSE_REASONS, parse_generated_problem
from stillhouse.tasks.synthesis.vote import verifier_equivalence, vote

log = logging.getLogger(__name__)

# Drop reasons, in the order the checks run. `SynthesisResult.dropped` always has every key.
DROP_REASONS = PARSE_REASONS + (
    "contaminated",
    "duplicate_pool",
    "duplicate_new",
    "no_agreement",
    "over_cap",
)


# --------------------------------------------------------------------------- teacher-driven


@dataclass
class SynthesisResult:
    problems: list[Problem]  # kept, in candidate order, ready to join the next round's pool
    solutions: list[dict]  # teacher solve samples of the kept problems (plain rows)
    records: list[dict]  # one row per generation: what was written and what became of it
    generated: int
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    @property
    def kept(self) -> int:
        return len(self.problems)

    @property
    def counts(self) -> dict[str, Any]:
        by_op = {op: sum(p.operation == op for p in self.problems) for op in ("harder", "similar")}
        return {
            "generated": self.generated,
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "kept_by_operation": by_op,
        }


def _synth_source(parent_source: str) -> str:
    return parent_source if parent_source.endswith("/synth") else f"{parent_source}/synth"


def _interleave(easy: list[Problem], hard: list[Problem]) -> list[tuple[Problem, str]]:
    """easy/hard round-robin so that a max_per_round cap keeps both kinds, not just the first list."""
    out: list[tuple[Problem, str]] = []
    seen: set[tuple[str, str]] = set()
    for i in range(max(len(easy), len(hard))):
        for lst, op in ((easy, "harder"), (hard, "similar")):
            if i < len(lst) and (lst[i].id, op) not in seen:
                seen.add((lst[i].id, op))
                out.append((lst[i], op))
    return out


def _round4(x: float) -> float:
    return float(f"{x:.4f}")


def _question_key(question: str) -> str:
    return hashlib.sha256(normalize_question(question).encode()).hexdigest()[:16]


def _program_answers(responses: list[str], verifier: VerifierConfig) -> list[Any]:
    """The answer each response's program prints (sandboxed), as an Extraction; a program that
    fails or prints nothing gives no answer (no vote)."""
    from stillhouse.tasks.sandbox.pool import SandboxPool
    from stillhouse.tasks.verify.extract import Extraction, extract_answer
    from stillhouse.tasks.verify.programs import extract_program

    if not responses:
        return []
    with SandboxPool(verifier.sandbox) as pool:
        runs = pool.run_many([extract_program(r) for r in responses])
    return [extract_answer(r.stdout, last_number_fallback=True) if r.failure is None
            else Extraction(None, "program", False, f"program: {r.failure}") for r in runs]


def synthesize(
    teacher_backend: Backend,
    easy: list[Problem],
    hard: list[Problem],
    pool: list[Problem],
    eval_problems: list[Problem],
    round: int,
    cfg: SynthesisConfig,
    prompts: PromptsConfig,
    sampling: SamplingConfig,
    *,
    verifier: VerifierConfig | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
) -> SynthesisResult:
    """Write, filter and answer new problems for round `round + 1` (see the module docstring).

    Seeds: derive_seed(seed, key, index) with keys naming the round, the operation and the parent
    (generation) or the candidate question (reference votes), so a rerun is reproducible.
    `seed` defaults to `sampling.seed`.
    """
    from stillhouse.tasks.prompts import harder_messages, similar_messages, solve_messages
    from stillhouse.tasks.verify.extract import extract_answer

    verifier = verifier or VerifierConfig()
    base_seed = sampling.seed if seed is None else seed
    dropped = dict.fromkeys(DROP_REASONS, 0)
    if not cfg.enabled:
        return SynthesisResult([], [], [], 0, dropped)

    # 1. one generation per (parent, operation)
    jobs = _interleave(list(easy), list(hard))
    gen_requests = []
    for parent, op in jobs:
        key = f"synth/r{round}/{op}/{parent.id}"
        build = harder_messages if op == "harder" else similar_messages
        gen_requests.append(
            SampleRequest(key, 0, tuple(build(parent.question, prompts)), derive_seed(base_seed, key, 0))
        )
    gen_params = SamplingParams(
        temperature=cfg.temperature, top_p=sampling.top_p, max_new_tokens=cfg.max_new_tokens
    )
    completions = teacher_backend.sample(gen_requests, gen_params, progress) if gen_requests else []
    if len(completions) != len(gen_requests):
        raise RuntimeError(
            f"teacher backend returned {len(completions)} completions for {len(gen_requests)} requests"
        )

    records: list[dict] = []

    def drop(rec: dict, reason: str, detail: str | None = None) -> None:
        rec.update(status="dropped", reason=reason, detail=detail)
        dropped[reason] += 1

    # 2. parse, contamination, dedup (cheap checks first, before any teacher solving)
    contamination = ContaminationIndex.from_problems(eval_problems, cfg.contamination_ngram)
    pool_index = DedupIndex(cfg.dedup_ngram, cfg.dedup_threshold).add_all((p.id, p.question) for p in pool)
    new_index = DedupIndex(cfg.dedup_ngram, cfg.dedup_threshold)
    candidates: list[dict] = []
    for (parent, op), req, comp in zip(jobs, gen_requests, completions, strict=True):
        rec: dict[str, Any] = {
            "round": round,
            "parent_id": parent.id,
            "operation": op,
            "key": req.key,
            "seed": req.seed,
            "raw_text": comp.text,
            "finish_reason": comp.finish_reason,
            "question": None,
            "status": None,
            "reason": None,
            "detail": None,
            "problem_id": None,
            "answer": None,
            "agreement": None,
            "votes": None,
        }
        records.append(rec)
        question, reason = parse_generated_problem(comp.text, parent.question, cfg)
        if reason is not None:
            drop(rec, reason)
            continue
        rec["question"] = question
        if (eval_id := contamination.match(question)) is not None:
            drop(rec, "contaminated", f"shares a {cfg.contamination_ngram}-gram with eval {eval_id}")
            continue
        if (m := pool_index.match(question)) is not None:
            drop(rec, "duplicate_pool", f"{m.kind} duplicate of {m.key} (jaccard {m.score:.2f})")
            continue
        if (m := new_index.match(question)) is not None:
            drop(rec, "duplicate_new", f"{m.kind} duplicate of new {m.key} (jaccard {m.score:.2f})")
            continue
        new_index.add(req.key, question)
        candidates.append({"rec": rec, "parent": parent, "op": op, "question": question})

    # 3. the teacher solves each candidate; the majority answer becomes its reference
    k = cfg.reference_samples
    solve_requests = []
    for cand in candidates:
        key = f"synth-ref/r{round}/{_question_key(cand['question'])}"
        cand["solve_key"] = key
        msgs = tuple(solve_messages(cand["question"], prompts))
        solve_requests.extend(
            SampleRequest(key, i, msgs, derive_seed(base_seed, key, i)) for i in range(k)
        )
    solve_params = SamplingParams.from_config(sampling)
    solves = teacher_backend.sample(solve_requests, solve_params, progress) if solve_requests else []
    if len(solves) != len(solve_requests):
        raise RuntimeError(
            f"teacher backend returned {len(solves)} completions for {len(solve_requests)} requests"
        )
    if verifier.rationale == "pot":
        # References by majority over the answers the teacher's programs print in the sandbox.
        extractions = _program_answers([c.text for c in solves], verifier)
    else:
        extractions = [
            extract_answer(c.text, last_number_fallback=verifier.last_number_fallback) for c in solves
        ]
    answer_lists = [
        [e.answer for e in extractions[c_idx * k : (c_idx + 1) * k]] for c_idx in range(len(candidates))
    ]
    equivalent = verifier_equivalence(
        answer_lists, timeout_s=verifier.timeout_s, workers=verifier.workers
    )

    kept: list[Problem] = []
    solutions: list[dict] = []
    for c_idx, cand in enumerate(candidates):
        rec = cand["rec"]
        group = solves[c_idx * k : (c_idx + 1) * k]
        group_reqs = solve_requests[c_idx * k : (c_idx + 1) * k]
        group_ext = extractions[c_idx * k : (c_idx + 1) * k]
        v = vote(answer_lists[c_idx], cfg.agreement_threshold, equivalent=equivalent)
        rec["agreement"] = v.agreement
        rec["votes"] = list(answer_lists[c_idx])  # the teacher's extracted answers, in sample order
        if v.answer is None:
            why = "tie" if v.tie else f"agreement {v.agreement:.2f} < {cfg.agreement_threshold}"
            drop(rec, "no_agreement", f"{why}; {v.clusters} distinct answers of {k}")
            continue
        if cfg.max_per_round is not None and len(kept) >= cfg.max_per_round:
            drop(rec, "over_cap", f"max_per_round={cfg.max_per_round}")
            continue
        parent = cand["parent"]
        meta = {
            "agreement": _round4(v.agreement),
            "votes": sum(v.in_majority),
            "reference_samples": k,
            "generation_seed": rec["seed"],
        }
        problem = Problem.make(
            cand["question"],
            v.answer,
            source=_synth_source(parent.source),
            split="train",
            parent_id=parent.id,
            operation=cand["op"],
            round_introduced=round + 1,
            meta=json.dumps(meta, sort_keys=True),
        )
        kept.append(problem)
        rec.update(status="kept", problem_id=problem.id, answer=problem.answer)
        for req, comp, ext, ok in zip(group_reqs, group, group_ext, v.in_majority, strict=True):
            solutions.append(
                {
                    "problem_id": problem.id,
                    "sample_index": req.sample_index,
                    "response": comp.text,
                    "extracted": ext.answer,
                    "correct": bool(ok),
                    "format_ok": bool(ext.format_ok),
                    "finish_reason": comp.finish_reason,
                    "prompt_tokens": comp.prompt_tokens,
                    "completion_tokens": comp.completion_tokens,
                    "seed": req.seed,
                    "temperature": solve_params.temperature,
                    "origin": "synthesis_vote",
                }
            )

    result = SynthesisResult(kept, solutions, records, len(records), dropped)
    if result.generated != result.kept + sum(dropped.values()):  # an invariant, kept under -O too
        raise RuntimeError(f"synthesis lost track of generations: {result.counts}")
    log.info(
        "synthesis round %d: generated %d, kept %d, dropped %s",
        round,
        result.generated,
        result.kept,
        {r: c for r, c in dropped.items() if c},
    )
    return result
