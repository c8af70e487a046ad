"""A disk-backed wrapper that makes any sampling backend resumable and free on rerun.

Every `sample()` call is split into fixed shards of requests (fixed by the call's content, not by
what happens to be missing), each shard's completions are written as an atomic Parquet part file,
and the folder is marked complete by a manifest written last. A rerun of the same call reads the
parts back and never builds the model; a run killed mid-call regenerates only the missing shards,
and because every request carries its own seed the regenerated text equals what the uninterrupted
run would have produced.

The model is built lazily by `factory()` on the first missing shard, so a finished step costs no
model load.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from stillhouse.storage import parquet_io
from stillhouse.tasks.backends.base import (
    Backend,
    Completion,
    Progress,
    SampleRequest,
    SamplingParams,
    accepting_info,
)

log = logging.getLogger(__name__)

_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("sample_index", pa.int32()),
        ("text", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),
    ]
)


def _to_table(completions: list[Completion]) -> pa.Table:
    cols = {name: [getattr(c, name) for c in completions] for name in _SCHEMA.names}
    return pa.table(cols, schema=_SCHEMA)


def _from_table(table: pa.Table) -> list[Completion]:
    return [Completion(**row) for row in table.to_pylist()]


class ResumableBackend:
    """Backend interface; results cached under `cache_dir/<step>/<hash of requests, params, model>`."""

    def __init__(
        self,
        factory: Callable[[], Backend],
        cache_dir: str | Path,
        *,
        step: str,
        model_key: object,
        shard_size: int = 64,
        spec: dict | None = None,
    ):
        self._factory = factory
        self._backend: Backend | None = None
        self.cache_dir = Path(cache_dir)
        self.step = step
        self.model_key = model_key
        self.shard_size = shard_size
        # How another process opens this same backend (tasks/shards.py runs a shard with it): JSON, absolute paths.
        self.spec = spec
        self.name = f"resumable[{step}]"
        # Counters the flows report (and tests read): how much model work really happened.
        self.generated = 0
        self.reused = 0
        self.model_seconds = 0.0  # building the model and generating: the "model work" of a step
        # Tokens of every completion returned (generated now or found cached): what the step's
        # output cost when it was made, for the run's cost ledger.
        self.prompt_tokens = 0
        self.completion_tokens = 0

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            log.info("%s: loading model for missing shards", self.step)
            t0 = time.perf_counter()
            self._backend = self._factory()
            self.model_seconds += time.perf_counter() - t0
        return self._backend

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    def call_dir(self, requests: list[SampleRequest], params: SamplingParams) -> Path:
        key = parquet_io.content_hash(
            {
                "model": self.model_key,
                "params": asdict(params),
                "shard_size": self.shard_size,
                "requests": [(r.key, r.sample_index, r.seed, r.messages) for r in requests],
            }
        )
        return parquet_io.cached_path(self.cache_dir, self.step, key[:32])

    def pending(self, requests: list[SampleRequest], params: SamplingParams) -> int:
        """How many of `requests` a `sample` call would generate (those in missing shards)."""
        if not requests:
            return 0
        out = self.call_dir(requests, params)
        if parquet_io.is_complete(out):
            return 0
        n_shards = -(-len(requests) // self.shard_size)
        missing = parquet_io.missing_shards(out, n_shards)
        return sum(len(requests[i * self.shard_size:(i + 1) * self.shard_size]) for i in missing)

    def sample(
        self,
        requests: list[SampleRequest],
        params: SamplingParams,
        progress: Progress | None = None,
    ) -> list[Completion]:
        if not requests:
            return []
        out = self.call_dir(requests, params)
        progress = accepting_info(progress)
        shards = [requests[i : i + self.shard_size] for i in range(0, len(requests), self.shard_size)]
        if not parquet_io.is_complete(out):
            parquet_io.clean_tmp(out)
            missing = parquet_io.missing_shards(out, len(shards))
            done = (len(shards) - len(missing)) * self.shard_size
            if missing:
                log.info("%s: %d of %d shards to generate in %s", self.step, len(missing), len(shards), out)
            if missing and self._dispatch(out, requests, params, missing, len(shards), done, progress):
                missing = []
            for index in missing:
                part = shards[index]

                def shard_progress(d: int, _t: int, base: int = done, **info) -> None:
                    if progress:
                        progress(min(base + d, len(requests)), len(requests), **info)

                backend = self.backend  # builds the model on first use; timed by the property
                t0 = time.perf_counter()
                completions = backend.sample(part, params, shard_progress)
                self.model_seconds += time.perf_counter() - t0
                self.write_part(completions, out, index)
                self.generated += len(completions)
                done += len(part)
                if progress:
                    progress(min(done, len(requests)), len(requests))
            parquet_io.finalize_shards(out, len(shards), {"step": self.step, "requests": len(requests)})
        else:
            self.reused += len(requests)
            if progress:
                progress(len(requests), len(requests))
        completions = _from_table(parquet_io.read_output(out))
        by_id = {(c.key, c.sample_index): c for c in completions}
        try:
            got = [by_id[(r.key, r.sample_index)] for r in requests]
        except KeyError as err:
            raise RuntimeError(f"{out}: cached completions miss request {err}; delete the folder") from None
        self.prompt_tokens += sum(c.prompt_tokens for c in got)
        self.completion_tokens += sum(c.completion_tokens for c in got)
        return got

    def _dispatch(self, out: Path, requests: list[SampleRequest], params: SamplingParams, missing: list[int],
                  n: int, done: int, progress: Progress | None) -> bool:
        """Hand the missing shards to the step's dispatcher (a work pool, see tasks/backends/dispatch.py), if
        one is set; True when they were all written elsewhere."""
        from stillhouse.tasks.backends.dispatch import SHARDING, write_dispatch

        sharding = SHARDING.get()
        if sharding is None or sharding.dispatch is None:
            return False
        if self.spec is None:
            raise ValueError(f"{self.step}: this backend has no spec to reopen it on a worker")
        write_dispatch(out, self.spec, requests, params, self.shard_size)
        finished = done

        def on_done(index: int, generated: int, model_seconds: float) -> None:
            nonlocal finished
            self.generated += generated
            self.model_seconds += model_seconds
            finished += min(self.shard_size, len(requests) - index * self.shard_size)
            if progress:
                progress(min(finished, len(requests)), len(requests))

        sharding.dispatch(out, missing, n, on_done)
        left = parquet_io.missing_shards(out, n)
        if left:
            raise RuntimeError(f"{out}: shards {left[:10]} still missing after the dispatcher returned")
        return True

    def generate_shard(self, part: list[SampleRequest], params: SamplingParams) -> list[Completion]:
        """One shard's completions, generated here (a worker running a dispatched shard)."""
        backend = self.backend
        t0 = time.perf_counter()
        completions = backend.sample(part, params)
        self.model_seconds += time.perf_counter() - t0
        self.generated += len(completions)
        return completions

    @staticmethod
    def write_part(completions: list[Completion], out: Path, index: int) -> None:
        parquet_io.write_shard(_to_table(completions), out, index)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> ResumableBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

