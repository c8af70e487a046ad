"""deployment/prefect.yaml on a real Prefect server, a process work pool and a worker.

The smoke config is deployed as the GPU box's nightly deployment (parameters overridden: a tmp
workdir, 2 rounds, one round per tick), and three ticks arrive: a manual run, a second manual run
while the first is still going, and a run made by the deployment's schedule. With the deployment's
concurrency limit (1, ENQUEUE) they run one after another: the first adds round 0, the next adds
round 1, the last finds the run finished and does nothing. Redeployed with CANCEL_NEW, a tick that
arrives while another runs is cancelled instead.

Prints the seconds from a trigger to the first task running on the worker, and the server's RSS.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest

from stillhouse.storage.catalog import Catalog
from tests.server.harness import K8S_TEMPLATE, PREFECT_FILE, SMOKE, group_rss_mib

pytestmark = [pytest.mark.server, pytest.mark.integration, pytest.mark.slow]

POOL = "stillhouse-gpu"
DEPLOYMENT = "stillhouse-scheduled/gsm8k-nightly"
PREFECT = [sys.executable, "-m", "prefect", "--no-prompt"]
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _wait(predicate, timeout: float, what: str, procs, logs=("worker",)):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    tails = "\n".join(f"--- {name} log (tail) ---\n{procs.log(name)[-4000:]}" for name in logs)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def _tree(client, run_id: UUID) -> list[UUID]:
    """A flow run and all its subflow runs (distill, its rounds)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    ids, frontier = [run_id], [run_id]
    while frontier:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
        )
        frontier = [c.id for c in children if c.id not in ids]
        ids.extend(frontier)
    return ids


def _first_task_start(client, run_id: UUID) -> datetime | None:
    """When the first task of the run's subflows started (seed-problems), or None."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    subflows = _tree(client, run_id)[1:]
    if not subflows:
        return None
    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=subflows)))
    starts = [t.start_time for t in tasks if t.start_time is not None]
    return min(starts) if starts else None


def _log_text(client, run_id: UUID) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    # Paged: a run held back by the concurrency limit collects a worker line per retry, more than
    # the server returns at once.
    messages: list[str] = []
    while True:
        page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                                limit=200, offset=len(messages))
        messages += [entry.message for entry in page]
        if len(page) < 200:
            return "\n".join(messages)


def _trigger(procs) -> UUID:
    """`prefect deployment run`, as a user types it; returns the new flow run's id."""
    out = procs.run(*PREFECT, "deployment", "run", DEPLOYMENT)
    match = UUID_RE.search(out.split("UUID", 1)[-1])
    assert match, out
    return UUID(match.group(0))


