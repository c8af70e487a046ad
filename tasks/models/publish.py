"""Prepared model folders are published atomically: built in a temp sibling, manifest last, then
moved into place (storage.parquet_io.publish_dir). A folder whose manifest matches is reused."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from stillhouse.storage.parquet_io import publish_dir

MANIFEST = "stillhouse_model.json"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def publish(tmp: Path, out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest last, then move the finished folder into place (atomic on one filesystem)."""
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return publish_dir(tmp, out_dir)


def tmp_sibling(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
