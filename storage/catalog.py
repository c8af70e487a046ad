"""A run's DuckLake catalog: the versioned record of problems, samples, rounds and student results.

Layout (local): `<workdir>/catalog/metadata.ducklake` (a DuckDB file holding DuckLake's metadata and
small inlined inserts) and `<workdir>/catalog/data/` (the Parquet files). At scale pass a Postgres
catalog (`catalog_uri="postgres:dbname=... host=..."`, goes to ATTACH unchanged) and an
object-store `data_path` ("s3://bucket/run/": DuckDB's httpfs extension with an S3 secret from the
AWS environment variables, see stillhouse.storage.object_store).

Versioning model
- Every write is one DuckLake transaction, hence one snapshot, with a commit message.
- `commit_round(r)` writes the `rounds` row in its own transaction; the snapshot that transaction
  creates IS round r's dataset version (it holds everything written so far plus the round's row,
  so time travel to it also shows round r as committed). Its id is stored in that very row: it is
  predicted as current+1 and checked against `snapshots()` after the commit (a single writer holds
  the local catalog's file lock, so the prediction only fails under a concurrent remote writer,
  which is reported, not hidden).
- A committed round is immutable: new problems/samples whose round is committed are refused.
  Student results (eval_results, split_labels) of round r are produced after r's commit (train ->
  evaluate -> split), so they are not frozen and land in round r+1's version.
- Re-committing a committed round with the same config_hash returns its snapshot (idempotent
  resume; the first commit's metrics are kept). A different config_hash raises RoundCommittedError.
- Inserts are idempotent on each table's key (stillhouse.storage.schema): existing keys and in-batch repeats
  are skipped (first occurrence wins), existing rows are never changed.
- Large batches (>= bulk_rows) to a local data path are written as Parquet by pyarrow and
  registered with ducklake_add_data_files in the same transaction (see `_insert` for why);
  smaller ones use INSERT. Both give one snapshot; readers cannot tell them apart.

Concurrency: DuckDB locks the local catalog file, so a second process opening it (to write, or
read_only while a writer holds it) gets CatalogLockedError -- at once, or after waiting up to
`lock_wait_s` with backoff (the run's own steps wait: see tasks/steps.open_catalog). Several
read_only processes may share it. One Catalog object belongs to one thread (it holds one DuckDB
connection).

Readers beside a run (`stillhouse status`, `diff`, `export`, the report) open a *snapshot*
(`snapshot=True`): the metadata file (and a WAL left by a killed writer) is copied to a temporary
folder under a shared lock of the same kind DuckDB takes (POSIX record lock, here an open file
description lock), and the copy is attached read_only over the same data files. The lock is held
for the copy only (milliseconds), not for the reader's queries, so a reader never keeps a run's
commit out for longer than the copy, and the writer's bounded wait covers that window. DuckLake
data files are immutable once written, so the copy sees exactly the snapshot it was taken at.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import re
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stillhouse.storage import schema as S
from stillhouse.storage.ducklake_ext import load_ducklake, sql_str
from stillhouse.storage.object_store import ObjectStoreError, check_data_path, is_url, prepare_data_path
from stillhouse.storage.parquet_io import canonical_json, fsync_dir, fsync_file, write_json_atomic, write_parquet_atomic

log = logging.getLogger(__name__)

AUTHOR = "stillhouse"
# Batches at least this large are written by pyarrow and registered (see Catalog._insert).
DEFAULT_BULK_ROWS = 100_000
# Rows per bulk file: ~430 MB of samples, under DuckLake's 512 MB target file size.
BULK_FILE_ROWS = 1_000_000
Rows = pa.Table | Sequence[Mapping[str, Any]]


class CatalogError(RuntimeError):
    """The catalog cannot be opened or used as asked."""


class CatalogLockedError(CatalogError):
    """Another process holds the catalog open for writing."""


class RoundCommittedError(ValueError):
    """A committed round's version is immutable."""


class RoundNotCommittedError(CatalogError, KeyError):
    """A round asked for (diff, export, read) has no committed version. A KeyError for callers
    that look rounds up like keys; a CatalogError so that the CLI prints it as one line."""

    def __str__(self) -> str:  # KeyError's own __str__ would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class VersionDiff:
    """What changed between two rounds' versions (from_round -> to_round)."""

    from_round: int
    to_round: int
    from_snapshot: int
    to_snapshot: int
    problems_added: list[str] = field(default_factory=list)
    problems_removed: list[str] = field(default_factory=list)
    added_by_operation: dict[str, int] = field(default_factory=dict)
    samples_added_by_round: dict[int, int] = field(default_factory=dict)
    samples_removed_by_round: dict[int, int] = field(default_factory=dict)
    # Why problems the teacher wrote in rounds from_round .. to_round - 1 did not join the pool:
    # counts per drop reason, and each dropped generation (parent, operation, reason, detail).
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    dropped: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class RoundStatus:
    round: int
    status: str  # 'committed', or 'open' for a round with data but no commit yet
    snapshot_id: int | None
    committed_at: datetime | None
    config_hash: str | None
    problems: int  # problems in the catalog as of the round's version (pool + eval)
    samples: int  # this round's samples


@dataclass(frozen=True)
class CatalogStatus:
    workdir: str
    current_snapshot: int
    rounds: list[RoundStatus]


