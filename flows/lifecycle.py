"""The life of a `stillhouse run` process: checks before Prefect starts, Prefect's API server for
the run, and stopping on Ctrl-C (SIGINT) or SIGTERM at a safe point, within seconds, resumable.

Nothing here imports Prefect at module level: the CLI sets PREFECT_API_URL before Prefect reads
its settings.

Checks before anything starts (`preflight`): the workdir is not in use by another run, and every
local source file exists -- mistakes that fail in well under a second here, instead of after a
Prefect server has started.

The API server (`run_server`): without PREFECT_API_URL, Prefect would start its ephemeral server
as a child in the run's process group, so the terminal's Ctrl-C (sent to the whole foreground
group) killed it first; the run could then record nothing and sat in the client's connection
retries for minutes. `run_server` starts the same ephemeral API (`create_app(ephemeral=True)`, the
same $PREFECT_HOME database, so `stillhouse ui` shows the run) in a session of its own, which
signals to the run's group do not reach; it ends when the run ends, and on its own when the run's
process dies (its stdin is a pipe from the run: EOF).

Stopping:

Every write of a run is atomic (Parquet shards and checkpoints: temp file then rename, manifest
last; catalog writes: one transaction each), so a run may stop anywhere and a rerun of the same
command continues. A stop still waits for a *safe point* when one is near, so that work in hand
(the shard being generated, the training step running) is not thrown away:

- the first signal asks for a stop; the run raises `RunStopped` at the next safe point: the next
  progress update (after every generated batch or shard and every optimizer step) or the next
  step boundary, whichever comes first; if none comes within `grace_s` it stops where it is;
- a second signal stops at once, wherever the run is.

`RunStopped` is a KeyboardInterrupt: Prefect marks the task and flow runs Crashed ("aborted by an
interrupt signal"), `with` blocks release the workdir lock and close the catalog on the way out,
and nothing catches it as an ordinary error (no retries).

SIGTERM while a flow runs is Prefect's: its engine raises TerminationSignal at once and marks the
run Crashed (or Cancelled, when a runner or worker asked for the cancellation), which is what
deployments rely on. Outside a flow, SIGTERM is handled like SIGINT here.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 10.0


class RunStopped(KeyboardInterrupt):
    """The run was stopped by a signal; rerunning the same command resumes it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class _Stop:
    requested: int | None = None  # the signal that asked for a stop
    timer: threading.Timer | None = None


def stop_requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _Stop.requested


def safe_point() -> None:
    """Raise RunStopped if a stop was asked for: call where stopping loses no finished work."""
    if _Stop.requested is not None:
        if _Stop.timer is not None:
            # Stopping now: the grace period's forced stop must not land in the unwinding (while
            # Prefect records the crash).
            _Stop.timer.cancel()
        raise RunStopped(_Stop.requested)


def stop_signal(exc: BaseException) -> int | None:
    """The signal number if `exc` is a run being stopped by a signal (ours, Ctrl-C's
    KeyboardInterrupt, Prefect's TerminationSignal for SIGTERM), else None."""
    if isinstance(exc, RunStopped):
        return exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return int(signal.SIGINT)
    prefect_exceptions = sys.modules.get("prefect.exceptions")
    if prefect_exceptions is not None and isinstance(exc, prefect_exceptions.TerminationSignal):
        return int(exc.signal)
    return None


