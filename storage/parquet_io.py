"""Parquet intermediates: atomic writes and a content-addressed cache of step outputs.

Rules that make a crashed or resumed run safe:
- A final file name only ever points at a complete file: write a hidden temp file in the same
  folder, fsync it, os.replace it into place, fsync the folder.
- A step's output folder counts as complete only when its manifest exists. The manifest is written
  last (atomically) and lists every file with its size, so a half-written output is never used.
- Large steps write part files (`part-00000.parquet`, each atomic); a resumed step lists the parts
  already there and redoes only the missing ones, then writes the manifest.

Layout of the cache: `<cache_dir>/<step>/<key_hash>/{part-*.parquet | *.parquet, _manifest.json}`
where key_hash = content_hash(the config sections and inputs the step depends on).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime
from pathlib import Path, PurePath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
_PART = re.compile(r"^part-(\d{5})\.parquet$")
_STEP = re.compile(r"^[A-Za-z0-9_.-]+$")


# --------------------------------------------------------------------------- atomic files


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename durable (the directory entry itself). A no-op where directories can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    # Hidden and unique: never mistaken for a part file, never clobbered by a parallel writer.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _commit_tmp(tmp: Path, path: Path) -> None:
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_parquet_atomic(
    table: pa.Table, path: str | os.PathLike[str], **write_options: Any
) -> Path:
    """Write `table` to `path` so that `path` is either absent/old or the complete new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        pq.write_table(table, tmp, **write_options)
        _commit_tmp(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(data: bytes, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        _commit_tmp(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def publish_dir(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Move a finished temp folder (a sibling of `path`) into place: a folder is either absent,
    the old one or the new one, never half written (os.replace is atomic on one filesystem)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def write_json_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    return write_bytes_atomic(
        (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n").encode(), path
    )


# --------------------------------------------------------------------------- content hashing


def _jsonable(obj: Any) -> Any:
    """The canonical JSON form of the values configs and step inputs are made of."""
    if hasattr(obj, "model_dump"):  # pydantic models (the run config)
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=lambda v: json.dumps(v, sort_keys=True, default=_jsonable))
    if isinstance(obj, PurePath):
        return obj.as_posix()
    if isinstance(obj, (datetime, date)):
        return obj.isoformat()
    if isinstance(obj, bytes):
        return {"__bytes__": hashlib.sha256(obj).hexdigest()}
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    raise TypeError(f"content_hash: cannot hash a {type(obj).__name__}")


def canonical_json(obj: Any) -> str:
    """Key-sorted, whitespace-free JSON: equal inputs give equal text across runs and machines."""
    return json.dumps(
        obj,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=True,
        default=_jsonable,
    )


def content_hash(obj: Any) -> str:
    """sha256 hex of the canonical JSON of `obj` (dicts, lists, scalars, pydantic, dataclasses)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


# --------------------------------------------------------------------------- cache folders


def cached_path(cache_dir: str | os.PathLike[str], step: str, key_hash: str) -> Path:
    """The output folder of `step` for inputs hashing to `key_hash` (not created)."""
    if not _STEP.match(step):
        raise ValueError(f"step name {step!r}: use letters, digits, '_', '-', '.'")
    if not re.fullmatch(r"[0-9a-f]{8,64}", key_hash):
        raise ValueError(f"key_hash {key_hash!r}: expected a hex digest (content_hash)")
    return Path(cache_dir) / step / key_hash


def cached_output(
    cache_dir: str | os.PathLike[str],
    step: str,
    key: str,
    compute: Callable[[Path], Mapping[str, Any] | None],
) -> tuple[Path, bool]:
    """A step's content-addressed output folder, complete: found on disk, or made now.

    key -> cached folder -> `compute(folder)` writes the files and returns the manifest's meta only
    if the folder is incomplete -> manifest written last. Returns (folder, computed); read it back
    with `read_output` / `read_manifest`.
    """
    out = cached_path(cache_dir, step, key[:32])
    if is_complete(out):
        return out, False
    out.mkdir(parents=True, exist_ok=True)
    meta = compute(out)
    write_manifest(out, meta=meta)
    return out, True


def write_manifest(
    out_dir: str | os.PathLike[str],
    files: Iterable[str] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Mark `out_dir` complete. Call LAST, after every listed file is in place.

    `files` are names inside out_dir (default: every non-hidden file but the manifest). Sizes and
    Parquet row counts are recorded so `is_complete` can catch a file replaced or truncated later.
    """
    out_dir = Path(out_dir)
    names = (
        sorted(files)
        if files is not None
        else sorted(
            p.name
            for p in out_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST
        )
    )
    entries = {}
    for name in names:
        p = out_dir / name
        if not p.is_file():
            raise FileNotFoundError(f"manifest of {out_dir}: listed file {name} does not exist")
        entry: dict[str, Any] = {"bytes": p.stat().st_size}
        if p.suffix == ".parquet":
            entry["rows"] = pq.ParquetFile(p).metadata.num_rows
        entries[name] = entry
    manifest = {
        "files": entries,
        "meta": dict(meta or {}),
        "created_at": datetime.now().isoformat(),
    }
    return write_json_atomic(manifest, out_dir / MANIFEST)


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    p = Path(out_dir) / MANIFEST
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_complete(out_dir: str | os.PathLike[str]) -> bool:
    """True when the manifest exists and every file it lists is present with its recorded size."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        return False
    for name, entry in manifest.get("files", {}).items():
        p = out_dir / name
        if not p.is_file() or p.stat().st_size != entry.get("bytes"):
            log.warning("%s: manifest lists %s but the file is missing or changed", out_dir, name)
            return False
    return True


def read_output(out_dir: str | os.PathLike[str]) -> pa.Table:
    """All Parquet files of a complete output folder, in manifest order, as one table."""
    out_dir = Path(out_dir)
    if not is_complete(out_dir):
        raise FileNotFoundError(f"{out_dir} is not a complete output (no valid manifest)")
    names = [n for n in read_manifest(out_dir)["files"] if n.endswith(".parquet")]  # type: ignore[index]
    if not names:
        raise FileNotFoundError(f"{out_dir}: manifest lists no Parquet files")
    return pa.concat_tables([pq.read_table(out_dir / n) for n in names])


def read_parquet(path: str | os.PathLike[str]) -> pa.Table:
    """One Parquet file of an output folder (when a folder holds more than one kind of table)."""
    return pq.read_table(path)


# --------------------------------------------------------------------------- shards


def shard_path(out_dir: str | os.PathLike[str], index: int) -> Path:
    if not 0 <= index <= 99_999:
        raise ValueError(f"shard index {index} out of range 0..99999")
    return Path(out_dir) / f"part-{index:05d}.parquet"


def write_shard(
    table: pa.Table, out_dir: str | os.PathLike[str], index: int, **write_options: Any
) -> Path:
    """Write part `index` atomically: it either exists complete or not at all."""
    return write_parquet_atomic(table, shard_path(out_dir, index), **write_options)


def completed_shards(out_dir: str | os.PathLike[str]) -> list[int]:
    """Indices of the part files present (each was renamed into place only when complete)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in out_dir.iterdir() if (m := _PART.match(p.name)))


def missing_shards(out_dir: str | os.PathLike[str], n_shards: int) -> list[int]:
    """The part indices 0..n_shards-1 a resumed step still has to write."""
    done = set(completed_shards(out_dir))
    return [i for i in range(n_shards) if i not in done]


def finalize_shards(
    out_dir: str | os.PathLike[str], n_shards: int, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write the manifest over parts 0..n_shards-1 once all exist; refuses if any is missing."""
    missing = missing_shards(out_dir, n_shards)
    if missing:
        raise FileNotFoundError(f"{out_dir}: shards {missing[:10]} missing, not finalizing")
    names = [shard_path(out_dir, i).name for i in range(n_shards)]
    return write_manifest(out_dir, names, {**dict(meta or {}), "n_shards": n_shards})


def clean_tmp(out_dir: str | os.PathLike[str]) -> int:
    """Remove temp files a crashed writer left behind; returns how many."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return 0
    n = 0
    for p in out_dir.iterdir():
        if p.name.startswith(".") and ".tmp-" in p.name:
            p.unlink(missing_ok=True)
            n += 1
    return n
