"""A pool of worker processes that checks (predicted, reference) pairs under a hard time guard.

Each worker runs items on its own main thread (so the signal-based per-item limit works); the
parent kills and replaces a worker that reports no progress for `timeout_s + max(2, timeout_s)`
seconds or dies, gives the item it was on correct=False with an error, and re-queues the rest of
its chunk.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from typing import Any


from stillhouse.tasks.verify.equivalence import answers_match

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- worker pool

_Task = tuple[int, str, str]  # (key index, predicted, reference)
_ItemFn = Callable[[str, str, float], tuple[bool, str | None]]
_STARTUP_LIMIT_S = 120.0
_MAX_START_FAILURES = 3

_ctx_lock = threading.Lock()
_ctx: Any = None


def _mp_context() -> Any:
    """forkserver where available: workers fork from a server that already imported sympy and
    Math-Verify (a pool starts in milliseconds, not seconds), and, unlike plain fork, it is safe
    when the caller has threads (Prefect task runners, the tests)."""
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            if "forkserver" in multiprocessing.get_all_start_methods():
                _ctx = multiprocessing.get_context("forkserver")
                _ctx.set_forkserver_preload(["stillhouse.tasks.verify.equivalence", "math_verify"])
            else:
                _ctx = multiprocessing.get_context("spawn")
    return _ctx


def _prestart_workers_context() -> None:
    """Start the forkserver now, so that its imports (sympy, Math-Verify: seconds) overlap with the
    caller's extraction work instead of delaying the first worker. Once per process; best effort."""
    ctx = _mp_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        try:
            forkserver.ensure_running()
        except Exception:  # the pool start will report real problems
            log.debug("verifier: could not pre-start the forkserver", exc_info=True)


def _worker_main(conn: Connection, item_fn: _ItemFn, timeout_s: float) -> None:
    """Worker process: check tasks one by one, sending each verdict as soon as it is known, so the
    parent can tell which task a hung or dead worker was on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    try:
        conn.send(("ready", os.getpid()))
        while (chunk := conn.recv()) is not None:
            for idx, pred, ref in chunk:
                try:
                    ok, err = item_fn(pred, ref, timeout_s)
                except Exception as exc:
                    ok, err = False, f"{type(exc).__name__}: {exc}"[:300]
                conn.send((idx, bool(ok), err))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass


@dataclass
class _Worker:
    process: Any
    conn: Connection
    started: float
    ready: bool = False
    pending: deque[_Task] = field(default_factory=deque)
    last_progress: float = 0.0


def _start_worker(ctx: Any, item_fn: _ItemFn, timeout_s: float) -> _Worker:
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    proc = ctx.Process(
        target=_worker_main, args=(child_conn, item_fn, timeout_s), daemon=True, name="stillhouse-verifier"
    )
    proc.start()
    child_conn.close()  # so the parent sees EOF when the worker dies
    return _Worker(proc, parent_conn, started=time.monotonic())


def _stop_worker(w: _Worker, *, kill: bool) -> None:
    if kill:
        w.process.kill()
    w.process.join(timeout=5)
    w.conn.close()


class _PoolUnavailable(Exception):
    """Worker processes cannot be started here (e.g. the caller's __main__ is not importable)."""


def _run_pool(
    tasks: list[_Task],
    *,
    timeout_s: float,
    workers: int,
    item_fn: _ItemFn = answers_match,
    chunk_size: int | None = None,
) -> dict[int, tuple[bool, str | None]]:
    """Run item_fn over tasks in `workers` processes with a hard per-item guard (module docstring).

    Returns {task index: (ok, error)} for every task. item_fn must be a top-level function. If
    workers cannot be started at all, the remaining tasks run in this process (logged).
    """
    results: dict[int, tuple[bool, str | None]] = {}
    if not tasks:
        return results
    n = max(1, min(workers, len(tasks)))
    size = chunk_size or max(1, min(64, math.ceil(len(tasks) / (n * 4))))
    queue: deque[list[_Task]] = deque(tasks[i : i + size] for i in range(0, len(tasks), size))
    hard_limit = timeout_s + max(2.0, timeout_s)
    ctx = _mp_context()
    pool: list[_Worker] = []
    start_failures = 0

    def start() -> None:
        nonlocal start_failures
        try:
            pool.append(_start_worker(ctx, item_fn, timeout_s))
        except OSError as exc:
            start_failures += 1
            log.warning("verifier: cannot start a worker process: %s", exc)
            if start_failures > _MAX_START_FAILURES:
                raise _PoolUnavailable(str(exc)) from exc

    def retire(w: _Worker, reason: str) -> None:
        """Kill w; its current task fails with `reason`, the rest of its chunk is re-queued."""
        nonlocal start_failures
        _stop_worker(w, kill=True)
        pool.remove(w)
        if w.pending:
            culprit = w.pending.popleft()
            results[culprit[0]] = (False, reason)
            log.warning("verifier: %s (answer %.80r)", reason, culprit[1])
            if w.pending:
                queue.appendleft(list(w.pending))
        elif not w.ready:
            start_failures += 1
            if start_failures > _MAX_START_FAILURES:
                raise _PoolUnavailable(reason)
        if queue:
            start()

    try:
        for _ in range(min(n, len(queue))):
            start()
        while len(results) < len(tasks):
            now = time.monotonic()
            for w in pool:
                if w.ready and not w.pending and queue:
                    chunk = queue.popleft()
                    w.conn.send(chunk)
                    w.pending.extend(chunk)
                    w.last_progress = now
            deadlines = [
                w.last_progress + hard_limit if w.pending else w.started + _STARTUP_LIMIT_S
                for w in pool
                if w.pending or not w.ready
            ]
            wait_s = max(0.0, min(deadlines, default=now + 1.0) - now)
            for conn in wait_connections([w.conn for w in pool], timeout=wait_s):
                w = next(w for w in pool if w.conn is conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    w.process.join(timeout=1)
                    code = w.process.exitcode
                    retire(w, f"verifier worker died (exit code {code}) on this answer"
                           if w.ready else f"verifier worker exited at start (exit code {code})")
                    continue
                if msg[0] == "ready":
                    w.ready = True
                    continue
                idx, ok, err = msg
                w.pending.popleft()
                results[idx] = (ok, err)
                w.last_progress = time.monotonic()
            now = time.monotonic()
            for w in list(pool):
                if w.pending and now - w.last_progress > hard_limit:
                    retire(w, f"hard time limit: worker killed after {hard_limit:g}s on this answer")
                elif not w.ready and now - w.started > _STARTUP_LIMIT_S:
                    retire(w, f"verifier worker not ready after {_STARTUP_LIMIT_S:g}s")
            if not pool and queue:
                start()
    except _PoolUnavailable as exc:
        # Typical cause: the caller's __main__ cannot be re-imported by the workers (code piped to
        # `python -`). Scoring must not fail for that; it just loses the process isolation.
        log.warning("verifier: worker processes unavailable (%s); checking %d answers in process",
                    exc, len(tasks) - len(results))
        for idx, pred, ref in tasks:
            if idx not in results:
                results[idx] = item_fn(pred, ref, timeout_s)
    finally:
        for w in pool:
            with contextlib.suppress(OSError, ValueError):
                w.conn.send(None)
        for w in pool:
            w.process.join(timeout=2)
            _stop_worker(w, kill=w.process.is_alive())
    return results