def signal_lost_in(exc: BaseException) -> BaseException | None:
    """The stop that `exc` hides, or None.

    A signal's exception (ours: KeyboardInterrupt or RunStopped; Prefect's TerminationSignal for
    SIGTERM in a flow) raised while DuckDB runs a query comes back as DuckDB's own error
    (`RuntimeError('Query interrupted')`), an ordinary Exception that a step would report as a
    failure (exit 1, or swallowed where errors are only logged) instead of the stop it was. The
    signal's exception is still in the error's context chain: find it there."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if not isinstance(e, Exception) and stop_signal(e) is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


def _handler(grace_s: float):
    def handle(signum: int, frame) -> None:
        unwinding = sys.exc_info()[1]
        if signum == signal.SIGTERM and unwinding is not None and not isinstance(unwinding, KeyboardInterrupt) \
                and stop_signal(unwinding) == signal.SIGTERM:
            # Prefect re-sends SIGTERM to this handler once it has recorded the crash of its own
            # TerminationSignal: the run is already stopping, nothing more to do or say.
            _Stop.requested = _Stop.requested or signum
            return
        if _Stop.requested is None:
            _Stop.requested = signum
            log.warning(
                "%s: stopping at the next safe point (finished shards and checkpoints are kept; at "
                "most %.0fs); press Ctrl-C again to stop at once", signal.Signals(signum).name, grace_s,
            )
            # No safe point in time: act as a second Ctrl-C (interrupt_main runs this handler in
            # the main thread, like a real signal).
            _Stop.timer = threading.Timer(grace_s, _thread.interrupt_main)
            _Stop.timer.daemon = True
            _Stop.timer.start()
            return
        raise RunStopped(_Stop.requested)

    return handle


@contextmanager
def stop_on_signals(grace_s: float = DEFAULT_GRACE_S) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM stop the run as described above (main thread only)."""
    handler = _handler(grace_s)
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    _Stop.requested = None
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if _Stop.timer is not None:
            _Stop.timer.cancel()
            _Stop.timer = None


# --------------------------------------------------------------------------- preflight


def preflight(config: Any) -> None:
    """What can fail a run before any Prefect or model work, failing at once."""
    from stillhouse.storage.lock import RunLock
    from stillhouse.tasks.steps import check_sources

    check_sources(config)  # every source loaded once: missing, unreadable or empty ones are named
    # Another run holds the workdir: fail now; the flow itself takes the lock for the whole run.
    RunLock(config.workdir).acquire().release()


# --------------------------------------------------------------------------- the API server


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_healthy(url: str) -> bool:
    """True if a Prefect API answers its health check at `url` (…/api)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def stop_group(proc: subprocess.Popen, waits: tuple[tuple[int | None, float], ...]) -> None:
    """Stop a child that leads its own process group: for each (signal, seconds) send the signal
    to the group (None: send nothing, only wait) and wait; stop at the first wait that sees it end."""
    for sig, wait in waits:
        if sig is not None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class RunServer:
    """Prefect's ephemeral API for one run, in a session of its own (see the module docstring)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def _healthy(self) -> bool:
        return api_healthy(self.url)

    def start(self, timeout: float = 180.0) -> RunServer:
        home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
        home.mkdir(parents=True, exist_ok=True)
        log_path = home / "stillhouse-run-server.log"
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        deadline = time.monotonic() + timeout
        for _attempt in range(3):  # a port taken between choosing and binding: choose again
            port = _free_port()
            self.url = f"http://127.0.0.1:{port}/api"
            with open(log_path, "ab") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "stillhouse.flows.lifecycle", "serve-api", str(port)],
                    stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,
                )
            while not self._healthy():
                if self.proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    self.stop()
                    raise ChildProcessError(f"Prefect's API server did not start in {timeout:.0f}s; see {log_path}")
                time.sleep(0.2)
            else:
                log.info("Prefect API for this run: %s (its own session; log %s)", self.url, log_path)
                return self
        raise ChildProcessError(f"Prefect's API server did not start; see {log_path}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.stdin.close()  # EOF: the server shuts down gracefully (uvicorn's SIGTERM path)
        except OSError:
            pass
        stop_group(proc, ((None, 10), (signal.SIGTERM, 10), (signal.SIGKILL, 10)))


@contextmanager
def run_server() -> Iterator[str | None]:
    """Within the block PREFECT_API_URL points at a server: the one the user set, or a
    `RunServer` started here (yields its URL; None when the user's is used). Call before Prefect
    is imported: Prefect reads its settings from the environment once."""
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    import atexit

    server = RunServer().start()
    os.environ["PREFECT_API_URL"] = server.url
    # Prefect flushes its logs and events to the API from atexit handlers registered after this
    # one, so they run first (LIFO) and still find the server up.
    atexit.register(server.stop)
    yield server.url


def _serve_api(port: int) -> None:
    """The server process: Prefect's ephemeral API app under uvicorn, ended by EOF on stdin."""

    def watch_parent() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the run closed the pipe or died
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(15)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    os.environ["PREFECT_UI_ENABLED"] = "0"
    import uvicorn
    from prefect.server.api.server import create_app

    uvicorn.run(create_app(ephemeral=True, final=True), host="127.0.0.1", port=port, log_level="error",
                lifespan="on")


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve-api"]:
        _serve_api(int(sys.argv[2]))