# How long a snapshot reader waits for a writer to let go of the catalog file: a commit holds it
# for seconds at most, so this is a bound for a stuck writer, not an expected wait.
SNAPSHOT_LOCK_WAIT_S = 60.0


def _is_local_file(catalog_uri: str) -> bool:
    """A DuckDB metadata file, as opposed to `postgres:...`, `sqlite:...` and the like."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", catalog_uri) is None


def _ofd_lock(fd: int, kind: int) -> None:
    # struct flock on x86-64 Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (int,
    # 0 for OFD locks), padded to 32 bytes. Whole file (start 0, len 0).
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", kind, os.SEEK_SET, 0, 0, 0))


def _backoff_waits(total_s: float) -> Iterator[float]:
    """Sleeps of an exponential backoff with jitter (10 ms doubling to 1 s) summing to total_s."""
    waited, step = 0.0, 0.01
    while waited < total_s:
        wait = min(step * (0.5 + random.random() / 2), total_s - waited)
        yield wait
        waited += wait
        step = min(step * 2, 1.0)


# Where a run's catalog lives when it is not the default `<workdir>/catalog` (a PostgreSQL
# catalog, an object-store data path): written by the run, read by `Catalog.for_workdir`, so the
# CLI and scheduled ticks find the catalog from the workdir alone.
LOCATION_FILE = "location.json"


class Catalog:
    """Open (or create) the DuckLake catalog of one run. Use as a context manager."""

    # Local catalog files this process has attached (path -> count): a snapshot of one of them
    # must not be taken here (closing the copy's descriptor would drop DuckDB's lock on it).
    _attached_here: dict[str, int] = {}

    @classmethod
    def for_workdir(cls, workdir: str | os.PathLike[str], **kwargs: Any) -> Catalog:
        """The run's catalog wherever it lives: `<workdir>/catalog`, or the location the run
        recorded there (see LOCATION_FILE). Explicit `catalog_uri` / `data_path` win."""
        location = Path(workdir) / "catalog" / LOCATION_FILE
        if location.is_file():
            recorded = json.loads(location.read_text())
            kwargs.setdefault("catalog_uri", recorded.get("catalog_uri"))
            kwargs.setdefault("data_path", recorded.get("data_path"))
        return cls(workdir, **kwargs)

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        catalog_uri: str | None = None,
        data_path: str | None = None,
        read_only: bool = False,
        alias: str = "lake",
        threads: int | None = None,
        bulk_rows: int = DEFAULT_BULK_ROWS,
        lock_wait_s: float = 0.0,
        snapshot: bool = False,
    ) -> None:
        """lock_wait_s: how long to wait, with backoff, while another process holds the catalog
        file (0: fail at once with CatalogLockedError). snapshot: read a copy of the catalog taken
        now, holding no lock a writer needs (implies read_only; a local catalog file only; see the
        module docstring)."""
        if not alias.isidentifier():
            raise ValueError(f"alias {alias!r} must be a plain identifier (it is spliced into SQL)")
        self.workdir = Path(workdir).resolve()
        read_only = read_only or snapshot
        self.read_only = read_only
        self.alias = alias
        self.bulk_rows = bulk_rows
        self.lock_wait_s = lock_wait_s
        local_dir = self.workdir / "catalog"
        self.catalog_uri = catalog_uri or str(local_dir / "metadata.ducklake")
        # What ATTACH opens: the catalog itself, or the snapshot's copy of it.
        self._attach_uri = self.catalog_uri
        self._snapshot_dir: str | None = None
        self._attached_file: str | None = None
        default_data = data_path is None
        try:
            self.data_path = check_data_path(data_path) if data_path else str(local_dir / "data") + "/"
        except ValueError as e:
            raise CatalogError(str(e)) from None
        if "password" in (catalog_uri or "").lower():
            # The location is recorded in the workdir; secrets belong in PGPASSWORD / ~/.pgpass.
            raise CatalogError("catalog_uri must not contain a password: use PGPASSWORD or a pgpass file")
        if not read_only:
            local_dir.mkdir(parents=True, exist_ok=True)
            if catalog_uri is not None or data_path is not None:
                write_json_atomic({"catalog_uri": catalog_uri, "data_path": data_path}, local_dir / LOCATION_FILE)
        if default_data and not read_only:
            Path(self.data_path).mkdir(parents=True, exist_ok=True)
        # Bulk files are written with pyarrow, so only to a local data path.
        local_data = not is_url(self.data_path)
        self._bulk_dir = Path(self.data_path) if local_data and bulk_rows > 0 else None

        config = {"threads": threads} if threads else {}
        self._con: duckdb.DuckDBPyConnection | None = duckdb.connect(":memory:", config=config)
        try:
            if snapshot and _is_local_file(self.catalog_uri):
                self._take_snapshot()
            load_ducklake(self._con)
            try:
                prepare_data_path(self._con, self.data_path)
            except ObjectStoreError as e:
                raise CatalogError(str(e)) from None
            self._attach(override_data_path=default_data)
            if read_only:
                self._check_tables()
            else:
                self._ensure_tables()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifecycle

    def _take_snapshot(self) -> None:
        """Copy the metadata file (and its WAL, if a killed writer left one) under a shared lock."""
        source = Path(self.catalog_uri)
        if not source.is_file():
            raise CatalogError(f"{self.workdir}: no catalog file {source}")
        if str(source.resolve()) in Catalog._attached_here:
            raise CatalogLockedError(
                f"the catalog of run workdir {self.workdir} is already open in this process "
                "(read it through that Catalog)"
            )
        self._snapshot_dir = tempfile.mkdtemp(prefix="stillhouse-catalog-")
        copy = Path(self._snapshot_dir) / source.name
        wait_s = max(self.lock_wait_s, SNAPSHOT_LOCK_WAIT_S)
        fd = os.open(source, os.O_RDONLY)
        try:
            for wait in [*_backoff_waits(wait_s), None]:
                try:
                    _ofd_lock(fd, fcntl.F_RDLCK)
                    break
                except (BlockingIOError, PermissionError):
                    if wait is None:
                        raise CatalogLockedError(
                            f"the catalog of run workdir {self.workdir} stayed open for writing for "
                            f"{wait_s:.0f}s; no snapshot could be taken"
                        ) from None
                    time.sleep(wait)
            # Copy through this descriptor: opening and closing another one on the file would
            # drop any POSIX lock this process holds on it.
            with os.fdopen(os.dup(fd), "rb") as src, open(copy, "wb") as dst:
                src.seek(0)
                shutil.copyfileobj(src, dst, 1 << 20)
            wal = source.with_name(source.name + ".wal")
            if wal.is_file():
                shutil.copyfile(wal, copy.with_name(copy.name + ".wal"))
        finally:
            os.close(fd)  # releases the lock
        self._attach_uri = str(copy)

    def _attach(self, override_data_path: bool) -> None:
        """ATTACH the catalog; while another process holds its file, wait up to lock_wait_s."""
        for wait in [*_backoff_waits(self.lock_wait_s), None]:
            try:
                return self._attach_once(override_data_path)
            except CatalogLockedError as err:
                if wait is None or "in this process" in str(err):
                    raise
                time.sleep(wait)

    def _attach_once(self, override_data_path: bool) -> None:
        self._attach_sql(override_data_path)
        if _is_local_file(self._attach_uri) and self._snapshot_dir is None:
            self._attached_file = str(Path(self._attach_uri).resolve())
            Catalog._attached_here[self._attached_file] = Catalog._attached_here.get(self._attached_file, 0) + 1

    def _attach_sql(self, override_data_path: bool) -> None:
        opts = [f"DATA_PATH '{sql_str(self.data_path)}'"]
        # The default data folder lives inside the workdir; overriding the stored absolute path
        # keeps a moved or copied workdir readable (file paths inside are relative to it).
        if override_data_path:
            opts.append("OVERRIDE_DATA_PATH TRUE")
        if self.read_only:
            opts.append("READ_ONLY")
        sql = f"ATTACH 'ducklake:{sql_str(self._attach_uri)}' AS {self.alias} ({', '.join(opts)})"
        try:
            self.con.execute(sql)
        except duckdb.IOException as e:
            if "lock" in str(e).lower():
                raise CatalogLockedError(
                    f"the catalog of run workdir {self.workdir} is open in another process "
                    f"(one writer at a time; close it or wait): {e}"
                ) from e
            raise CatalogError(f"cannot open the catalog of {self.workdir}: {e}") from e
        except duckdb.Error as e:
            if "file handle conflict" in str(e).lower():
                # DuckDB refuses a second attach of the same file within one process too.
                raise CatalogLockedError(
                    f"the catalog of run workdir {self.workdir} is already open in this process "
                    f"(close the other Catalog first): {e}"
                ) from e
            raise CatalogError(f"cannot open the catalog of {self.workdir}: {e}") from e
        log.debug(
            "attached %s (data %s, read_only=%s)", self.catalog_uri, self.data_path, self.read_only
        )

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise CatalogError(f"catalog of {self.workdir} is closed")
        return self._con

    def close(self) -> None:
        """Release the connection and with it the catalog file lock. Safe to call twice."""
        if self._con is not None:
            self._con.close()
            self._con = None
        if self._attached_file is not None:
            left = Catalog._attached_here.get(self._attached_file, 1) - 1
            if left > 0:
                Catalog._attached_here[self._attached_file] = left
            else:
                Catalog._attached_here.pop(self._attached_file, None)
            self._attached_file = None
        if self._snapshot_dir is not None:
            shutil.rmtree(self._snapshot_dir, ignore_errors=True)
            self._snapshot_dir = None

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _existing_tables(self) -> dict[str, list[tuple[str, str]]]:
        rows = self.con.execute(
            "SELECT table_name, column_name, data_type FROM duckdb_columns() "
            "WHERE database_name = ? ORDER BY table_name, column_index",
            [self.alias],
        ).fetchall()
        out: dict[str, list[tuple[str, str]]] = {}
        for table, col, typ in rows:
            out.setdefault(table, []).append((col, typ))
        return out

    def _check_tables(self) -> None:
        existing = self._existing_tables()
        for spec in S.TABLES.values():
            if spec.name not in existing:
                if self.read_only and spec.name not in S.LATER_TABLES:
                    raise CatalogError(
                        f"{self.workdir}: not a Stillhouse catalog (no table {spec.name})"
                    )
                continue
            want = [(f.name, S.SQL_TYPES[f.type]) for f in spec.schema]
            if existing[spec.name] != want:
                raise CatalogError(
                    f"{self.workdir}: table {spec.name} has columns {existing[spec.name]}, this "
                    f"Stillhouse expects {want} (written by another version?)"
                )

    def _ensure_tables(self) -> None:
        self._check_tables()
        existing = self._existing_tables()
        missing = [s for s in S.TABLES.values() if s.name not in existing]
        if not missing:
            return
        # All tables in one snapshot, so a fresh catalog has exactly one "schema" version.
        with self._transaction(f"create tables {[s.name for s in missing]}"):
            for spec in missing:
                self.con.execute(S.ddl(spec, self.alias))

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def _transaction(self, message: str, extra: Mapping[str, Any] | None = None) -> Iterator[None]:
        self._require_writable()
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield
            self.con.execute(
                f"CALL {self.alias}.set_commit_message(?, ?, extra_info => ?)",
                [AUTHOR, message, canonical_json(extra or {})],
            )
            self.con.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        # After a failed COMMIT DuckDB has already rolled back; a second ROLLBACK would raise
        # and hide the original error.
        try:
            self.con.execute("ROLLBACK")
        except duckdb.Error as e:
            log.debug("rollback: %s", e)

    def _require_writable(self) -> None:
        if self.read_only:
            raise CatalogError(f"catalog of {self.workdir} was opened read_only")

    @contextmanager
    def _registered(self, name: str, table: pa.Table) -> Iterator[str]:
        self.con.register(name, table)
        try:
            yield name
        finally:
            self.con.unregister(name)

    # ------------------------------------------------------------------ writes

    def add_problems(self, rows: Rows) -> int:
        """Insert problems; returns how many were new. Parents must exist (here or in the batch)."""
        return self._add(S.PROBLEMS, rows)

    def add_samples(self, rows: Rows) -> int:
        """Insert teacher samples; returns how many were new."""
        return self._add(S.SAMPLES, rows)

    def add_eval_results(self, rows: Rows) -> int:
        """Insert student eval results, keyed (round, eval_set, problem_id, sample_index)."""
        return self._add(S.EVAL_RESULTS, rows)

    def add_split_labels(self, rows: Rows) -> int:
        """Insert easy/mid/hard labels, keyed (round, problem_id)."""
        return self._add(S.SPLIT_LABELS, rows)

    def add_synthesis(self, problems: Rows, records: Rows) -> tuple[int, int]:
        """Insert a synthesis step's kept problems and its record of every generation (kept or
        dropped, with the reason) in one transaction; returns (new problems, new records)."""
        added = self._add_batches("add synthesis", [(S.PROBLEMS, problems), (S.SYNTHESIS_RECORDS, records)])
        return added[0], added[1]

    def add_quarantine(self, rows: Rows) -> int:
        """Quarantine problems (problem_id, round, reason, detail); returns how many were new."""
        return self._add(S.QUARANTINE, rows)

    def quarantined(self) -> dict[str, dict[str, Any]]:
        """problem id -> its quarantine row (round, reason, detail); empty for older catalogs."""
        if not self._has_table(S.QUARANTINE.name):
            return {}
        rows = self.con.execute(
            f"SELECT problem_id, round, reason, detail FROM {self.alias}.{S.QUARANTINE.name} ORDER BY problem_id"
        ).fetchall()
        return {pid: {"round": r, "reason": reason, "detail": detail} for pid, r, reason, detail in rows}

    def _add(self, spec: S.TableSpec, rows: Rows) -> int:
        return self._add_batches(f"add {spec.name}", [(spec, rows)])[0]

    def _add_batches(self, message: str, batches: Sequence[tuple[S.TableSpec, Rows]]) -> list[int]:
        """Insert each (table, rows) batch's new rows, all in one transaction (one snapshot)."""
        self._require_writable()
        specs = [spec for spec, _ in batches]
        batches = [
            (spec, rows) for spec, rows in batches
            if (rows.num_rows if isinstance(rows, (pa.Table, pa.RecordBatch)) else len(rows))
        ]
        if not batches:
            return [0] * len(specs)
        t0 = time.perf_counter()
        tables = []
        for spec, rows in batches:
            table = S.conform(spec, rows)
            if spec is S.PROBLEMS:
                _check_seed_parent(table)
            tables.append((spec, _dedupe_batch(spec, table)))

        written: list[Path] = []
        added: dict[str, int] = {}
        self.con.execute("BEGIN TRANSACTION")
        try:
            news = [(spec, self._new_rows(spec, table)) for spec, table in tables]
            if all(new.num_rows == 0 for _, new in news):
                self.con.execute("ROLLBACK")  # nothing to write: no empty snapshot
                for spec, table in tables:
                    log.info("add %s: %d rows, all present already", spec.name, table.num_rows)
                return [0] * len(specs)
            for spec, new in news:
                if new.num_rows == 0:
                    continue
                self._check_not_frozen(spec, new)
                if spec is S.PROBLEMS:
                    self._check_parents_exist(new)
                self._insert(spec, new, written)
                added[spec.name] = new.num_rows
            extra = {"rows": sum(added.values())} if len(batches) == 1 else {"rows": added}
            self.con.execute(
                f"CALL {self.alias}.set_commit_message(?, ?, extra_info => ?)",
                [AUTHOR, message, canonical_json(extra)],
            )
            self.con.execute("COMMIT")
        except BaseException:
            self._rollback()
            for path in written:  # files of a rolled-back bulk insert are referenced by nothing
                path.unlink(missing_ok=True)
            raise
        for (spec, table), (_, new) in zip(tables, news):
            log.info(
                "add %s: %d new of %d in %.2fs%s",
                spec.name,
                new.num_rows,
                table.num_rows,
                time.perf_counter() - t0,
                f" ({len(written)} file(s) via add_data_files)" if written else "",
            )
        return [added.get(spec.name, 0) for spec in specs]

    def _insert(self, spec: S.TableSpec, new: pa.Table, written: list[Path]) -> None:
        """Write `new` into the open transaction: bulk files for large local batches, else INSERT.

        Why two paths: DuckDB's Parquet writer spends about twice pyarrow's CPU on long text
        (measured: 4.6 s vs 2.4 s for 1M samples, single thread), and on a busy 2-core box its
        two threads made it slower still. For large batches we write the Parquet with pyarrow
        (DuckLake's compression and row-group settings) into the table's data folder and register
        it with ducklake_add_data_files, which moves ownership of the file to DuckLake in the same
        transaction. Small batches keep plain INSERT (DuckLake inlines tiny ones in the catalog).
        """
        if self._bulk_dir is None or new.num_rows < self.bulk_rows:
            cols = ", ".join(spec.columns)
            with self._registered("_stillhouse_batch", new):
                self.con.execute(
                    f"INSERT INTO {self.alias}.{spec.name} ({cols}) SELECT {cols} FROM _stillhouse_batch"
                )
            return
        folder = self._bulk_dir / "main" / spec.name
        options = self._parquet_options()
        for start in range(0, new.num_rows, BULK_FILE_ROWS):
            path = folder / f"stillhouse-{uuid.uuid4().hex}.parquet"
            written.append(path)
            write_parquet_atomic(new.slice(start, BULK_FILE_ROWS), path, **options)
            self.con.execute(
                f"CALL ducklake_add_data_files('{self.alias}', '{spec.name}', ?)", [str(path)]
            )

    def _parquet_options(self) -> dict[str, Any]:
        """pyarrow write options equal to this lake's DuckLake Parquet settings (or its defaults)."""
        opts = dict(
            self.con.execute(
                f"SELECT option_name, value FROM {self.alias}.options() WHERE scope = 'GLOBAL'"
            ).fetchall()
        )
        out: dict[str, Any] = {
            "compression": opts.get("parquet_compression", "snappy"),
            "row_group_size": int(opts.get("parquet_row_group_size", 122_880)),
        }
        if "parquet_compression_level" in opts:
            out["compression_level"] = int(opts["parquet_compression_level"])
        # DuckLake/DuckDB codec names -> pyarrow's ("lz4" is LZ4_RAW in pyarrow).
        out["compression"] = {"uncompressed": "none", "lz4_raw": "lz4"}.get(
            out["compression"], out["compression"]
        )
        return out

    def _new_rows(self, spec: S.TableSpec, table: pa.Table) -> pa.Table:
        """The rows of `table` whose key is not in the catalog yet (anti-join on the key only)."""
        if self.con.execute(f"SELECT 1 FROM {self.alias}.{spec.name} LIMIT 1").fetchone() is None:
            return table  # empty table: skip reading anything
        keys = table.select(list(spec.key)).append_column(
            "_row", pa.array(np.arange(table.num_rows, dtype=np.int64))
        )
        match = " AND ".join(f"x.{k} = b.{k}" for k in spec.key)
        with self._registered("_stillhouse_keys", keys):
            idx = self.con.execute(
                f"SELECT b._row FROM _stillhouse_keys b WHERE NOT EXISTS "
                f"(SELECT 1 FROM {self.alias}.{spec.name} x WHERE {match}) ORDER BY b._row"
            ).to_arrow_table()["_row"]
        return table if len(idx) == table.num_rows else table.take(idx)

    def _check_not_frozen(self, spec: S.TableSpec, new: pa.Table) -> None:
        if spec.frozen_round_column is None:
            return
        committed = set(self._committed_rounds())
        hit = sorted(set(pc.unique(new[spec.frozen_round_column]).to_pylist()) & committed)
        if hit:
            raise RoundCommittedError(
                f"{spec.name}: {new.num_rows} new row(s) include round(s) {hit}, already committed; "
                f"a committed round's version is immutable (add them to a later round)"
            )

    def _check_parents_exist(self, new: pa.Table) -> None:
        parents = set(pc.unique(pc.drop_null(new["parent_id"])).to_pylist())
        missing = parents - set(new["problem_id"].to_pylist())
        if not missing:
            return
        wanted = pa.table({"problem_id": pa.array(sorted(missing), type=pa.string())})
        with self._registered("_stillhouse_parents", wanted):
            found = self.con.execute(
                f"SELECT problem_id FROM {self.alias}.problems WHERE problem_id IN "
                f"(SELECT problem_id FROM _stillhouse_parents)"
            ).fetchall()
        missing -= {r[0] for r in found}
        if missing:
            p = sorted(missing)[0]
            child = new.filter(pc.equal(new["parent_id"], p))["problem_id"][0].as_py()
            raise ValueError(
                f"problems.parent_id: {p!r} (parent of {child!r}) is neither in the catalog nor "
                f"in this batch ({len(missing)} unknown parent(s))"
            )

    def commit_round(
        self, round: int, metrics: Mapping[str, Any] | None = None, config_hash: str = ""
    ) -> int:
        """Record round `round` as committed; return the snapshot id that is its version."""
        self._require_writable()
        metrics_json = canonical_json(dict(metrics or {}))
        committed = self._rounds_rows()
        if round in committed:
            row = committed[round]
            if row["config_hash"] != config_hash:
                raise RoundCommittedError(
                    f"round {round} is committed (snapshot {row['snapshot_id']}) with config_hash "
                    f"{row['config_hash']!r}, not {config_hash!r}"
                )
            if row["metrics"] != metrics_json:
                log.info("round %d already committed; keeping its first metrics", round)
            return int(row["snapshot_id"])
        if committed and round <= max(committed):
            raise ValueError(
                f"round {round}: rounds commit in order; last committed is {max(committed)}"
            )
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")

        message = f"round {round}"
        with self._transaction(message, {"round": round, "config_hash": config_hash}):
            predicted = self.current_snapshot() + 1
            row = {
                "round": round,
                "status": "committed",
                "snapshot_id": predicted,
                "committed_at": datetime.now(UTC).replace(tzinfo=None),
                "config_hash": config_hash,
                "metrics": metrics_json,
            }
            cols = ", ".join(S.ROUNDS.columns)
            with self._registered("_stillhouse_round", S.conform(S.ROUNDS, [row])):
                self.con.execute(
                    f"INSERT INTO {self.alias}.rounds ({cols}) SELECT {cols} FROM _stillhouse_round"
                )
        got = self.con.execute(
            f"SELECT author, commit_message FROM {self.alias}.snapshots() WHERE snapshot_id = ?",
            [predicted],
        ).fetchone()
        if got != (AUTHOR, message):
            raise CatalogError(
                f"round {round}: expected its commit to be snapshot {predicted}, found {got}; "
                f"another writer committed concurrently. The rounds row is wrong; fix by hand."
            )
        log.info("committed round %d as snapshot %d", round, predicted)
        return predicted

    # ------------------------------------------------------------------ reads

    def current_snapshot(self) -> int:
        return int(
            self.con.execute(f"SELECT id FROM {self.alias}.current_snapshot()").fetchone()[0]
        )

    def snapshots(self) -> pa.Table:
        """DuckLake's snapshot log (id, time, changes, author, commit message, extra info)."""
        return self.con.execute(
            f"SELECT * FROM {self.alias}.snapshots() ORDER BY snapshot_id"
        ).to_arrow_table()

    def _rounds_rows(self) -> dict[int, dict[str, Any]]:
        rows = self.con.execute(
            f"SELECT * FROM {self.alias}.rounds ORDER BY round"
        ).to_arrow_table()
        return {r["round"]: r for r in rows.to_pylist()}

    def committed_config_hash(self, round: int) -> str | None:
        """The config hash round `round` was committed with (None if it is not committed)."""
        row = self._rounds_rows().get(round)
        return None if row is None else row["config_hash"]

    def round_metrics(self, round: int) -> dict[str, Any] | None:
        """The metrics recorded with round `round`'s commit (None if it is not committed)."""
        row = self._rounds_rows().get(round)
        return None if row is None else json.loads(row["metrics"])

    def _committed_rounds(self) -> dict[int, int]:
        return {r: int(row["snapshot_id"]) for r, row in self._rounds_rows().items()}

    def round_snapshot(self, round: int) -> int:
        """The snapshot id of round `round`'s version; KeyError if it is not committed."""
        rounds = self._committed_rounds()
        if round not in rounds:
            why = "rounds are numbered from 0" if round < 0 else "it has no committed version yet"
            raise RoundNotCommittedError(
                f"round {round} is not committed ({why}; committed: {sorted(rounds) or 'none'})"
            )
        return rounds[round]

    def _source(self, table: str, snapshot: int | None, as_: str = "") -> str:
        """`lake.table [AS x] [AT (VERSION => n)]` (DuckDB wants the alias before AT)."""
        name = f" AS {as_}" if as_ else ""
        at = f" AT (VERSION => {int(snapshot)})" if snapshot is not None else ""
        return f"{self.alias}.{S.spec_for(table).name}{name}{at}"

    def _version(self, round: int | None, snapshot: int | None) -> int | None:
        if round is not None and snapshot is not None:
            raise ValueError("pass round or snapshot, not both")
        return self.round_snapshot(round) if round is not None else snapshot

    def read(
        self, table: str, round: int | None = None, *, snapshot: int | None = None
    ) -> pa.Table:
        """A whole table as of round `round`'s version (or a snapshot id; latest if neither)."""
        spec = S.spec_for(table)
        src = self._source(table, self._version(round, snapshot))
        out = self.con.execute(
            f"SELECT * FROM {src} ORDER BY {', '.join(spec.key)}"
        ).to_arrow_table()
        return out.cast(spec.schema)

    def samples_for_round(self, round: int) -> pa.Table:
        """Round `round`'s samples as of its version."""
        src = self._source("samples", self.round_snapshot(round))
        out = self.con.execute(
            f"SELECT * FROM {src} WHERE round = ? ORDER BY sample_id", [round]
        ).to_arrow_table()
        return out.cast(S.SAMPLES.schema)

    def _training_sql(self, round: int) -> str:
        v = self.round_snapshot(round)
        return (
            f"SELECT s.*, p.question, p.answer FROM {self._source('samples', v, 's')} "
            f"JOIN {self._source('problems', v, 'p')} USING (problem_id) "
            f"WHERE s.round = {int(round)} ORDER BY s.sample_id"
        )

    def training_set(self, round: int) -> pa.Table:
        """Round `round`'s samples with their problem's question and reference answer."""
        return self.con.execute(self._training_sql(round)).to_arrow_table()

    def diff(self, a: int, b: int) -> VersionDiff:
        """Changes from round a's version to round b's, read from DuckLake's change feed.

        The feed (table_changes) reads only the files written between the two snapshots, so the
        cost grows with the change, not with the table. Ids both inserted and deleted in the range
        (an update, or added then removed) cancel out.
        """
        sa, sb = self.round_snapshot(a), self.round_snapshot(b)
        if sa > sb:
            back = self.diff(b, a)
            return VersionDiff(
                a,
                b,
                sa,
                sb,
                problems_added=back.problems_removed,
                problems_removed=back.problems_added,
                added_by_operation={},  # removed problems' operations are in back.added_by_operation
                samples_added_by_round=back.samples_removed_by_round,
                samples_removed_by_round=back.samples_added_by_round,
            )
        if sa == sb:
            return VersionDiff(a, b, sa, sb)
        feed = f"{self.alias}.table_changes('{{t}}', {sa + 1}, {sb})"
        ins = "change_type IN ('insert', 'update_postimage')"
        prob = self.con.execute(
            f"WITH c AS (SELECT problem_id, operation, {ins} AS is_ins FROM {feed.format(t='problems')}), "
            f"i AS (SELECT problem_id, any_value(operation) AS operation FROM c WHERE is_ins GROUP BY ALL), "
            f"d AS (SELECT DISTINCT problem_id FROM c WHERE NOT is_ins) "
            f"SELECT 'add' AS kind, problem_id, operation FROM i ANTI JOIN d USING (problem_id) "
            f"UNION ALL SELECT 'del', problem_id, NULL FROM d ANTI JOIN i USING (problem_id) "
            f"ORDER BY 1, 2"
        ).fetchall()
        added = [p for kind, p, _ in prob if kind == "add"]
        by_op: dict[str, int] = {}
        for kind, _, op in prob:
            if kind == "add":
                by_op[op] = by_op.get(op, 0) + 1
        samp = self.con.execute(
            f"WITH c AS (SELECT sample_id, round, {ins} AS is_ins FROM {feed.format(t='samples')}), "
            f"i AS (SELECT DISTINCT sample_id, round FROM c WHERE is_ins), "
            f"d AS (SELECT DISTINCT sample_id, round FROM c WHERE NOT is_ins) "
            f"SELECT 'add', round, count(*) FROM i ANTI JOIN d USING (sample_id) GROUP BY ALL "
            f"UNION ALL SELECT 'del', round, count(*) FROM d ANTI JOIN i USING (sample_id) GROUP BY ALL "
            f"ORDER BY 1, 2"
        ).fetchall()
        dropped = self._dropped(a, b, sb)
        by_reason: dict[str, int] = {}
        for d in dropped:
            by_reason[d["reason"]] = by_reason.get(d["reason"], 0) + 1
        return VersionDiff(
            a,
            b,
            sa,
            sb,
            dropped_by_reason=dict(sorted(by_reason.items())),
            dropped=dropped,
            problems_added=added,
            problems_removed=[p for kind, p, _ in prob if kind == "del"],
            added_by_operation=dict(sorted(by_op.items())),
            samples_added_by_round={int(r): int(n) for k, r, n in samp if k == "add"},
            samples_removed_by_round={int(r): int(n) for k, r, n in samp if k == "del"},
        )

    def _dropped(self, a: int, b: int, snapshot: int) -> list[dict[str, Any]]:
        """The dropped generations of the synthesis steps of rounds a .. b-1, as of `snapshot`."""
        if not self._has_table("synthesis_records"):
            return []
        try:
            src = self._source("synthesis_records", snapshot)
            rows = self.con.execute(
                f"SELECT round, generation_key, parent_id, operation, reason, detail FROM {src} "
                f"WHERE status = 'dropped' AND round >= ? AND round < ? ORDER BY round, generation_key",
                [a, b],
            ).fetchall()
        except duckdb.Error:  # the table was created after that snapshot (an older catalog)
            return []
        cols = ("round", "generation_key", "parent_id", "operation", "reason", "detail")
        return [dict(zip(cols, r)) for r in rows]

    def _has_table(self, name: str) -> bool:
        return name in self._existing_tables()

    def split_labels(self, round: int, student_key: str) -> dict[str, str]:
        """problem id -> easy/mid/hard, as the split step of `round` labelled them for that student."""
        rows = self.con.execute(
            f"SELECT problem_id, label FROM {self.alias}.split_labels "
            f"WHERE round = ? AND student_key = ? ORDER BY problem_id",
            [round, student_key],
        ).fetchall()
        return dict(rows)

    def synthesis_records(self, round: int | None = None) -> pa.Table:
        """Every generation of the synthesis steps (of one round), kept or dropped and why."""
        spec = S.SYNTHESIS_RECORDS
        if not self._has_table(spec.name):
            return spec.schema.empty_table()
        where = "" if round is None else f"WHERE round = {int(round)}"
        out = self.con.execute(
            f"SELECT * FROM {self.alias}.{spec.name} {where} ORDER BY {', '.join(spec.key)}"
        ).to_arrow_table()
        return out.cast(spec.schema)

    def lineage(self, problem_id: str, round: int | None = None) -> list[dict[str, Any]]:
        """The problem, then its parent, ... up to its seed (as of a round's version, or latest)."""
        src = self._source("problems", self._version(round, None))
        # Content-hash ids cannot form a cycle, but a depth cap keeps a corrupted catalog finite.
        rows = self.con.execute(
            f"WITH RECURSIVE p AS (SELECT * FROM {src}), "
            f"chain(problem_id, depth) AS ("
            f"  SELECT problem_id, 0 FROM p WHERE problem_id = ? "
            f"  UNION ALL SELECT p.parent_id, c.depth + 1 FROM chain c JOIN p USING (problem_id) "
            f"  WHERE p.parent_id IS NOT NULL AND c.depth < 10000) "
            f"SELECT p.* FROM chain c JOIN p USING (problem_id) ORDER BY c.depth",
            [problem_id],
        ).to_arrow_table()
        if rows.num_rows == 0:
            raise KeyError(f"problem {problem_id!r} is not in the catalog")
        return rows.to_pylist()

    def export(self, round: int, out_path: str | os.PathLike[str]) -> int:
        """Write round `round`'s training set to .parquet or .jsonl, atomically. Returns row count.

        DuckDB writes straight from the catalog to a temp file next to the target (no Python
        copy of a million rows), which is fsynced and renamed into place.
        """
        out = Path(out_path)
        fmt = {".parquet": "PARQUET", ".jsonl": "JSON"}.get(out.suffix.lower())
        if fmt is None:
            raise ValueError(
                f"export: unsupported suffix {out.suffix!r} of {out}; use .parquet or .jsonl"
            )
        sql = self._training_sql(round)  # raises KeyError for an uncommitted round before any file
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            n = self.con.execute(
                f"COPY ({sql}) TO '{sql_str(str(tmp))}' (FORMAT {fmt})"
            ).fetchone()[0]
            fsync_file(tmp)
            os.replace(tmp, out)
            fsync_dir(out.parent)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("exported round %d: %d rows -> %s", round, n, out)
        return int(n)

    def status(self) -> CatalogStatus:
        """Committed rounds with their snapshot and row counts, plus an 'open' round with data."""
        out: list[RoundStatus] = []
        for r, row in self._rounds_rows().items():
            v = int(row["snapshot_id"])
            out.append(
                RoundStatus(
                    round=r,
                    status=row["status"],
                    snapshot_id=v,
                    committed_at=row["committed_at"],
                    config_hash=row["config_hash"],
                    problems=self._count("problems", v),
                    samples=self._count("samples", v, f"round = {int(r)}"),
                )
            )
        last = max((s.round for s in out), default=-1)
        open_rounds = self.con.execute(
            f"SELECT round, count(*) FROM {self.alias}.samples WHERE round > ? GROUP BY 1 ORDER BY 1",
            [last],
        ).fetchall()
        problems_now = self._count("problems", None)
        for r, n in open_rounds:
            out.append(RoundStatus(int(r), "open", None, None, None, problems_now, int(n)))
        return CatalogStatus(str(self.workdir), self.current_snapshot(), out)

    def _count(self, table: str, snapshot: int | None, where: str = "TRUE") -> int:
        src = self._source(table, snapshot)
        return int(self.con.execute(f"SELECT count(*) FROM {src} WHERE {where}").fetchone()[0])

    def set_option(self, name: str, value: Any) -> None:
        """A persistent DuckLake option (e.g. parquet_compression, parquet_row_group_size)."""
        self._require_writable()
        self.con.execute(f"CALL {self.alias}.set_option(?, ?)", [name, value])


