"""Finding and loading DuckDB's extensions: ducklake always, httpfs for an object-store data path.

Offline machines get an extension from its pip package `duckdb-extension-<name>`, which ships the
binary as package data at `duckdb_extension_<name>/extensions/v<duckdb version>/<name>.duckdb_extension`
(the packages have no Python API for the path). Elsewhere `INSTALL <name>` downloads it as usual.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import duckdb

log = logging.getLogger(__name__)


def find_extension_file(name: str = "ducklake") -> Path | None:
    """The packaged extension `name` built for the running duckdb, or None if its package is absent."""
    try:
        pkg = importlib.import_module(f"duckdb_extension_{name}")
    except ImportError:
        return None
    root = Path(pkg.__file__).parent / "extensions"
    file = f"{name}.duckdb_extension"
    exact = root / f"v{duckdb.__version__}" / file
    if exact.is_file():
        return exact
    # A build for another duckdb version would fail to LOAD with a version error; return it anyway
    # so the caller's message says which file was tried.
    found = sorted(root.glob(f"*/{file}"))
    return found[-1] if found else None


def load_extension(con: duckdb.DuckDBPyConnection, name: str) -> str:
    """LOAD extension `name` into `con`: the packaged file first, then INSTALL/LOAD. Returns what
    worked."""
    if not name.isidentifier():
        raise ValueError(f"extension name {name!r} must be a plain identifier (it is spliced into SQL)")
    errors: list[str] = []
    path = find_extension_file(name)
    if path is not None:
        try:
            con.execute(f"LOAD '{sql_str(str(path))}'")
            return str(path)
        except duckdb.Error as e:
            errors.append(f"LOAD {path}: {e}")
            log.warning("packaged %s extension did not load, trying INSTALL: %s", name, e)
    try:
        con.execute(f"INSTALL {name}")
        con.execute(f"LOAD {name}")
        return f"INSTALL {name}"
    except duckdb.Error as e:
        errors.append(f"INSTALL/LOAD {name}: {e}")
    raise RuntimeError(
        f"cannot load the {name} extension into duckdb {duckdb.__version__}: "
        + " | ".join(errors)
        + f" (offline: pip install duckdb-extension-{name}==<your duckdb version>)"
    )


def load_ducklake(con: duckdb.DuckDBPyConnection) -> str:
    """LOAD ducklake into `con` (see load_extension)."""
    return load_extension(con, "ducklake")


def sql_str(s: str) -> str:
    """A value for a single-quoted SQL literal."""
    return s.replace("'", "''")
