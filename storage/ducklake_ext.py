"""Finding and loading DuckDB's ducklake extension.

Offline machines get the extension from the pip package `duckdb-extension-ducklake`, which ships the
binary as package data at `duckdb_extension_ducklake/extensions/v<duckdb version>/ducklake.duckdb_extension`
(the package has no Python API for the path). Elsewhere `INSTALL ducklake` downloads it as usual.
"""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb

log = logging.getLogger(__name__)

_EXT_FILE = "ducklake.duckdb_extension"


def find_extension_file() -> Path | None:
    """The packaged extension built for the running duckdb, or None if the package is absent."""
    try:
        import duckdb_extension_ducklake as pkg
    except ImportError:
        return None
    root = Path(pkg.__file__).parent / "extensions"
    exact = root / f"v{duckdb.__version__}" / _EXT_FILE
    if exact.is_file():
        return exact
    # A build for another duckdb version would fail to LOAD with a version error; return it anyway
    # so the caller's message says which file was tried.
    found = sorted(root.glob(f"*/{_EXT_FILE}"))
    return found[-1] if found else None


def load_ducklake(con: duckdb.DuckDBPyConnection) -> str:
    """LOAD ducklake into `con`: the packaged file first, then INSTALL/LOAD. Returns what worked."""
    errors: list[str] = []
    path = find_extension_file()
    if path is not None:
        try:
            con.execute(f"LOAD '{sql_str(str(path))}'")
            return str(path)
        except duckdb.Error as e:
            errors.append(f"LOAD {path}: {e}")
            log.warning("packaged ducklake extension did not load, trying INSTALL: %s", e)
    try:
        con.execute("INSTALL ducklake")
        con.execute("LOAD ducklake")
        return "INSTALL ducklake"
    except duckdb.Error as e:
        errors.append(f"INSTALL/LOAD ducklake: {e}")
    raise RuntimeError(
        f"cannot load the DuckLake extension into duckdb {duckdb.__version__}: "
        + " | ".join(errors)
        + " (offline: pip install duckdb-extension-ducklake==<your duckdb version>)"
    )


def sql_str(s: str) -> str:
    """A value for a single-quoted SQL literal."""
    return s.replace("'", "''")
