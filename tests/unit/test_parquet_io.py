"""Atomic Parquet writes, content hashes, the manifest-last cache and resumable shards."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import stillhouse.storage.parquet_io as pio

pytestmark = pytest.mark.unit


def table(n: int = 5, start: int = 0) -> pa.Table:
    return pa.table(
        {"i": list(range(start, start + n)), "s": [f"row {i}" for i in range(start, start + n)]}
    )


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_round_trips(tmp_path):
    path = pio.write_parquet_atomic(table(), tmp_path / "sub" / "t.parquet")
    assert pq.read_table(path).equals(table())
    pio.write_parquet_atomic(table(3, 10), path)  # replacing is atomic too
    assert pq.read_table(path).equals(table(3, 10))
    assert listing(path.parent) == ["t.parquet"]


def test_crash_mid_write_leaves_no_final_file_and_no_manifest(tmp_path, monkeypatch):
    out = tmp_path / "step"
    real_write = pq.write_table

    def crash_midway(tbl, where, **kw):
        real_write(tbl.slice(0, 2), where, **kw)  # some bytes reach the temp file...
        raise KeyboardInterrupt  # ...then the process is interrupted

    monkeypatch.setattr(pq, "write_table", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        pio.write_parquet_atomic(table(), out / "part-00000.parquet")
    assert listing(out) == []  # no final file, no temp file, no manifest
    assert not pio.is_complete(out)
    assert pio.completed_shards(out) == []


def test_an_existing_file_survives_a_failed_rewrite(tmp_path, monkeypatch):
    path = pio.write_parquet_atomic(table(), tmp_path / "t.parquet")

    def fail(*a, **kw):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pq, "write_table", fail)
    with pytest.raises(OSError):
        pio.write_parquet_atomic(table(9, 100), path)
    assert pq.read_table(path).equals(table())


def test_content_hash_is_canonical_and_stable():
    @dataclass
    class Section:
        temperature: float
        n: int

    a = {"sampling": {"temperature": 0.7, "n": 8}, "model": "m", "files": {Path("x/y")}}
    b = {"model": "m", "files": {Path("x/y")}, "sampling": {"n": 8, "temperature": 0.7}}
    assert pio.content_hash(a) == pio.content_hash(b)
    assert pio.content_hash(a) != pio.content_hash({**a, "model": "m2"})
    assert pio.content_hash(Section(0.7, 8)) == pio.content_hash({"n": 8, "temperature": 0.7})
    # Pinned value: changing the canonical form would silently invalidate every cache.
    assert pio.content_hash({"b": [1, 2.5, None], "a": "é"}) == (
        "d764fee2563da33e3d57334755404e635da33c995824b0adfabc4b6e1af4f608"
    )
    assert pio.canonical_json({"b": [1, 2.5, None], "a": "é"}) == '{"a":"é","b":[1,2.5,null]}'
    with pytest.raises(TypeError):
        pio.content_hash({"f": object()})


def test_content_hash_of_pydantic_models():
    pydantic = pytest.importorskip("pydantic")

    class Cfg(pydantic.BaseModel):
        temperature: float = 0.7
        n: int = 8

    assert pio.content_hash(Cfg()) == pio.content_hash({"temperature": 0.7, "n": 8})


def test_cached_path_layout_and_validation(tmp_path):
    key = pio.content_hash({"x": 1})
    assert pio.cached_path(tmp_path, "sample", key) == tmp_path / "sample" / key
    with pytest.raises(ValueError):
        pio.cached_path(tmp_path, "../escape", key)
    with pytest.raises(ValueError):
        pio.cached_path(tmp_path, "sample", "not-a-hash")


def test_manifest_is_written_last_and_checked(tmp_path):
    out = pio.cached_path(tmp_path, "verify", pio.content_hash({"step": "verify"}))
    pio.write_parquet_atomic(table(), out / "scores.parquet")
    assert not pio.is_complete(out)  # outputs without a manifest are never trusted
    pio.write_manifest(out, meta={"rows": 5})
    assert pio.is_complete(out)
    manifest = pio.read_manifest(out)
    assert manifest["files"]["scores.parquet"]["rows"] == 5 and manifest["meta"] == {"rows": 5}
    assert pio.read_output(out).equals(table())
    # A listed file replaced by something else is caught.
    (out / "scores.parquet").write_bytes(b"truncated")
    assert not pio.is_complete(out)
    with pytest.raises(FileNotFoundError):
        pio.read_output(out)


def test_manifest_refuses_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        pio.write_manifest(tmp_path, ["absent.parquet"])
    assert pio.read_manifest(tmp_path) is None


def test_shards_resume_only_what_is_missing(tmp_path):
    out = tmp_path / "sample-step"
    pio.write_shard(table(2, 0), out, 0)
    pio.write_shard(table(2, 4), out, 2)
    (out / ".part-00001.parquet.tmp-1-abc").write_bytes(b"half")  # a crashed writer's leftover
    assert pio.completed_shards(out) == [0, 2]
    assert pio.missing_shards(out, 4) == [1, 3]
    with pytest.raises(FileNotFoundError, match="missing"):
        pio.finalize_shards(out, 4)
    assert not pio.is_complete(out)

    for i in pio.missing_shards(out, 4):  # the resumed step
        pio.write_shard(table(2, 2 * i), out, i)
    assert pio.clean_tmp(out) == 1
    pio.finalize_shards(out, 4, meta={"step": "sample"})
    assert pio.is_complete(out)
    assert pio.read_output(out)["i"].to_pylist() == list(range(8))
    assert pio.read_manifest(out)["meta"] == {"step": "sample", "n_shards": 4}
    assert pio.shard_path(out, 7).name == "part-00007.parquet"


def test_cached_output_computes_once_and_redoes_an_incomplete_folder(tmp_path):
    calls = []

    def compute(out: Path) -> dict:
        calls.append(out)
        pio.write_parquet_atomic(table(3), out / "part.parquet")
        return {"n": 3}

    key = pio.content_hash({"inputs": 1})
    out, computed = pio.cached_output(tmp_path, "step", key, compute)
    assert computed and out == pio.cached_path(tmp_path, "step", key[:32])
    assert pio.read_output(out).num_rows == 3 and pio.read_manifest(out)["meta"] == {"n": 3}
    assert pio.cached_output(tmp_path, "step", key, compute) == (out, False) and len(calls) == 1
    (out / pio.MANIFEST).unlink()  # a crash before the manifest: the folder is redone
    assert pio.cached_output(tmp_path, "step", key, compute) == (out, True) and len(calls) == 2


def test_publish_dir_replaces_a_folder_whole(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = tmp_path / ".model.tmp"
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    assert pio.publish_dir(tmp, final) == final
    assert listing(final) == ["new.txt"] and not tmp.exists()
