"""`stillhouse serve`: a config on a cron schedule from one process, no work pool, no worker.

With no PREFECT_API_URL the command starts its own `prefect server start` (schedules need the
server's scheduler, which Prefect's ephemeral mode does not run). An every-minute cron runs the
smoke config at the next minute; SIGTERM then stops the runner and the server it started, and the
command exits 0.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from stillhouse.storage.catalog import Catalog
from tests.server.harness import SMOKE, Procs, alive, child_env, free_port, group_rss_mib

pytestmark = [pytest.mark.server, pytest.mark.integration, pytest.mark.slow]


def _wait(predicate, timeout: float, what: str, procs: Procs):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n--- serve log ---\n"
                         f"{procs.log('serve')[-4000:]}")


def test_serve_runs_the_config_on_its_schedule_and_stops_on_sigterm(tmp_path, models_dir):
    from prefect.client.orchestration import SyncPrefectClient

    port = free_port()
    workdir = tmp_path / "run"
    procs = Procs(tmp_path / "logs", child_env(tmp_path / "prefect-home", models_dir, api_url=None))
    server_pid = None
    try:
        serve = procs.start("serve", [
            sys.executable, "-m", "stillhouse.flows.cli", "serve", str(SMOKE), "--cron", "* * * * *",
            "--workdir", str(workdir), "--port", str(port),
        ])
        found = _wait(lambda: re.search(r"prefect server: pid (\d+) at (\S+)", procs.log("serve")), 120,
                      "serve to start its Prefect server", procs)
        server_pid, url = int(found.group(1)), found.group(2)
        assert url == f"http://127.0.0.1:{port}/api"
        # Printed once the server answers, just before the deployment is registered.
        _wait(lambda: "serving " in procs.log("serve"), 180, "serve to start serving", procs)

        def completed_tick():
            from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
            from prefect.exceptions import ObjectNotFound

            with SyncPrefectClient(url) as client:
                try:
                    deployment = client.read_deployment_by_name("stillhouse-scheduled/smoke")
                except ObjectNotFound:
                    return None  # serve has not registered it yet
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
                )
            done = [r for r in runs if r.state.is_completed()]
            failed = [r for r in runs if r.state.is_final() and not r.state.is_completed()]
            assert not failed, [(r.name, r.state) for r in failed]
            return done[0] if done else None

        def scheduled_runs():
            with SyncPrefectClient(url) as client:
                return [r for r in client.read_flow_runs() if r.auto_scheduled]

        # The scheduler makes the cron's runs within seconds; fail early if it does not.
        _wait(scheduled_runs, 90, "the scheduler to create the cron's runs (Prefect 3.8.x's scheduler fails "
              "on every loop with SQLAlchemy 2.1: check the server log)", procs)
        # The next minute's tick, then the whole smoke run.
        tick = _wait(completed_tick, 420, "a scheduled tick to complete", procs)
        assert tick.auto_scheduled
        rss = group_rss_mib(server_pid)

        os.kill(serve.pid, signal.SIGTERM)
        assert serve.wait(timeout=120) == 0, procs.log("serve")[-4000:]
        assert "stillhouse serve: stopped" in procs.log("serve")
        assert not alive(server_pid), "the Prefect server that serve started outlived it"
    finally:
        procs.stop_all()
        if server_pid is not None and alive(server_pid):
            os.killpg(server_pid, signal.SIGKILL)

    with Catalog(workdir, read_only=True) as cat:
        assert {r.round: r.status for r in cat.status().rounds} == {0: "committed", 1: "committed"}
    assert (Path(workdir) / "rounds" / "round-1.json").is_file()
    print(f"\n[serve] tick at {tick.expected_start_time:%H:%M:%S} -> flow run started "
          f"{(tick.start_time - tick.expected_start_time).total_seconds():.1f} s later; server RSS {rss:.0f} MiB")
