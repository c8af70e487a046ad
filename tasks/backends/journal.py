"""The openai backend's journal: every completion appended to a JSONL file as soon as it arrives
(flushed and fsync'ed), one file per backend instance under `<journal_dir>/<scope>/`, so a killed run
never pays twice for a response it received (see backends/openai.py, "Persistence").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from stillhouse.storage.parquet_io import fsync_dir, write_json_atomic
from stillhouse.tasks.backends.base import Completion, SampleRequest

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def record_id(r: SampleRequest) -> str:
    return _hash([r.key, r.sample_index, r.seed, list(r.messages)])[:32]


def scope_id(scope: dict) -> str:
    """The folder name of a journal scope (base_url, model, sampling params, seed mode)."""
    return _hash(scope)[:24]


class Journal:
    """Append-only JSONL records of completed responses for one scope (a folder of files)."""

    def __init__(self, folder: Path, scope: dict):
        self.folder = folder
        self.scope = scope
        self.records: dict[str, dict] = {}
        self._fd: int | None = None
        self.path: Path | None = None  # this instance's file, created on the first append
        self._load()

    def _load(self) -> None:
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("*.jsonl")):
            lines = path.read_bytes().split(b"\n")
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    rid = rec["id"]
                    # Fields a Completion needs; a record without them is not usable.
                    rec["key"], rec["sample_index"], rec["text"], rec["finish_reason"]  # noqa: B018
                except (ValueError, KeyError, TypeError):
                    # A kill mid-write leaves a torn last line: expected, and the response is simply
                    # requested again. Damage anywhere else is worth a warning.
                    if i == len(lines) - 1:
                        log.info("journal %s: skipping torn last line", path)
                    else:
                        log.warning("journal %s line %d: unreadable record skipped", path, i + 1)
                    continue
                self.records[rid] = rec

    def _open(self) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        scope_file = self.folder / "scope.json"
        if not scope_file.exists():  # for humans: what this folder's records were sampled with
            write_json_atomic(self.scope, scope_file)
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        self.path = self.folder / name
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        # Make the new file's directory entry durable too, or a crash could lose the whole file.
        fsync_dir(self.folder)
        return fd

    def append(self, rec: dict) -> None:
        if self._fd is None:
            self._fd = self._open()
        data = (json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)
        self.records[rec["id"]] = rec

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def record_of(rid: str, req: SampleRequest, c: Completion) -> dict:
    # No headers, no key, no URL credentials: only what the completion is and which request it answers.
    return {
        "id": rid,
        "key": req.key,
        "sample_index": req.sample_index,
        "seed": req.seed,
        "text": c.text,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "finish_reason": c.finish_reason,
        "extra": c.extra,
        "t": time.time(),
    }


def completion_of(rec: dict) -> Completion:
    return Completion(
        key=rec["key"],
        sample_index=int(rec["sample_index"]),
        text=rec["text"],
        prompt_tokens=int(rec.get("prompt_tokens") or 0),
        completion_tokens=int(rec.get("completion_tokens") or 0),
        finish_reason=rec["finish_reason"],
        extra={**(rec.get("extra") or {}), "from_journal": True},
    )
