"""Every catalog table's schema, in one place.

Each table is a `TableSpec`: a pyarrow schema (nullability is part of the contract), the key that
makes inserts idempotent, the allowed values of enum-like columns, and which columns hold JSON text.
The DuckLake DDL is generated from the pyarrow schema so the two can never disagree.

`conform(spec, rows)` turns caller input (a list of dicts or a pyarrow Table) into a Table of exactly
the spec's schema or raises ValueError naming the column (and the row for a bad value). It runs
before anything touches the catalog, so a bad batch never half-writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

# Bumped when a table's columns change; stored nowhere yet (no migration has been needed).
SCHEMA_VERSION = 1


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


STR, INT, FLOAT, BOOL = pa.string(), pa.int64(), pa.float64(), pa.bool_()
# Naive timestamps that are always UTC: TIMESTAMPTZ would need DuckDB's ICU extension and would
# come back in the session's time zone.
TS = pa.timestamp("us")


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    # column -> allowed values; checked on insert.
    enums: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Columns holding JSON text: dict/list values are serialised (sorted keys), strings must parse.
    json_columns: tuple[str, ...] = ()
    # The column naming the round a row belongs to. New rows of a committed round are refused
    # (a committed round is immutable); None where rows are written after their round's commit.
    frozen_round_column: str | None = None

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    @property
    def required(self) -> list[str]:
        return [f.name for f in self.schema if not f.nullable]


PROBLEMS = TableSpec(
    name="problems",
    schema=pa.schema(
        [
            _f("problem_id", STR),  # stable content hash, computed by the caller
            _f("question", STR),
            _f("answer", STR),  # reference answer
            _f("source", STR),
            _f("split", STR),
            _f("parent_id", STR, nullable=True),  # the problem this one was synthesized from
            _f("operation", STR),
            _f("round_introduced", INT),
            _f("meta", STR, nullable=True),
        ]
    ),
    key=("problem_id",),
    enums={"split": ("train", "eval"), "operation": ("seed", "harder", "similar")},
    json_columns=("meta",),
    frozen_round_column="round_introduced",
)

SAMPLES = TableSpec(
    name="samples",
    schema=pa.schema(
        [
            _f("sample_id", STR),  # deterministic from problem_id, round, sample_index, teacher
            _f("problem_id", STR),
            _f("round", INT),
            _f("sample_index", INT),
            _f("teacher", STR),
            _f("prompt", STR),
            _f("response", STR),
            _f("extracted", STR, nullable=True),
            _f("correct", BOOL),
            _f("format_ok", BOOL),
            _f("reward", FLOAT),
            _f("advantage", FLOAT),
            _f("weight", FLOAT),
            _f("error", STR, nullable=True),
            _f("sampling_params", STR),
            _f("prompt_tokens", INT),
            _f("completion_tokens", INT),
            _f("finish_reason", STR),
        ]
    ),
    key=("sample_id",),
    json_columns=("sampling_params",),
    frozen_round_column="round",
)

ROUNDS = TableSpec(
    name="rounds",
    schema=pa.schema(
        [
            _f("round", INT),
            _f("status", STR),
            _f("snapshot_id", INT),  # the DuckLake snapshot that is this round's dataset version
            _f("committed_at", TS),
            _f("config_hash", STR),
            _f("metrics", STR),
        ]
    ),
    key=("round",),
    enums={"status": ("committed",)},
    json_columns=("metrics",),
)

# Student results, written after the round's dataset was committed (train -> evaluate), so they
# become part of the next round's version.
EVAL_RESULTS = TableSpec(
    name="eval_results",
    schema=pa.schema(
        [
            _f("round", INT),
            # hash of the adapter and eval settings that produced the row: a rerun with another
            # student (e.g. a changed learning rate) adds its own rows instead of being skipped.
            _f("student_key", STR),
            _f("eval_set", STR),  # an eval set name, or "pool" for pass rates on the training pool
            _f("problem_id", STR),
            _f("sample_index", INT),
            _f("response", STR),
            _f("extracted", STR, nullable=True),
            _f("correct", BOOL),
        ]
    ),
    key=("round", "student_key", "eval_set", "problem_id", "sample_index"),
)

SPLIT_LABELS = TableSpec(
    name="split_labels",
    schema=pa.schema(
        [
            _f("round", INT),
            _f("student_key", STR),
            _f("problem_id", STR),
            _f("pass_rate", FLOAT),
            _f("label", STR),
        ]
    ),
    key=("round", "student_key", "problem_id"),
    enums={"label": ("easy", "mid", "hard")},
)

# Every problem the teacher wrote in a round's synthesis step, kept or not, with why: written in the
# same transaction as the kept problems (Catalog.add_synthesis), after the round's commit, so they
# become part of the next round's version, like the problems they explain.
SYNTHESIS_RECORDS = TableSpec(
    name="synthesis_records",
    schema=pa.schema(
        [
            _f("round", INT),  # the round whose split the synthesis worked from
            # hash of the synthesis step's inputs: a rerun after a config change adds its own rows.
            _f("synthesis_key", STR),
            _f("generation_key", STR),  # synth/r<round>/<operation>/<parent_id>
            _f("parent_id", STR),
            _f("operation", STR),
            _f("seed", INT),
            _f("reply", STR),  # the teacher's reply, verbatim
            _f("finish_reason", STR, nullable=True),
            _f("question", STR, nullable=True),  # the parsed problem; null when parsing rejected it
            _f("status", STR),
            _f("reason", STR, nullable=True),  # the drop reason; null when kept
            _f("detail", STR, nullable=True),
            _f("problem_id", STR, nullable=True),  # the kept problem
            _f("answer", STR, nullable=True),  # its reference: the majority answer
            _f("agreement", FLOAT, nullable=True),
            _f("votes", STR, nullable=True),  # JSON list: the teacher's extracted answers, in order
        ]
    ),
    key=("round", "synthesis_key", "generation_key"),
    enums={
        "operation": ("harder", "similar"),
        "status": ("kept", "dropped"),
    },  # reason: synthesis owns the list of drop reasons (tasks.synthesis.synthesize.DROP_REASONS)
    json_columns=("votes",),
)

# Problems in the catalog that no step may hand to a model, with why (issue 16): a prompt that does
# not fit the teacher's or the student's context. Found before any model work of a run (seed step)
# and of each round (sample step); the pool and the eval sets leave them out from then on, so one
# poisoned row costs itself, not every resume. Keyed by problem: quarantine is for good.
QUARANTINE = TableSpec(
    name="quarantine",
    schema=pa.schema(
        [
            _f("problem_id", STR),
            _f("round", INT),  # the round being prepared when it was found
            _f("reason", STR),
            _f("detail", STR),  # e.g. "teacher prompt 262,147 tokens + 32 new > context 2,048"
        ]
    ),
    key=("problem_id",),
    enums={"reason": ("prompt_too_long",)},
)

TABLES: dict[str, TableSpec] = {
    s.name: s for s in (PROBLEMS, SAMPLES, ROUNDS, EVAL_RESULTS, SPLIT_LABELS, SYNTHESIS_RECORDS, QUARANTINE)
}
# Tables added after the first catalogs were written: a read-only open of an older catalog does
# without them (reads come back empty); a writable open creates them.
LATER_TABLES = ("synthesis_records", "quarantine")

SQL_TYPES = {STR: "VARCHAR", INT: "BIGINT", FLOAT: "DOUBLE", BOOL: "BOOLEAN", TS: "TIMESTAMP"}


def spec_for(table: str) -> TableSpec:
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(f"unknown table {table!r}; known: {sorted(TABLES)}") from None


def ddl(spec: TableSpec, catalog: str) -> str:
    """CREATE TABLE for DuckLake. NOT NULL is enforced by DuckLake too (it has no keys/uniques)."""
    cols = ",\n  ".join(
        f"{f.name} {SQL_TYPES[f.type]}{'' if f.nullable else ' NOT NULL'}" for f in spec.schema
    )
    return f"CREATE TABLE IF NOT EXISTS {catalog}.{spec.name} (\n  {cols}\n)"


# --------------------------------------------------------------------------- validation


def _kind(t: pa.DataType) -> str:
    """Type families between which a cast is lossless in meaning (int32 -> int64, large_string -> string)."""
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "str"
    if pa.types.is_timestamp(t):
        return "ts"
    return str(t)


# Which input families may be cast to each target family. Strings are never parsed into numbers:
# a numeric column given as text is a caller bug, not something to guess about.
_CASTABLE = {
    "str": {"str"},
    "int": {"int"},
    "float": {"float", "int"},
    "bool": {"bool"},
    "ts": {"ts"},
}


def _json_text(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return value


def _from_rows(spec: TableSpec, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Dicts -> Table with inferred types; `_from_table` then applies the one casting rule.

    Inferring first (instead of pa.array(values, type=target)) is deliberate: pyarrow would
    silently truncate 1.5 into an int64 column.
    """
    names: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{spec.name}: row {i} is a {type(row).__name__}, expected a dict")
        names.update(dict.fromkeys(row))
    arrays = {}
    for name in names:
        values = [row.get(name) for row in rows]
        if name in spec.json_columns:
            values = [_json_text(v) for v in values]
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
            raise ValueError(f"{spec.name}.{name}: mixed or unsupported value types ({e})") from e
    return _from_table(spec, pa.table(arrays) if arrays else pa.table({}))


