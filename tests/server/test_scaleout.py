"""Scale-out on a real Prefect server: a round's generations as shard flow runs over a process pool.

A "gpu" process pool, the shard deployment from deployment/prefect.yaml, two real workers
(`prefect worker start --pool gpu --type process --limit 1`: one shard at a time, as a box with one
GPU), and the smoke config for one round with its 64 teacher requests cut into 4 shards. One
in-process reference run, then one pool run during which a worker is lost:

- shards run on both workers (the PIDs in the shard records have each worker among their parents);
- once one worker has finished a shard and started its next, it is killed with -9 (its process group
  and the flow-run process it started, which Prefect puts in a session of its own: a lost machine).
  The round sees the run stuck without a heartbeat, marks it Crashed, resubmits the shard, and the
  other worker finishes it;
- the round's dataset in the catalog equals the in-process run's sample for sample, with no sample
  twice; the round's metrics count the resubmission;
- the round's training runs as a flow run of its own (the gpu-train deployment) on the worker left,
  and its adapter has the in-process run's weights;
- a rerun submits nothing.

One pool run serves both checks (a clean run and a killed one would double the ~2 minutes of shard
process starts on this 2-core machine).
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
from stillhouse.tasks import train_job
from stillhouse.tasks.backends import dispatch
from stillhouse.tasks.run_view import run_label
from tests.server.harness import PREFECT_FILE, SMOKE, alive

pytestmark = [pytest.mark.server, pytest.mark.integration, pytest.mark.slow]

PREFECT = [sys.executable, "-m", "prefect", "--no-prompt"]
STILLHOUSE = [sys.executable, "-m", "stillhouse.flows.cli"]
DATASET = ["sample_id", "problem_id", "sample_index", "response", "extracted", "correct", "reward", "weight"]


SHARD_SIZE = 16  # 64 teacher requests -> 4 shards: each worker gets more than one


def _config(tmp_path: Path, name: str, execution: dict) -> Path:
    data = yaml.safe_load(SMOKE.read_text())
    data.update(workdir=str(tmp_path / name), rounds=1, execution=execution)
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
    for path in (workdir / "cache" / "teacher").glob(f"*/{dispatch.DISPATCH}/shard-*.worker.json"):
        info = json.loads(path.read_text())
        out[info["index"]] = info
    return out


def _assert_same_weights(adapter: str, reference: str) -> None:
    import torch
    from safetensors.torch import load_file

    got, expected = (load_file(str(Path(a) / "adapter_model.safetensors")) for a in (adapter, reference))
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


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
    for name in ("gpu-shard", "gpu-train"):
        procs.run(*PREFECT, "deploy", "--prefect-file", str(PREFECT_FILE), "--name", name, "--pool", "gpu")
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


# Starting a shard's flow-run process took 20-30 s here (pull step, imports): a shard that never beat
# is lost after start_timeout_s; one that stopped beating after lost_after_s.
EXECUTION = {"work_pool": "gpu", "shard_size": SHARD_SIZE, "steps": ["sample", "train"], "heartbeat_s": 1.0,
             "lost_after_s": 10.0, "start_timeout_s": 45.0, "poll_s": 0.5}


def _victim(procs, pooled, workers, records_of):
    """The first worker that has finished a shard and then started another flow-run process."""
    after_first: dict[int, set[int]] = {}  # a worker's processes when its first record appeared
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert pooled.poll() is None, f"the run ended before a worker could be lost:\n{procs.log('pooled')[-6000:]}"
        records = records_of()
        for w in workers:
            if w.pid not in after_first:
                if any(w.pid in r["ancestors"] for r in records.values()):
                    after_first[w.pid] = set(_children(w.pid))
            elif set(_children(w.pid)) - after_first[w.pid]:
                return w
        time.sleep(0.2)
    raise AssertionError(f"no worker started a second shard:\n{procs.log('pooled')[-6000:]}")


def test_shards_on_two_workers_equal_in_process_and_survive_a_lost_worker(pool, server, tmp_path):
    procs, workers = pool
    local = _run(procs, _config(tmp_path, "local", {"shard_size": SHARD_SIZE}), "local")
    _wait_exit(procs, local, "local", 300)

    pooled = _run(procs, _config(tmp_path, "pooled", EXECUTION), "pooled")
    victim = _victim(procs, pooled, workers, lambda: _shard_records(tmp_path / "pooled"))
    doomed = _children(victim.pid)
    os.killpg(victim.pid, signal.SIGKILL)
    for pid in doomed:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    survivor = next(w for w in workers if w is not victim)
    _wait_exit(procs, pooled, "pooled", 400)
    assert not alive(victim.pid) and alive(survivor.pid)
    assert "4 shards submitted" in procs.log("pooled")

    assert _dataset(tmp_path / "pooled") == _dataset(tmp_path / "local")
    with Catalog(tmp_path / "pooled", read_only=True) as cat:
        ids = cat.read("samples")["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 64

    records = _shard_records(tmp_path / "pooled")
    assert sorted(records) == list(range(4))
    ran_on = {w.pid for r in records.values() for w in workers if w.pid in r["ancestors"]}
    assert ran_on == {w.pid for w in workers}, records
    resubmitted = [r for r in records.values() if r["attempt"] != "0"]
    assert resubmitted and all(survivor.pid in r["ancestors"] for r in resubmitted), records
    metrics = json.loads((tmp_path / "pooled" / "rounds" / "round-0.json").read_text())
    assert metrics["sample_shards_total"] == metrics["sample_shards_done"] == 4, metrics
    assert metrics["sample_shards_resubmitted"] >= 1 and metrics["sample_shards_failed"] >= 1, metrics
    assert "heartbeat" in procs.log("pooled") and "resubmitting" in procs.log("pooled")
    with server.client() as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="-shard-")))
    states = [r.state.type.value for r in runs]
    assert states.count("CRASHED") >= 1 and "RUNNING" not in states and "PENDING" not in states, states
    # named after the run's label (its name and workdir id), under its round and step
    label = run_label("smoke", tmp_path / "pooled")
    assert all(r.name.startswith(f"{label}-round-0-sample-") for r in runs), [r.name for r in runs]

    # The training ran as its own flow run, on the worker left, into the adapter folder an
    # in-process run writes, with the same weights.
    assert "training submitted to stillhouse-train/gpu-train" in procs.log("pooled")
    assert metrics["train_shards_total"] == metrics["train_shards_done"] == 1, metrics
    (job,) = (tmp_path / "pooled" / "adapters" / "round-0").glob("*.job")
    trained = train_job.finished(job)
    assert trained is not None and survivor.pid in trained["ancestors"], trained
    local_round = json.loads((tmp_path / "local" / "rounds" / "round-0.json").read_text())
    assert Path(metrics["adapter"]).relative_to(tmp_path / "pooled") == \
        Path(local_round["adapter"]).relative_to(tmp_path / "local")
    _assert_same_weights(metrics["adapter"], local_round["adapter"])
    with server.client() as client:
        (train_run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="-train-")))
    assert train_run.name.startswith(f"{label}-round-0-train-") and train_run.state.is_completed()
    assert train_run.parent_task_run_id is not None  # shown under the round's train step

    # A rerun finds every shard and the adapter done: nothing is submitted, nothing added to the catalog.
    again = _run(procs, _config(tmp_path, "pooled", EXECUTION), "again")
    _wait_exit(procs, again, "again", 300)
    assert "submitted" not in procs.log("again")
    with Catalog(tmp_path / "pooled", read_only=True) as cat:
        assert cat.read("samples").num_rows == 64