def test_deployment_ticks_continue_the_run_one_at_a_time(server, tmp_path):
    procs = server.procs
    workdir = tmp_path / "run"
    procs.run(*PREFECT, "work-pool", "create", POOL, "--type", "process")
    # The Kubernetes pool's base job template is accepted by the server (its placeholders all
    # have a variable), and the k8s deployment's job variables fit it; no k8s worker runs here.
    procs.run(*PREFECT, "work-pool", "create", "stillhouse-k8s", "--type", "kubernetes",
              "--base-job-template", str(K8S_TEMPLATE))
    procs.run(*PREFECT, "deploy", "--prefect-file", str(PREFECT_FILE), "--name", "gsm8k-weekly-k8s")

    # A schedule tick ~30 s ahead (besides the file's nightly cron): it comes due while the first
    # run still works, so the scheduler's run, too, has to wait for the deployment's slot.
    anchor = datetime.now(UTC) + timedelta(seconds=30)
    params = {"config": str(SMOKE), "overrides": {"workdir": str(workdir), "rounds": 2}, "rounds_per_run": 1}
    deploy_out = procs.run(
        *PREFECT, "deploy", "--prefect-file", str(PREFECT_FILE), "--name", "gsm8k-nightly",
        "--params", json.dumps(params), "--interval", "86400", "--anchor-date", anchor.isoformat(),
    )
    # The deploy-time build step created the GPU limit (STILLHOUSE_GPU_SLOTS unset: 1 slot).
    assert "tag concurrency limit 'gpu': 1 slot(s)" in deploy_out
    with server.client() as client:
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"

    # The server's scheduler turns the schedule into a run within seconds (its recent-deployments
    # loop). Fail here, with the server's log, rather than after waiting for runs that never come.
    with server.client() as client:
        _wait(lambda: any(r.auto_scheduled and r.expected_start_time <= anchor + timedelta(seconds=1)
                          for r in client.read_flow_runs(deployment_filter=_deployment_filter(deployment.id))),
              60, "the scheduler to create the schedule's run (Prefect 3.8.x's scheduler fails "
              "on every loop with SQLAlchemy 2.1: check the server log)", procs, logs=("server",))

    procs.start("worker", [*PREFECT, "worker", "start", "--pool", POOL])

    first = _trigger(procs)
    with server.client() as client:
        started = _wait(lambda: _first_task_start(client, first), 300, "the first run's first task", procs)
        created = client.read_flow_run(first).created
        picked_up = client.read_flow_run(first).start_time
    trigger_to_task = (started - created).total_seconds()

    # A second trigger while the first runs: the server holds it back until the first ends.
    second = _trigger(procs)
    with server.client() as client:
        _wait(lambda: any(s.name == "AwaitingConcurrencySlot" for s in client.read_flow_run_states(second)),
              120, "the second run to wait for the deployment's slot", procs)
        assert not client.read_flow_run(first).state.is_final(), "the first run ended before the second arrived"

        def all_final():
            runs = client.read_flow_runs(deployment_filter=_deployment_filter(deployment.id))
            scheduled = [r for r in runs if r.auto_scheduled and r.expected_start_time <= anchor + timedelta(seconds=1)]
            mine = [r for r in runs if r.id in (first, second)] + scheduled
            return mine if len(mine) == 3 and all(r.state.is_final() for r in mine) else None

        runs = _wait(all_final, 600, "the three runs to end", procs)
        by_id = {r.id: r for r in runs}
        ticked = next(r for r in runs if r.id not in (first, second))
        assert [r.state.type.value for r in runs] == ["COMPLETED"] * 3, [(r.name, r.state) for r in runs]
        assert ticked.auto_scheduled  # made by the server's scheduler from the deployment's schedule
        # ENQUEUE: the held-back runs started only after the first one had ended.
        assert by_id[second].start_time >= by_id[first].end_time
        assert ticked.start_time >= by_id[first].end_time

        # A run's last log lines reach the server in the flow run's final log batch, which may land
        # just after its final state: poll for them.
        def decisions():
            logs = {r.id: _log_text(client, r.id) for r in runs}
            later = [logs[second], logs[ticked.id]]
            found = ("running to round 0" in logs[first],
                     sum("running to round 1" in text for text in later),
                     sum("has already finished" in text for text in later))
            return found if found == (True, 1, 1) else None

        # The first run adds round 0; of the two held back, one adds round 1, the other does nothing.
        _wait(decisions, 60, "the three runs' decisions in their logs", procs)

    with Catalog(workdir, read_only=True) as cat:
        rounds = {r.round: r.status for r in cat.status().rounds}
    assert rounds == {0: "committed", 1: "committed"}
    assert sorted(p.name for p in (workdir / "rounds").glob("round-*.json")) == ["round-0.json", "round-1.json"]

    # CANCEL_NEW, chosen at deploy time. The config's rounds raised to 3 for two more ticks: the
    # first adds round 2; the second, triggered while the first works on it, is cancelled.
    procs.run(*PREFECT, "deploy", "--prefect-file", str(PREFECT_FILE), "--name", "gsm8k-nightly",
              "--params", json.dumps(params), "--concurrency-limit", "1", "--collision-strategy", "CANCEL_NEW")
    three = {"overrides": {"workdir": str(workdir), "rounds": 3}}
    with server.client() as client:
        assert client.read_deployment(deployment.id).concurrency_options.collision_strategy.value == "CANCEL_NEW"
        third = client.create_flow_run_from_deployment(deployment.id, parameters=three).id
        _wait(lambda: _first_task_start(client, third), 300, "the third run's first task", procs)
        fourth = client.create_flow_run_from_deployment(deployment.id, parameters=three).id

        def pair_final():
            got = [client.read_flow_run(i) for i in (third, fourth)]
            return got if all(r.state.is_final() for r in got) else None

        third_run, fourth_run = _wait(pair_final, 300, "the third and fourth runs to end", procs)
        assert third_run.state.is_completed(), third_run.state
        assert fourth_run.state.is_cancelled(), fourth_run.state
        assert "concurrency limit" in (fourth_run.state.message or "")
        # Cancelled before it ever ran.
        assert "RUNNING" not in {st.type.value for st in client.read_flow_run_states(fourth)}
    with Catalog(workdir, read_only=True) as cat:
        assert {r.round: r.status for r in cat.status().rounds} == {r: "committed" for r in range(3)}

    rss = group_rss_mib(server.proc.pid)
    print(f"\n[deployment] server startup {server.startup_s:.1f} s; trigger -> flow run started on the worker "
          f"{(picked_up - created).total_seconds():.1f} s; trigger -> first task running "
          f"{trigger_to_task:.1f} s; server RSS after the runs {rss:.0f} MiB")


def _deployment_filter(deployment_id: UUID):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