def _check_names(spec: TableSpec, names: set[str]) -> None:
    missing = [c for c in spec.required if c not in names]
    if missing:
        raise ValueError(f"{spec.name}: missing required column(s) {missing}")
    unknown = sorted(names - set(spec.columns))
    if unknown:
        # A typo ('questoin') would otherwise be dropped silently and the real column left null.
        raise ValueError(f"{spec.name}: unknown column(s) {unknown}; expected {spec.columns}")


def _from_table(spec: TableSpec, table: pa.Table) -> pa.Table:
    _check_names(spec, set(table.column_names))
    if len(set(table.column_names)) != len(table.column_names):
        raise ValueError(f"{spec.name}: duplicate column names in {table.column_names}")
    arrays = []
    for f in spec.schema:
        if f.name not in table.column_names:
            arrays.append(pa.nulls(table.num_rows, f.type))
            continue
        col = table.column(f.name)
        if col.type != f.type:
            src, dst = _kind(col.type), _kind(f.type)
            if src != "null" and src not in _CASTABLE[dst]:
                raise ValueError(f"{spec.name}.{f.name}: wrong type {col.type}, expected {f.type}")
            try:
                col = col.cast(f.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ValueError(
                    f"{spec.name}.{f.name}: cannot cast {col.type} to {f.type} ({e})"
                ) from e
        arrays.append(col)
    return pa.Table.from_arrays(arrays, schema=_nullable(spec.schema))


def _nullable(schema: pa.Schema) -> pa.Schema:
    # Null checks give a row index; building with NOT NULL fields first would fail without one.
    return pa.schema([f.with_nullable(True) for f in schema])


def _check_values(spec: TableSpec, table: pa.Table) -> None:
    for f in spec.schema:
        col = table.column(f.name)
        if not f.nullable and col.null_count:
            row = pc.index(pc.is_null(col), True).as_py()
            raise ValueError(f"{spec.name}.{f.name}: null in non-null column at row {row}")
        allowed = spec.enums.get(f.name)
        if allowed is not None:
            ok = pc.fill_null(pc.is_in(col, value_set=pa.array(allowed, type=STR)), True)
            if not pc.all(ok).as_py():
                row = pc.index(ok, False).as_py()
                raise ValueError(
                    f"{spec.name}.{f.name}: value {col[row].as_py()!r} at row {row} "
                    f"not in {list(allowed)}"
                )
        if f.name in spec.json_columns:
            _check_json(spec, f.name, col)


def _check_json(spec: TableSpec, name: str, col: pa.ChunkedArray) -> None:
    # Parse only distinct values: sampling_params repeats one value across a whole round.
    for value in pc.unique(col).to_pylist():
        if value is None:
            continue
        try:
            json.loads(value)
        except json.JSONDecodeError as e:
            row = pc.index(col, value).as_py()
            raise ValueError(
                f"{spec.name}.{name}: not JSON at row {row}: {value[:80]!r} ({e})"
            ) from e


def conform(spec: TableSpec, rows: pa.Table | Sequence[Mapping[str, Any]]) -> pa.Table:
    """Caller input -> a Table of exactly `spec.schema` (column order, types), or ValueError."""
    if isinstance(rows, pa.RecordBatch):
        rows = pa.Table.from_batches([rows])
    table = _from_table(spec, rows) if isinstance(rows, pa.Table) else _from_rows(spec, list(rows))
    table = table.cast(_nullable(spec.schema)) if table.schema != _nullable(spec.schema) else table
    _check_values(spec, table)
    return table.cast(spec.schema)
