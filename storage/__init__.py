"""Storage: the run's DuckLake catalog (versioned tables) and Parquet intermediates (atomic, cached)."""

from stillhouse.storage.catalog import (
    Catalog,
    CatalogError,
    CatalogLockedError,
    CatalogStatus,
    RoundCommittedError,
    RoundStatus,
    VersionDiff,
)
from stillhouse.storage.parquet_io import (
    cached_output,
    cached_path,
    completed_shards,
    content_hash,
    finalize_shards,
    is_complete,
    missing_shards,
    publish_dir,
    read_output,
    shard_path,
    write_manifest,
    write_parquet_atomic,
    write_shard,
)
from stillhouse.storage.schema import TABLES, TableSpec

__all__ = [
    "TABLES",
    "Catalog",
    "CatalogError",
    "CatalogLockedError",
    "CatalogStatus",
    "RoundCommittedError",
    "RoundStatus",
    "TableSpec",
    "VersionDiff",
    "cached_output",
    "cached_path",
    "completed_shards",
    "content_hash",
    "finalize_shards",
    "is_complete",
    "missing_shards",
    "publish_dir",
    "read_output",
    "shard_path",
    "write_manifest",
    "write_parquet_atomic",
    "write_shard",
]
