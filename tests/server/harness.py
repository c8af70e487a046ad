"""Helpers of the server tests: a real `prefect server start` and the processes around it.

Every process a test starts runs in a session of its own and is stopped by its process group at
teardown (SIGTERM, then SIGKILL), also when the test fails: a worker's flow-run subprocess or a
server's uvicorn child never outlives the test. Each server gets a free port and its own
PREFECT_HOME, and children get PREFECT_API_URL, telemetry off and a models folder shared by the
session (the tiny models are built once, on first use).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"
PREFECT_FILE = REPO / "deployment" / "prefect.yaml"
K8S_TEMPLATE = REPO / "deployment" / "k8s-base-job-template.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_rss_mib(pid: int) -> float:
    """Resident memory of a process and all processes in its group (the server's uvicorn, ...)."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return 0.0
    total_kib = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if os.getpgid(int(status.parent.name)) != pgid:
                continue
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except (OSError, ValueError):
            continue  # exited while we looked
    return total_kib / 1024


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited; only its parent has not reaped it yet


class Procs:
    """Processes started by one test, each in its own session, with its output in a log file."""

    def __init__(self, logs: Path, env: dict[str, str]):
        self.logs = logs
        self.env = env
        self.started: list[tuple[str, subprocess.Popen]] = []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
            env=kwargs.pop("env", self.env), start_new_session=True, **kwargs,
        )
        out.close()
        self.started.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def run(self, *cmd: str, timeout: float = 180) -> str:
        """A short command (prefect CLI, stillhouse CLI) that must succeed; returns its output."""
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, cwd=REPO, env=self.env, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr

    @staticmethod
    def stop(proc: subprocess.Popen, grace: float = 20) -> None:
        if proc.poll() is not None:
            # The leader exited; its group (a flow-run subprocess, uvicorn) may still be there.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of the group left behind
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self) -> None:
        for _, proc in reversed(self.started):
            self.stop(proc)


def child_env(home: Path, models_dir: Path, api_url: str | None) -> dict[str, str]:
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    env.update({
        "PREFECT_HOME": str(home),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "STILLHOUSE_MODELS_DIR": str(models_dir),
        # `stillhouse` (the deploy-time build step) and `prefect` from this venv.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        # Poll every 2 s instead of 10 s: the tests wait on workers and runners picking runs up.
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        # A run held back by the deployment's concurrency limit retries after 2 s, not 30 s.
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
        # One torch thread per process: the 2 shared cores of these machines (see README).
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> float:
    """Seconds until `url`/health answers; fails if the process exits first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no answer from {url}/health in {timeout} s")


class Server:
    def __init__(self, procs: Procs, proc: subprocess.Popen, url: str, startup_s: float):
        self.procs, self.proc, self.url, self.startup_s = procs, proc, url, startup_s

    def client(self):
        """A sync client bound to this server, whatever the test process's own settings say."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.url)
