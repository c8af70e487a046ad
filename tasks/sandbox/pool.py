"""A pool of warm sandboxed workers that run untrusted programs, one fresh confined child each.

    with SandboxPool(cfg.sandbox) as pool:          # refuses below cfg.sandbox.min_level
        results = pool.run_many(["print(6 * 7)", "while True: pass"])
    results[0].stdout == "42\\n"; results[1].limit == "cpu"

Starting an interpreter (and bubblewrap) costs tens of milliseconds; a worker pays it once and then
forks a child per program, which is what makes the sandbox faster than a bare
`subprocess.run([python, "-c", code])` per program. The worker enforces the per-program limits; this
side enforces a backstop wall clock on the worker itself (limit + grace) and replaces a worker that
died, hung or answered garbage, so one hostile program never stops the pool.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from stillhouse.tasks.sandbox.isolation import Isolation, detect, worker_command

# Seconds the worker may take beyond a program's wall clock to report (fork, kill, reap).
_GRACE = 5.0


@dataclass(frozen=True)
class ProgramResult:
    """How one program ended. `limit`: which limit stopped it (cpu, wall, memory, output,
    file_size, open_files, setup, worker), or None."""

    stdout: str
    exit: int | None
    signal: int | None
    limit: str | None
    stderr_tail: str
    seconds: float
    level: int

    @property
    def ok(self) -> bool:
        """Ran to the end with status 0 and no limit hit."""
        return self.exit == 0 and self.signal is None and self.limit is None

    @property
    def failure(self) -> str | None:
        """Why the program gives no answer (None when it ran cleanly and printed something)."""
        if self.limit:
            return f"limit {self.limit}" + (f" (signal {self.signal})" if self.signal else "")
        if self.signal is not None:
            return f"killed by signal {self.signal} ({signal.Signals(self.signal).name})"
        if self.exit != 0:
            last = self.stderr_tail.strip().splitlines()[-1:] or [""]
            return f"exit {self.exit}: {last[0][:200]}"
        if not self.stdout.strip():
            return "no output"
        return None

    def record(self) -> dict:
        """The fields a verified row carries (stdout is the extracted answer's source)."""
        out = asdict(self)
        out["failure"] = self.failure
        return out


def limits_of(cfg) -> dict:
    return {"cpu_seconds": cfg.cpu_seconds, "wall_seconds": cfg.wall_seconds,
            "memory_mb": cfg.memory_mb, "file_size_mb": cfg.file_size_mb,
            "open_files": cfg.open_files, "processes": cfg.processes,
            "output_bytes": cfg.output_bytes}


class _Worker:
    """One sandboxed worker process and its line protocol."""

    def __init__(self, argv: list[str]):
        # Its own session: the backstop kill takes bubblewrap and everything under it.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env={}, start_new_session=True,
                                     cwd="/")
        self._buf = b""
        hello = self._readline(time.monotonic() + 60)
        if hello is None or not json.loads(hello).get("ready"):
            self.kill()
            raise RuntimeError(f"sandbox worker failed to start: {' '.join(argv[:3])} ...")

    def _readline(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def run(self, code: str, limits: dict) -> dict | None:
        """The worker's report, or None when the worker died or overran its backstop."""
        try:
            self.proc.stdin.write((json.dumps({"code": code, "limits": limits}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        line = self._readline(time.monotonic() + limits["wall_seconds"] + _GRACE)
        try:
            return json.loads(line) if line is not None else None
        except ValueError:
            return None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class SandboxPool:
    """`workers` warm sandboxed workers; `run` / `run_many` are safe to call from threads."""

    def __init__(self, cfg, isolation: Isolation | None = None):
        self.cfg = cfg
        self.isolation = isolation or detect(cfg.bwrap, cfg.libseccomp)
        self.isolation.require(cfg.min_level)  # refuse before anything runs
        self.limits = limits_of(cfg)
        self._argv = worker_command(self.isolation.python, self.isolation.bwrap,
                                    self.isolation.libseccomp)
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self.restarts = 0

    @property
    def level(self) -> int:
        return self.isolation.level

    def __enter__(self) -> SandboxPool:
        for _ in range(self.cfg.workers):
            self._idle.put(self._start())
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._all:
            worker.kill()
        self._all.clear()

    def _start(self) -> _Worker:
        worker = _Worker(self._argv)
        self._all.append(worker)
        return worker

    def run(self, code: str) -> ProgramResult:
        """Run one program under the pool's limits."""
        worker = self._idle.get()
        try:
            report = worker.run(code, self.limits)
            if report is None:  # the program took its worker down (or the worker hung): replace it
                worker.kill()
                self._all.remove(worker)
                self.restarts += 1
                worker = self._start()
                report = {"stdout": "", "exit": None, "signal": None, "limit": "worker",
                          "stderr_tail": "the sandbox worker died or stopped answering",
                          "seconds": self.limits["wall_seconds"]}
        finally:
            self._idle.put(worker)
        return ProgramResult(stdout=report["stdout"], exit=report["exit"], signal=report["signal"],
                             limit=report["limit"], stderr_tail=report["stderr_tail"],
                             seconds=report["seconds"], level=self.level)

    def run_many(self, codes: list[str]) -> list[ProgramResult]:
        """Run programs on all workers at once; results in input order."""
        with ThreadPoolExecutor(max_workers=self.cfg.workers) as ex:
            return list(ex.map(self.run, codes))
