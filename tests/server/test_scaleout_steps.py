"""Scale-out beyond sampling: evaluate and synthesize through the pool, and giving up on a shard.

tests/server/test_scaleout.py sends the teacher's samples through the pool. Here, on one real Prefect
server with a process pool "gpu" and one real worker (`--limit 1`, a box with one GPU):

- the smoke config for 2 rounds (round 0 synthesizes) with execution.steps = [evaluate, synthesize]
  (sampling stays in process, it is covered there): the untrained student's and every round's
  evaluation rows and the synthesized problems equal an in-process run of the same config (same
  shard_size: it is part of the cache key); the summaries count each step's shards; the shard flow
  runs are on the server under their round (or the run, for the untrained student's evaluation);
- a second shard deployment on the same pool whose worker cannot load the model (its models folder
  holds a truncated copy of the teacher's weights, as an interrupted sync leaves it): with
  max_resubmits=1 the sample step fails after 2 attempts with ShardLostError naming both reasons,
  `stillhouse run` exits non-zero with it, the round is not committed; a rerun on the good deployment
  commits round 0 with the in-process run's samples and redoes nothing finished before;
- a heartbeat left by an earlier round process's attempt of a shard does not make the rerun's
  attempt of the same number, still starting on a worker, read as lost.

The server, the pool, the worker and the in-process reference run are shared by the module's
tests (module-scoped fixtures): each costs tens of seconds on this 2-core machine. The reference
runs while the first pool run waits on its shard processes.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from stillhouse.storage.catalog import Catalog
from stillhouse.tasks.run_view import run_label
from tests.server.harness import PREFECT_FILE, SMOKE, Procs, Server, child_env, free_port, wait_healthy
from tests.server.test_scaleout import DATASET, PREFECT, _dataset, _run, _wait_exit

pytestmark = [pytest.mark.server, pytest.mark.integration, pytest.mark.slow]

# Larger than every generation call of the smoke run (64 teacher requests): one shard per call, so one
# worker's fresh shard processes (20-30 s each here) are as few as the steps allow.
SHARD_SIZE = 128
EVAL = ["round", "student_key", "eval_set", "problem_id", "sample_index", "response", "extracted", "correct"]
SYNTH = ["problem_id", "question", "answer", "source", "split", "parent_id", "operation", "round_introduced"]
# Waits are the looks of the round; lost_after_s/start_timeout_s are loose: no worker is lost here, and a
# shard process starting slowly on the loaded machine must not read as lost.
POLLING = {"heartbeat_s": 1.0, "lost_after_s": 60.0, "start_timeout_s": 240.0, "poll_s": 0.5}
BROKEN = "gpu-shard-broken-models"


def _config(tmp_path: Path, name: str, rounds: int, execution: dict) -> Path:
    data = yaml.safe_load(SMOKE.read_text())
    data.update(workdir=str(tmp_path / name), rounds=rounds, execution={"shard_size": SHARD_SIZE, **execution})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _rows(workdir: Path, table: str, columns: list[str], where=lambda r: True) -> list[tuple]:
    with Catalog(workdir, read_only=True) as cat:
        rows = cat.read(table).to_pylist()
    return sorted(tuple(r[c] for c in columns) for r in rows if where(r))


def _synthesized(workdir: Path) -> list[tuple]:
    return _rows(workdir, "problems", SYNTH, lambda r: r["operation"] != "seed")


def _summary(workdir: Path, name: str) -> dict:
    return json.loads((workdir / "rounds" / f"{name}.json").read_text())


def _shard_runs(client, prefix: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=f"{prefix}-")))
    return [r for r in runs if r.name.startswith(f"{prefix}-") and "-shard-" in r.name]


def _flow_run(client, name: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    assert len(runs) == 1, (name, [r.name for r in runs])
    return runs[0]


class Reference:
    """The smoke run for 2 rounds in process (no work_pool, same shard_size): the expected result.
    It runs beside the first pool run (one worker's shard processes leave a core idle), once."""

    def __init__(self, procs: Procs, home: Path):
        self.procs, self.workdir = procs, home / "local"
        self.proc = _run(procs, _config(home, "local", 2, {}), "local")

    def result(self) -> Path:
        _wait_exit(self.procs, self.proc, "local", 600)
        return self.workdir


@pytest.fixture(scope="module")
def module_server(tmp_path_factory, models_dir):
    """A Prefect server shared by the module's tests, with its process helper and a folder."""
    home = tmp_path_factory.mktemp("scaleout-steps")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    procs = Procs(home / "logs", child_env(home / "prefect-home", models_dir, url))
    try:
        proc = procs.start("server", [sys.executable, "-m", "prefect", "server", "start",
                                      "--host", "127.0.0.1", "--port", str(port)])
        yield Server(procs, proc, url, wait_healthy(url, proc)), home
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def pool(module_server, models_dir):
    """The "gpu" process pool with the shard deployment, one worker, and the in-process reference
    run (started, not awaited)."""
    from stillhouse.tasks.models.resolve import resolve_model

    server, home = module_server
    procs = server.procs
    # Built here once (~50 s on a fresh session, nothing after): the two runs would each build it.
    resolve_model("tiny-tutor", models_dir)
    reference = Reference(procs, home)
    procs.run(*PREFECT, "work-pool", "create", "gpu", "--type", "process")
    procs.run(*PREFECT, "deploy", "--prefect-file", str(PREFECT_FILE), "--name", "gpu-shard", "--pool", "gpu")
    procs.start("worker", [*PREFECT, "worker", "start", "--pool", "gpu", "--type", "process",
                           "--name", "gpu-box", "--limit", "1"])
    return server, home, reference


def test_evaluate_and_synthesize_through_the_pool_equal_in_process(pool):
    server, home, ref = pool
    procs = server.procs
    config = _config(home, "pooled", 2, {"work_pool": "gpu", "steps": ["evaluate", "synthesize"], **POLLING})
    proc = _run(procs, config, "pooled")
    _wait_exit(procs, proc, "pooled", 700)
    pooled, reference = home / "pooled", ref.result()

    # The untrained student (round -1) and both rounds' student, row for row; synthesis kept problems.
    evals = _rows(pooled, "eval_results", EVAL)
    assert evals == _rows(reference, "eval_results", EVAL)
    assert {r[0] for r in evals} == {-1, 0, 1}, sorted({r[0] for r in evals})
    synthesized = _synthesized(pooled)
    assert synthesized and synthesized == _synthesized(reference)
    assert {r[-1] for r in synthesized} == {1}  # written by round 0's synthesis for round 1
    assert _dataset(pooled) == _dataset(reference)  # sampled in process (no sample shards: below)

    summaries = {"evaluate-base": _summary(pooled, "base"), "round-0": _summary(pooled, "round-0"),
                 "round-1": _summary(pooled, "round-1")}
    counted = {("evaluate-base", "evaluate_base"), ("round-0", "evaluate"), ("round-0", "synthesize"),
               ("round-1", "evaluate")}
    for where, step in counted:
        m = summaries[where]
        assert m[f"{step}_shards_total"] >= 1 and m[f"{step}_shards_done"] == m[f"{step}_shards_total"], (where, m)
        assert m[f"{step}_shards_reused"] == 0, (where, m)
    assert not any(k.startswith("sample_shards_") for m in summaries.values() for k in m)
    assert not any(k.startswith("synthesize_shards_") for k in summaries["round-1"])  # last round: none

    label = run_label("smoke", pooled)
    with server.client() as client:
        top = _flow_run(client, label)
        rounds = {r: _flow_run(client, f"{label}-round-{r}") for r in (0, 1)}
        assert all(fr.parent_task_run_id and client.read_task_run(fr.parent_task_run_id).flow_run_id == top.id
                   for fr in rounds.values())
        for where, step in counted:
            prefix = f"{label}-evaluate-base" if where == "evaluate-base" else f"{label}-{where}-{step}"
            parent = top if where == "evaluate-base" else rounds[int(where[-1])]
            runs = _shard_runs(client, prefix)
            m = summaries[where]
            # One flow run per shard and resubmission (a shard process that starts very slowly may be
            # resubmitted; the result is the same).
            assert len(runs) == m[f"{step}_shards_total"] + m[f"{step}_shards_resubmitted"], (prefix, runs)
            assert sum(r.state.is_completed() for r in runs) >= m[f"{step}_shards_done"], (prefix, runs)
            for fr in runs:
                assert fr.deployment_id is not None and fr.parent_task_run_id is not None, fr
                assert client.read_task_run(fr.parent_task_run_id).flow_run_id == parent.id, (fr.name, where)
        # Nothing else went through the pool: no sample shards, no synthesis in the last round.
        everything = _shard_runs(client, label)
        assert not [r.name for r in everything if "-sample-" in r.name or "-round-1-synthesize-" in r.name]


def _broken_models(home: Path, models_dir: Path) -> Path:
    """A models folder as a worker whose copy of the teacher was cut short holds it: every file of
    tiny-tutor (its manifest too, so it is not rebuilt), the weights truncated to half."""
    broken = home / "broken-models"
    shutil.copytree(models_dir / "tiny-tutor", broken / "tiny-tutor")
    weights = broken / "tiny-tutor" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return broken


def _deploy_broken(procs: Procs, home: Path, models: Path) -> None:
    """The shard deployment of deployment/prefect.yaml under another name, on the same pool, with the
    broken models folder in its job variables' env (a `prefect deploy` as a user would do it)."""
    spec = yaml.safe_load(PREFECT_FILE.read_text())
    shard = next(d for d in spec["deployments"] if d["name"] == "gpu-shard")
    shard["name"] = BROKEN
    shard["work_pool"]["job_variables"]["env"]["STILLHOUSE_MODELS_DIR"] = str(models)
    spec["deployments"] = [shard]
    path = home / "prefect-broken.yaml"
    path.write_text(yaml.safe_dump(spec))
    procs.run(*PREFECT, "deploy", "--prefect-file", str(path), "--name", BROKEN, "--pool", "gpu")


def test_a_shard_that_always_fails_gives_up_after_max_resubmits_and_a_rerun_commits(pool, models_dir):
    server, home, ref = pool
    procs = server.procs
    _deploy_broken(procs, home, _broken_models(home, models_dir))
    ex = {"work_pool": "gpu", "steps": ["sample"], "max_resubmits": 1, **POLLING}
    config = _config(home, "giveup", 1, {**ex, "shard_deployment": f"stillhouse-shard/{BROKEN}"})
    workdir = home / "giveup"

    proc = _run(procs, config, "giveup")
    try:
        proc.wait(timeout=600)
    except Exception:
        raise AssertionError(f"still running after 600 s:\n{procs.log('giveup')[-6000:]}") from None
    out = procs.log("giveup")
    assert proc.returncode != 0, out[-6000:]
    label = run_label("smoke", workdir)
    prefix = f"{label}-round-0-sample"
    assert f"ShardLostError: {prefix} shard 0 of " in out, out[-6000:]
    message = out[out.index("ShardLostError: "):].splitlines()[0]
    assert "gave up after 2 attempts" in message, message
    # Each attempt's reason: its flow run failed, because the worker could not load the model.
    for k in (0, 1):
        assert f"attempt {k}: flow run Failed: " in message, message
    assert message.count("SafetensorError: Error while deserializing header") == 2, message
    assert "resubmitting (attempt 1 of 1)" in out

    with server.client() as client:
        runs = _shard_runs(client, prefix)
        assert sorted(r.name.rsplit("-shard-", 1)[1] for r in runs) == ["000", "000-retry1"], [r.name for r in runs]
        assert all(r.state.is_failed() for r in runs), [(r.name, r.state) for r in runs]
        round0 = _flow_run(client, f"{label}-round-0")
        assert round0.state.is_failed(), round0.state
    # The round is not committed: no version, no samples, no summary.
    with Catalog(workdir, read_only=True) as cat:
        assert cat.read("rounds").num_rows == 0 and cat.read("samples").num_rows == 0
    assert not (workdir / "rounds" / "round-0.json").exists()
    base_parts = sorted((workdir / "cache" / "evaluate-base").rglob("*"))
    base_mtimes = {p: p.stat().st_mtime_ns for p in base_parts if p.is_file()}
    assert base_mtimes

    # The rerun on the good deployment: only the missing shard is submitted, the round commits.
    again = _run(procs, _config(home, "giveup", 1, ex), "rerun")
    _wait_exit(procs, again, "rerun", 600)
    rerun = procs.log("rerun")
    assert "evaluate-base: output found complete" in rerun, rerun[-6000:]
    assert "1 shards submitted" in rerun and "(0 already done)" in rerun, rerun[-6000:]
    with Catalog(workdir, read_only=True) as cat:
        assert cat.read("rounds")["round"].to_pylist() == [0]
    expected = _rows(ref.result(), "samples", DATASET, lambda r: r["round"] == 0)
    assert _rows(workdir, "samples", DATASET) == expected
    m = _summary(workdir, "round-0")
    assert m["sample_shards_total"] == m["sample_shards_done"] == 1 and m["sample_shards_failed"] == 0, m
    # Nothing finished before was redone: the untrained student's evaluation is the same files.
    assert {p: p.stat().st_mtime_ns for p in base_mtimes} == base_mtimes
    with server.client() as client:
        runs = _shard_runs(client, prefix)
    assert len(runs) == 3 and sum(r.state.is_completed() for r in runs) == 1, [(r.name, r.state) for r in runs]


def test_a_heartbeat_left_by_an_earlier_round_process_does_not_make_a_starting_shard_lost(module_server, tmp_path):
    """A rerun submits shard 0 as attempt 0 again; an earlier round process's attempt 0 of the same
    shard (its machine lost with the round) left a heartbeat. While the new run is Pending (a worker
    took it; its pod still pulls the image), that stale file is not the new run's heartbeat: the shard
    is still starting (start_timeout_s), not lost after lost_after_s."""
    import contextvars
    import threading

    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Pending

    from stillhouse.flows.shards import PoolDispatcher
    from stillhouse.storage import parquet_io
    from stillhouse.tasks.backends.dispatch import Heartbeat
    from stillhouse.tasks.config import ExecutionConfig

    server, _ = module_server
    call_dir = tmp_path / "call"
    with Heartbeat(call_dir, 0, 1.0, attempt="0"):
        pass  # one beat, then silence: the earlier attempt's process is gone
    ex = ExecutionConfig(work_pool="no-worker", shard_deployment="stillhouse-shard/no-worker-shard",
                         heartbeat_s=1.0, lost_after_s=2.0, start_timeout_s=600.0, poll_s=0.2, max_resubmits=0)
    outcome: dict = {}
    with temporary_settings({PREFECT_API_URL: server.url}), server.client() as client:
        client.create_work_pool(WorkPoolCreate(name="no-worker", type="process"))
        flow_id = client.create_flow_from_name("stillhouse-shard")
        deployment = client.create_deployment(flow_id=flow_id, name="no-worker-shard", work_pool_name="no-worker",
                                              entrypoint="stillhouse.flows.shards:run_shard")
        dispatcher = PoolDispatcher(ex, "run", 1, "sample")

        def dispatch() -> None:
            try:
                dispatcher(call_dir, [0], 1, lambda *a: outcome.setdefault("done", a))
            except Exception as err:
                outcome["error"] = err

        # In the test's settings context (the server's URL): a new thread would start with an empty one.
        thread = threading.Thread(target=contextvars.copy_context().run, args=(dispatch,))
        thread.start()
        try:
            deadline = time.monotonic() + 60
            runs: list = []
            while not runs and time.monotonic() < deadline:
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment])))
                time.sleep(0.2)
            assert len(runs) == 1, runs
            client.set_flow_run_state(runs[0].id, Pending())  # taken by a worker, its process not started
            # Well past lost_after_s (2 s) and the stale heartbeat's silence; far below start_timeout_s.
            time.sleep(8)
            assert "error" not in outcome, outcome["error"]
        finally:
            # The shard's part appears (its process started after all and finished): the call is done.
            parquet_io.shard_path(call_dir, 0).parent.mkdir(parents=True, exist_ok=True)
            parquet_io.shard_path(call_dir, 0).write_bytes(b"part")
            thread.join(timeout=30)
    assert "error" not in outcome, outcome["error"]
    assert dispatcher.stats["done"] == 1 and dispatcher.stats["failed"] == 0, dispatcher.stats