# ---------------------------------------------------------------------- helpers (pure)


def _dedupe_batch(spec: S.TableSpec, table: pa.Table) -> pa.Table:
    """Keep the first row of each key within one batch."""
    n = table.num_rows
    # The common case (no repeats) costs one hash pass over the key column; pc.unique measured 3x
    # faster than pc.count_distinct on 1M string ids.
    if len(spec.key) == 1 and len(pc.unique(table[spec.key[0]])) == n:
        return table
    firsts = (
        table.select(list(spec.key))
        .append_column("_row", pa.array(np.arange(n, dtype=np.int64)))
        .group_by(list(spec.key), use_threads=False)
        .aggregate([("_row", "min")])
    )["_row_min"]
    if len(firsts) == n:
        return table
    log.warning("%s: dropped %d in-batch duplicate key(s), kept first", spec.name, n - len(firsts))
    return table.take(np.sort(firsts.to_numpy()))


def _check_seed_parent(table: pa.Table) -> None:
    """A seed has no parent; a synthesized problem ('harder'/'similar') has one."""
    is_seed = pc.equal(table["operation"], "seed")
    has_parent = pc.is_valid(table["parent_id"])
    bad = pc.equal(is_seed, has_parent)  # seed with parent, or non-seed without
    if pc.any(bad).as_py():
        row = pc.index(bad, True).as_py()
        op = table["operation"][row].as_py()
        need = "no parent_id" if op == "seed" else "a parent_id"
        raise ValueError(f"problems.parent_id: row {row} has operation {op!r}, which needs {need}")
