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
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from stillhouse.tasks.backends.base import Backend, Progress, SampleRequest, SamplingParams, derive_seed
from stillhouse.tasks.config import PromptsConfig, SamplingConfig, SynthesisConfig, VerifierConfig
from stillhouse.tasks.problems import Problem, normalize_question
from stillhouse.tasks.verify.numbers import compact_number, numeric_value, strip_answer

log = logging.getLogger(__name__)

# Drop reasons, in the order the checks run. `SynthesisResult.dropped` always has every key.
PARSE_REASONS = ("empty", "too_short", "too_long", "not_a_question", "copy_of_parent")
DROP_REASONS = PARSE_REASONS + (
    "contaminated",
    "duplicate_pool",
    "duplicate_new",
    "no_agreement",
    "over_cap",
)

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


def majority_answer(
    extracted_answers: list[str | None],
    threshold: float,
    *,
    use_verifier: bool = True,
    timeout_s: float = 5.0,
    workers: int | None = 0,
) -> tuple[str | None, float]:
    """(majority answer or None, agreement); agreement = share of ALL samples holding it.

    None answers count as disagreeing. Kept only if agreement >= threshold and there is no tie.
    With `use_verifier`, groups that are not both plain numbers are merged when the verifier
    (Math-Verify, via score_samples with `workers`; 0 = in process) says they are equal.
    """
    equivalent = (
        verifier_equivalence([extracted_answers], timeout_s=timeout_s, workers=workers)
        if use_verifier
        else None
    )
    v = vote(extracted_answers, threshold, equivalent=equivalent)
    return v.answer, v.agreement


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
    solve_params = SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_new_tokens=sampling.max_new_tokens,
        stop=tuple(sampling.stop),
    )
    solves = teacher_backend.sample(solve_requests, solve_params, progress) if solve_requests else []
    if len(solves) != len(solve_requests):
        raise RuntimeError(
            f"teacher backend returned {len(solves)} completions for {len(solve_requests)} requests"
        )
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
