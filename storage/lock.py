"""One writer per run directory.

Two runs on the same workdir would interleave writes to the same intermediates and catalog, so the
second one fails at once with a clear message instead of waiting. The lock is an OS file lock
(flock): it disappears with the process, so a run killed with SIGKILL never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class RunLockedError(RuntimeError):
    pass


class RunLock:
    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / ".stillhouse.lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"run directory {self.path.parent} is in use by pid {holder}; "
                "wait for that run to finish or use another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
