"""Scale-out on a real Prefect server: a round's generations as shard flow runs over a process pool.

A "gpu" process pool, the shard deployment from deployment/prefect.yaml, two real workers
(`prefect worker start --pool gpu --type process`), and the smoke config (one round, batch size 4,
so its 64 teacher requests are 4 shards):

- the round's shards run on both workers (their PIDs are in the shard records) and the round's
  dataset in the catalog equals the in-process run's, sample for sample;
- a worker killed with -9 (its process group and the flow-run process it started: a lost machine)
  while it runs a shard: the round notices the silent heartbeat, marks the run Crashed, resubmits the
  shard, the other worker finishes it, and the dataset is still the in-process one, with no sample
  twice in the catalog.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from stillhouse.storage.catalog import Catalog
from stillhouse.tasks import shards
from tests.server.harness import PREFECT_FILE, SMOKE, alive

pytestmark = [pytest.mark.server, pytest.mark.integration, pytest.mark.slow]

PREFECT = [sys.executable, "-m", "prefect", "--no-prompt"]
STILLHOUSE = [sys.executable, "-m", "stillhouse.flows.cli"]
DATASET = ["sample_id", "problem_id", "sample_index", "response", "extracted", "correct", "reward", "weight"]


def _config(tmp_path: Path, name: str, execution: dict | None) -> Path:
    data = yaml.safe_load(SMOKE.read_text())
    data.update(workdir=str(tmp_path / name), rounds=1)
    data["sampling"] = {**data["sampling"], "batch_size": 4}  # 64 requests -> 4 shards of 16
    if execution:
        data["execution"] = execution
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _dataset(workdir: Path) -> list[tuple]:
    with Catalog(workdir, read_only=True) as cat:
        rows = cat.read("samples").select(DATASET).to_pylist()
    return sorted(tuple(r[c] for c in DATASET) for r in rows)


def _shard_records(workdir: Path) -> dict[int, dict]:
    """The teacher call's shard records (who ran each shard), by shard index."""
    out = {}
    for path in (workdir / "cache" / "teacher").glob(f"*/{shards.DISPATCH}/shard-*.worker.json"):
        info = json.loads(path.read_text())
        out[info["index"]] = info
    return out


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid` (Linux /proc): the flow-run processes a worker started run in
    sessions of their own, outside the worker's process group."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


@pytest.fixture
def pool(server):
    procs = server.procs
    procs.run(*PREFECT, "work-pool", "create", "gpu", "--type", "process")
    procs.run(*PREFECT, "deploy", "--prefect-file", str(PREFECT_FILE), "--name", "gpu-shard", "--pool", "gpu")
    # --limit 1: a box with one GPU runs one shard at a time (and the shards spread over both boxes).
    workers = [procs.start(f"worker-{i}", [*PREFECT, "worker", "start", "--pool", "gpu", "--type", "process",
                                             "--name", f"gpu-box-{i}", "--limit", "1"]) for i in (1, 2)]
    return procs, workers


def _run(procs, config: Path, name: str):
    """`stillhouse run` against the test's server, as a user types it; returns the process."""
    return procs.start(name, [*STILLHOUSE, "run", str(config)])


def _wait_exit(procs, proc, name: str, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except Exception:
        raise AssertionError(f"{name} still running after {timeout} s:\n{procs.log(name)[-6000:]}") from None
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{procs.log(name)[-6000:]}"


# Starting a shard's flow-run process takes 20-30 s here: start_timeout_s above that, and a killed
# shard that never beat is noticed after it.
EXECUTION = {"work_pool": "gpu", "heartbeat_s": 1.0, "lost_after_s": 10.0, "start_timeout_s": 60.0, "poll_s": 0.5}


def test_shards_on_two_workers_equal_in_process_and_survive_a_killed_worker(pool, server, tmp_path):
    """One server, one in-process reference run, then two pool runs: a clean one and one that loses a
    worker (sharing the server and the reference keeps this test near 4 minutes here)."""
    procs, workers = pool
    local = _run(procs, _config(tmp_path, "local", None), "local")
    _wait_exit(procs, local, "local", 300)
    _clean_run_on_both_workers(procs, workers, tmp_path)
    _killed_worker(procs, workers, server, tmp_path)


def _clean_run_on_both_workers(procs, workers, tmp_path):
    pooled = _run(procs, _config(tmp_path, "pooled", {**EXECUTION, "steps": ["sample", "evaluate"]}), "pooled")
    _wait_exit(procs, pooled, "pooled", 400)
    assert "4 shards submitted" in procs.log("pooled")

    assert _dataset(tmp_path / "pooled") == _dataset(tmp_path / "local")
    records = _shard_records(tmp_path / "pooled")
    assert sorted(records) == [0, 1, 2, 3]
    ran_on = {w.pid for r in records.values() for w in workers if w.pid in r["ancestors"]}
    assert ran_on == {w.pid for w in workers}, records
    metrics = json.loads((tmp_path / "pooled" / "rounds" / "round-0.json").read_text())
    assert (metrics["sample_shards_total"], metrics["sample_shards_done"], metrics["sample_shards_failed"]) == (4, 4, 0)
    assert metrics["evaluate_shards_done"] >= 1
    # The student's answers, generated on the pool too, are the in-process ones.
    assert metrics["student_accuracy"] == json.loads(
        (tmp_path / "local" / "rounds" / "round-0.json").read_text())["student_accuracy"]
    # A rerun finds every shard done: nothing is submitted.
    again = _run(procs, _config(tmp_path, "pooled", {**EXECUTION, "steps": ["sample", "evaluate"]}), "again")
    _wait_exit(procs, again, "again", 300)
    assert "shards submitted" not in procs.log("again")


def _killed_worker(procs, workers, server, tmp_path):
    before = {w.pid: set(_children(w.pid)) for w in workers}
    pooled = _run(procs, _config(tmp_path, "killed", {**EXECUTION, "steps": ["sample"]}), "killed")

    # As soon as a worker has started a shard's flow run, the machine is "lost": the worker's group
    # and the flow-run process (its own session) are killed with -9 before the shard can finish.
    deadline = time.monotonic() + 300
    victim = None
    while victim is None and time.monotonic() < deadline:
        assert pooled.poll() is None, procs.log("killed")[-6000:]
        for w in workers:
            if set(_children(w.pid)) - before[w.pid]:
                victim = w
                break
        time.sleep(0.2)
    assert victim is not None, "no worker started a shard"
    doomed = _children(victim.pid)
    os.killpg(victim.pid, signal.SIGKILL)
    for pid in doomed:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    survivor = next(w for w in workers if w is not victim)
    _wait_exit(procs, pooled, "killed", 400)
    assert not alive(victim.pid) and alive(survivor.pid)

    assert _dataset(tmp_path / "killed") == _dataset(tmp_path / "local")
    with Catalog(tmp_path / "killed", read_only=True) as cat:
        ids = cat.read("samples")["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 64
    metrics = json.loads((tmp_path / "killed" / "rounds" / "round-0.json").read_text())
    assert metrics["sample_shards_resubmitted"] >= 1 and metrics["sample_shards_done"] == 4, metrics
    records = _shard_records(tmp_path / "killed")
    resubmitted = [r for r in records.values() if r["attempt"] != "0"]
    assert resubmitted and all(survivor.pid in r["ancestors"] for r in resubmitted), records
    assert "no heartbeat" in procs.log("killed") and "resubmitting" in procs.log("killed")
    with server.client() as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="shard")))
    states = sorted(r.state.type.value for r in runs)
    assert states.count("CRASHED") >= 1 and "RUNNING" not in states, states
