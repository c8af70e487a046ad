"""A shard of a generation call, run on a worker: the plain half of the scale-out (no Prefect).

A generation call (`ResumableBackend.sample`) is cut into fixed shards, each cached as an atomic
Parquet part of the call's content-addressed folder `<cache>/<step>/<call key>/`. Moved to another
machine, a shard needs nothing but that folder (its `dispatch/` files, see
stillhouse.tasks.backends.dispatch): `run_shard(call_dir, index)` reopens the backend from the spec,
generates exactly the shard's requests (the same slice, the same batches, the same per-request
seeds as in process) and writes the part. Finished parts are never redone, so a rerun submits only
the missing shards. The flows (stillhouse.flows.shards) run it as a flow run on a work pool.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from stillhouse.storage import parquet_io
from stillhouse.tasks.backends.dispatch import Heartbeat, read_dispatch, read_worker, shard_slice, worker_path
from stillhouse.tasks.backends.open import reopen_backend


# --------------------------------------------------------------------------- a shard, on the worker


def run_shard(call_dir: str | os.PathLike[str], index: int, heartbeat_s: float = 5.0,
              attempt: str = "") -> dict[str, Any]:
    """Generate shard `index` of the call in `call_dir` here and write its part; returns who ran it.
    A part already there (a finished shard, or a duplicate of a resubmitted one) is not redone."""
    call_dir = Path(call_dir)
    t0 = time.perf_counter()
    if parquet_io.shard_path(call_dir, index).is_file():
        info = read_worker(call_dir, index) or {}
        return {**info, "index": index, "reused": True}
    spec, requests, params, shard_size = read_dispatch(call_dir)
    part = shard_slice(requests, shard_size, index)
    with Heartbeat(call_dir, index, heartbeat_s, attempt) as beat:
        with reopen_backend(spec["backend"]) as backend:
            if backend.call_dir(requests, params).resolve() != call_dir.resolve():
                raise RuntimeError(f"{call_dir}: the reopened backend keys this call as "
                                   f"{backend.call_dir(requests, params)}; the dispatch spec does not match it")
            completions = backend.generate_shard(part, params)
            model_seconds = backend.model_seconds
        info = {**beat.info, "index": index, "requests": len(part), "seconds": time.perf_counter() - t0,
                "model_seconds": model_seconds, "attempt": attempt}
        # The worker record first, then the part: a part on disk always has its record.
        parquet_io.write_json_atomic(info, worker_path(call_dir, index))
        backend.write_part(completions, call_dir, index)
    return {**info, "reused": False}
