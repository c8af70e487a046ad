"""Problem sources: local files and Hugging Face datasets here, the packaged and generated sets
(GSM-Symbolic, CHAMP, arithmetic stories) in problem_sets.py; LOADERS maps a `kind` to its loader.

Every source is normalised into `Problem` records. A row that cannot become a problem (missing or
empty question/answer, an over-long answer, an invalid JSON line, a duplicate) is reported as a
`SkippedRow` with its row number and logged, never dropped silently. A config mistake that would
skip *every* row (a column that does not exist, a file that cannot be read) is an error instead.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any, Callable, Iterable

from stillhouse.tasks.config import SourceConfig
from stillhouse.tasks.problem_sets import (
    ARITHMETIC_STORIES,
    arithmetic_split,
    gsm_symbolic_split,
    load_arithmetic,
    load_champ,
    load_gsm_symbolic,
)
from stillhouse.tasks.problems import Problem, RawRow, SourceError
from stillhouse.tasks.verify.numbers import plain_number_text

logger = logging.getLogger(__name__)



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



def normalize_reference(answer: str) -> str:
    """The final answer of a reference: GSM8K's '<rationale> #### 1,234' -> '1234'.

    Only the text after the last '####' is kept. A plain number loses thousands separators,
    whitespace, '$' and a leading '+'; decimals are kept as written ('12.50' stays '12.50').
    Anything else (fractions, LaTeX, expressions, '1,23', lists) is only stripped: '$' there may
    be LaTeX math, and a comma may not be a thousands separator.
    """
    text = answer.rsplit("####", 1)[-1].strip()
    number = plain_number_text(text)
    return text if number is None else number


# --------------------------------------------------------------------------- shared row handling


def _as_text(value: Any) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason) for a question/answer cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "missing"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None, f"not text ({type(value).__name__})"
    text = str(value)
    return (text, None) if text.strip() else (None, "empty")


# A reference may be a whole solution (GSM8K's rationale before "#### N"); beyond this it is not.
_MAX_RAW_ANSWER_CHARS = 100_000
_DIGIT_RUN = re.compile(r"\d+")


def _longest_digit_run(text: str) -> int:
    """Digits in the longest number of `text` (thousands separators end a run: GSM8K writes 1,234)."""
    return max((len(m) for m in _DIGIT_RUN.findall(text)), default=0)


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
    if len(question) > cfg.max_question_chars:
        return skip("question", f"too long ({len(question)} > max_question_chars={cfg.max_question_chars})")
    if len(answer) > _MAX_RAW_ANSWER_CHARS:
        # Before normalising: a GSM8K rationale is long, a megabyte is not an answer.
        return skip("answer", f"too long ({len(answer)} chars)")
    answer = normalize_reference(answer)
    if not answer:
        return skip("answer", "empty after normalisation")
    if len(answer) > cfg.max_answer_chars:
        return skip("answer", f"too long ({len(answer)} > max_answer_chars={cfg.max_answer_chars})")
    for field_, text in (("question", question), ("answer", answer)):
        digits = _longest_digit_run(text)
        if digits > cfg.max_number_digits:
            return skip(field_, f"number too long ({digits} digits > max_number_digits={cfg.max_number_digits})")
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


def source_location(cfg: SourceConfig) -> str:
    """What a user reads in a message about a source: its kind and file or dataset."""
    where = cfg.path or cfg.dataset
    return f"{cfg.kind} {where}" if where else cfg.kind


def _log_summary(source: str, cfg: SourceConfig, kept: int, skipped: list[SkippedRow]) -> None:
    if not skipped:
        logger.info("source %r (%s): %d problems", source, source_location(cfg), kept)
        return
    reasons = Counter(f"{s.field or 'row'} {re.split(r' [(]|:| of ', s.reason)[0]}" for s in skipped)
    logger.warning(
        "source %r (%s): %d problems, %d rows skipped (%s); first: %s",
        source, source_location(cfg), kept, len(skipped), ", ".join(f"{r}: {n}" for r, n in reasons.most_common()),
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


def _check_column_types(cfg: SourceConfig, schema: Any, where: str) -> None:
    """Question and answer columns must hold text or numbers. A list, struct or binary column
    would skip every row with the same warning; say it once, naming the column and its type."""
    import pyarrow as pa

    for role, name in (("question", cfg.columns.question), ("answer", cfg.columns.answer)):
        kind = schema.field(name).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
                or pa.types.is_integer(kind)
                or pa.types.is_floating(kind) or pa.types.is_decimal(kind) or pa.types.is_null(kind)):
            raise SourceError(
                f"column {name!r} ({role}) of {where} holds {kind}, not text or numbers; "
                "point `columns` at a text column (or flatten the column first)"
            )


def _record_row(row: int, rec: dict, cfg: SourceConfig) -> RawRow:
    meta: dict[str, Any] = {"row": row}
    if cfg.columns.id and rec.get(cfg.columns.id) is not None:
        meta["upstream_id"] = rec[cfg.columns.id]
    return RawRow(row, rec.get(cfg.columns.question), rec.get(cfg.columns.answer), meta)


def _unreadable(cfg: SourceConfig, err: Exception) -> SourceError:
    detail = getattr(err, "strerror", None) or str(err)
    return SourceError(f"cannot read {cfg.kind} source {cfg.path}: {detail}")


def _json_int(text: str) -> int | str:
    """JSON integers as ints, except ones Python refuses to convert (over 4,300 digits): those stay
    text, so that the row is reported (answer too long) instead of a ValueError naming no row."""
    return int(text) if len(text) <= 4_000 else text


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
            rec = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"), parse_int=_json_int)
        except UnicodeDecodeError as err:
            parsed.append((number, f"not UTF-8: {err.reason} at byte {err.start}"))
            continue
        except json.JSONDecodeError as err:
            parsed.append((number, f"invalid JSON: {err.msg} at column {err.colno}"))
            continue
        except RecursionError:
            parsed.append((number, "invalid JSON: nested too deeply"))
            continue
        parsed.append((number, rec if isinstance(rec, dict) else f"not a JSON object ({type(rec).__name__})"))
    records = [rec for _, rec in parsed if isinstance(rec, dict)]
    if records:  # a column no line has is a config error, not a million skipped rows
        _check_columns(cfg, dict.fromkeys(k for rec in records for k in rec), f"jsonl file {cfg.path}")
    return [
        _record_row(n, rec, cfg) if isinstance(rec, dict) else RawRow(n, error=rec) for n, rec in parsed
    ]


# csv's default field limit (128 KB) would fail the whole file on one over-long cell; read such a
# cell and let max_question_chars / max_answer_chars report its row instead.
_CSV_FIELD_LIMIT = 64 * 1024 * 1024


def load_csv(cfg: SourceConfig) -> list[RawRow]:
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
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
    _check_column_types(cfg, pf.schema_arrow, f"parquet file {cfg.path}")
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
    _check_column_types(cfg, ds.data.schema, where)
    columns = _wanted(cfg)
    row = 0
    for batch in ds.select_columns(columns).iter(batch_size=1024):
        for values in zip(*(batch[c] for c in columns)):
            row += 1
            yield _record_row(row, dict(zip(columns, values)), cfg)


LOADERS: dict[str, Callable[[SourceConfig], Iterable[RawRow]]] = {
    "jsonl": load_jsonl,
    "parquet": load_parquet,
    "csv": load_csv,
    "hf": load_hf,
    "gsm_symbolic": load_gsm_symbolic,
    "champ": load_champ,
    "arithmetic": load_arithmetic,
}
