"""Scale-out: a round's model work fans out as flow runs over a GPU work pool.

With `execution.work_pool` set, the GPU steps (sample, evaluate, synthesize) run as before in the
round's flow, but every generation call they make hands its missing shards
(tasks/backends/dispatch.py) to a `PoolDispatcher`:

- each shard is a flow run of the shard deployment (`run_shard` below, deployed as
  'stillhouse-shard/gpu-shard' in deployment/prefect.yaml), started with
  `run_deployment(..., timeout=0)` as a subflow of the step, named
  `<run>-round-<r>-<step>-<call>-shard-<i>` so the UI lists it under its round with its worker and
  duration; whichever worker of the pool is free picks it up;
- a shard reads its requests from the call's folder in the run's cache and writes its Parquet part
  there, so a finished shard is never redone and a rerun submits only the missing ones;
- the round waits, polling the shards' flow runs and heartbeat files; a shard whose run crashed,
  failed or was cancelled, or whose heartbeat stopped while its run still says Running or Pending (a
  worker killed with -9, a lost machine), is resubmitted, at most `max_resubmits` times, with the
  reason logged; the lost run is marked Crashed so the UI does not show it running forever;
- then the call's folder is finalized and read exactly as in process: same shards, same batches, same
  per-request seeds, so the result is the in-process one.

The step's metrics get `<step>_shards_{total,done,reused,failed,resubmitted}` for the round's artifact.

The round's LoRA training goes the same way as one job (`pooled_train`, `run_train` below, deployed as
'stillhouse-train/gpu-train'): the worker trains from a job folder beside the adapter folder
(tasks/train_job.py) and the round, once the job is done, finds the adapter finished.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger

from stillhouse.storage import parquet_io
from stillhouse.tasks import shards, train_job
from stillhouse.tasks.backends import dispatch
from stillhouse.tasks.config import ExecutionConfig, RunConfig
from stillhouse.tasks.run_view import run_label

log = logging.getLogger(__name__)


@flow(name="stillhouse-shard", log_prints=False)
def run_shard(call_dir: str, index: int, heartbeat_s: float = 5.0, attempt: str = "0") -> dict[str, Any]:
    """One shard of a generation call, on whichever GPU worker picked it up: reads the call's
    requests from the run's cache and writes the shard's Parquet part there."""
    info = shards.run_shard(call_dir, index, heartbeat_s=heartbeat_s, attempt=attempt)
    get_run_logger().info(
        "shard %d of %s: %s on %s pid %s (%.1f s)", index, call_dir,
        "found done" if info.get("reused") else f"{info.get('requests')} requests generated",
        info.get("hostname"), info.get("pid"), info.get("seconds", 0.0),
    )
    return info


@flow(name="stillhouse-train", log_prints=False)
def run_train(job_dir: str, heartbeat_s: float = 5.0, attempt: str = "0") -> dict[str, Any]:
    """A round's LoRA training, on whichever GPU worker picked it up: reads the job (config, dataset
    version, adapter to start from) from the run's workdir and writes the adapter there."""
    from stillhouse.flows.monitoring import ProgressReporter

    spec = train_job.read_job(job_dir)
    progress = ProgressReporter(f"round {spec['round']} train", unit="steps")
    info = train_job.run_train_job(job_dir, heartbeat_s=heartbeat_s, attempt=attempt, progress=progress)
    metrics = info.get("metrics", {})
    get_run_logger().info(
        "round %s training: %s on %s pid %s (%.1f s, %s steps, loss %s)", spec["round"],
        "found done" if info.get("reused") else "trained", info.get("hostname"), info.get("pid"),
        info.get("seconds", 0.0), metrics.get("steps"), metrics.get("train_loss"),
    )
    return info


def _log() -> logging.Logger | logging.LoggerAdapter:
    """The step's run logger (its lines show in the UI under the round), or this module's outside a run."""
    try:
        return get_run_logger()
    except Exception:
        return log


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


class ShardLostError(RuntimeError):
    """A shard failed more often than execution.max_resubmits allows."""


@dataclass
class PoolJob:
    """One flow run's worth of work on the pool, as the round's waiting loop sees it."""

    label: str  # for the log and errors: "shard 3 of <call dir>", "training of round 0"
    files: Path  # its heartbeat lies in files/dispatch/ under `index` (tasks/backends/dispatch.py)
    index: int
    deployment: str  # '<flow>/<deployment>' that runs it
    run_name: str  # its flow run's name (a resubmission adds -retryN)
    parameters: dict[str, Any]  # the flow's parameters, less heartbeat_s and attempt
    done: Callable[[], bool]  # its output is complete (read from the shared storage)
    finish: Callable[[], None]  # called once, when it is done
    missing_output: str  # why a run that completed without `done` is a failure


class PoolDispatcher:
    """Runs a generation call's missing shards as flow runs on the work pool and waits for them."""

    def __init__(self, execution: ExecutionConfig, run_name: str, round: int | None, step: str):
        self.ex = execution
        self.prefix = f"{run_name}-round-{round}-{step}" if round is not None else f"{run_name}-{step}"
        self.step = step
        self.round = round
        self.stats = {"total": 0, "done": 0, "reused": 0, "failed": 0, "resubmitted": 0}
        self._checked: set[str] = set()

    # ----------------------------------------------------------------- submission

    def _check_deployment(self, client, deployment: str) -> None:
        if deployment in self._checked:
            return
        from prefect.exceptions import ObjectNotFound

        try:
            dep = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            name = deployment.split("/", 1)[1]
            field = "train_deployment" if deployment == self.ex.train_deployment else "shard_deployment"
            raise ValueError(
                f"execution.{field} {deployment!r} does not exist on the Prefect server; "
                f"deploy it: prefect deploy --prefect-file deployment/prefect.yaml --name {name} "
                f"--pool {self.ex.work_pool}") from None
        if dep.work_pool_name != self.ex.work_pool:
            raise ValueError(f"execution.work_pool is {self.ex.work_pool!r} but the deployment "
                             f"{deployment!r} runs on pool {dep.work_pool_name!r}")
        self._checked.add(deployment)

    def _submit(self, job: PoolJob, attempt: int) -> UUID:
        from prefect.deployments import run_deployment

        # A heartbeat of an earlier round process's attempt with this number (a rerun starts at 0 again)
        # is not the new run's: without it the new run counts as starting (start_timeout_s) until it beats,
        # instead of lost after lost_after_s while a worker still starts it.
        dispatch.heartbeat_path(job.files, job.index).unlink(missing_ok=True)
        fr = run_deployment(
            job.deployment,
            parameters={**job.parameters, "heartbeat_s": self.ex.heartbeat_s, "attempt": str(attempt)},
            timeout=0, flow_run_name=job.run_name + (f"-retry{attempt}" if attempt else ""), as_subflow=True,
            tags=["stillhouse", "shard", self.step] + ([f"round-{self.round}"] if self.round is not None else []),
        )
        return fr.id

    # ----------------------------------------------------------------- waiting

    def __call__(self, call_dir: Path, missing: list[int], n: int,
                 on_done: Callable[[int, int, float], None]) -> None:
        """The `dispatch` of tasks/backends/dispatch.py: the call's missing shards, one flow run each."""
        call_dir = Path(call_dir)
        self.stats["total"] += n
        self.stats["reused"] += n - len(missing)

        def shard(i: int) -> PoolJob:
            def done() -> bool:
                return parquet_io.shard_path(call_dir, i).is_file()

            def finish() -> None:
                info = dispatch.read_worker(call_dir, i) or {}
                on_done(i, int(info.get("requests", 0)), float(info.get("model_seconds", 0.0)))

            return PoolJob(
                label=f"shard {i} of {call_dir}", files=call_dir, index=i,
                deployment=self.ex.shard_deployment,
                run_name=f"{self.prefix}-{call_dir.name[:8]}-shard-{i:03d}",
                parameters={"call_dir": str(call_dir.resolve()), "index": i},
                done=done, finish=finish,
                missing_output="its flow run completed without writing the part (cache not shared with the worker?)",
            )

        self.run_jobs([shard(i) for i in missing], f"{len(missing)} shards submitted to {self.ex.shard_deployment} "
                                                    f"({n - len(missing)} already done)")

    def run_jobs(self, jobs: list[PoolJob], announce: str) -> None:
        """Submit each job as a flow run on the pool, wait for all of them, resubmit lost or failed
        ones (at most max_resubmits times each); returns once every job is done."""
        if not jobs:
            return
        with _client() as client:
            for deployment in {job.deployment for job in jobs}:
                self._check_deployment(client, deployment)
            runs = {k: self._submit(job, 0) for k, job in enumerate(jobs)}
            attempts = {k: 0 for k in runs}
            reasons: dict[int, list[str]] = {k: [] for k in runs}
            # Per job: (flow run state, heartbeat beat, when either last changed on OUR clock).
            seen: dict[int, tuple[str, Any, float]] = {}
            _log().info("%s: %s", self.prefix, announce)
            pending = set(runs)
            while pending:
                time.sleep(self.ex.poll_s)
                for k in sorted(pending):
                    job = jobs[k]
                    reason = self._look(client, job, runs[k], attempts[k], seen, k)
                    if reason is None:
                        continue
                    if reason == "done":
                        pending.discard(k)
                        self.stats["done"] += 1
                        job.finish()
                        continue
                    self.stats["failed"] += 1
                    reasons[k].append(reason)
                    if attempts[k] >= self.ex.max_resubmits:
                        raise ShardLostError(
                            f"{self.prefix} {job.label}: gave up after {attempts[k] + 1} attempts: "
                            + "; ".join(f"attempt {a}: {r}" for a, r in enumerate(reasons[k])))
                    attempts[k] += 1
                    self.stats["resubmitted"] += 1
                    _log().warning("%s %s: %s; resubmitting (attempt %d of %d)", self.prefix, job.label, reason,
                                   attempts[k], self.ex.max_resubmits)
                    seen.pop(k, None)
                    runs[k] = self._submit(job, attempts[k])

    def _look(self, client, job: PoolJob, run_id: UUID, attempt: int,
              seen: dict[int, tuple[str, Any, float]], i: int) -> str | None:
        """'done', None (still going) or why the job's current attempt is gone."""
        if job.done():
            return "done"
        state = client.read_flow_run(run_id).state
        if state is None:
            return None
        if state.is_final():
            if job.done():  # written between the two looks
                return "done"
            if state.is_completed():
                return job.missing_output
            return f"flow run {state.name}: {(state.message or '').strip()[:300]}"
        if not (state.is_running() or state.is_pending()):
            return None  # Scheduled / Late / AwaitingConcurrencySlot: waiting for a free worker
        beat = dispatch.read_heartbeat(job.files, job.index)
        mine = beat if beat is not None and beat.get("attempt") == str(attempt) else None
        mark = (state.type.value, mine.get("beat") if mine else None)
        now = time.monotonic()
        last = seen.get(i)
        if last is None or (last[0], last[1]) != mark:
            seen[i] = (*mark, now)
            return None
        silent = now - last[2]
        # Before its first heartbeat a shard is still starting (a fresh process: pull steps, imports).
        if silent < (self.ex.lost_after_s if mine else self.ex.start_timeout_s):
            return None
        where = f"{mine.get('hostname')} pid {mine.get('pid')}" if mine else "no heartbeat yet"
        reason = f"lost: flow run {state.name} but no heartbeat for {silent:.0f} s ({where})"
        from prefect.states import Crashed

        try:
            client.set_flow_run_state(run_id, Crashed(message=f"stillhouse: {reason}"), force=True)
        except Exception as err:  # the mark is for the UI; the resubmission does not depend on it
            log.warning("could not mark flow run %s crashed: %s", run_id, err)
        return reason


def sharded(fn: Callable[..., Any], step: str) -> Callable[..., Any]:
    """`fn` (a GPU step of tasks/steps.py, config first, round second when it has one) with its
    generation calls cut by execution.shard_size and, when execution.work_pool is set and `step` is in
    execution.steps, their shards run on the pool; its metrics get the shard counts."""

    @functools.wraps(fn)
    def step_fn(cfg: RunConfig, *args: Any, **kwargs: Any):
        ex = cfg.execution
        if ex.work_pool is None or step not in ex.steps:
            if ex.shard_size is None:
                return fn(cfg, *args, **kwargs)
            with dispatch.sharding(dispatch.Sharding(shard_size=ex.shard_size)):
                return fn(cfg, *args, **kwargs)
        round = args[0] if args and isinstance(args[0], int) else kwargs.get("round")
        name = step if round is not None else f"{step}-base"
        # Named after the run's label (name + workdir id), as its round flow runs are.
        dispatcher = PoolDispatcher(ex, run_label(cfg.run_name, cfg.workdir), round, name)
        with dispatch.sharding(dispatch.Sharding(shard_size=ex.shard_size, dispatch=dispatcher)):
            result = fn(cfg, *args, **kwargs)
        result.metrics.update({f"{name.replace('-', '_')}_shards_{k}": v for k, v in dispatcher.stats.items()})
        return result

    return step_fn


def pooled_train(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` (steps.train_student) as its own flow run on the pool when execution.work_pool is set and
    "train" is in execution.steps: the worker trains into the adapter folder the round then reads, so
    the round's call of `fn` finds it finished; its metrics get the job's `train_shards_*` counts."""

    @functools.wraps(fn)
    def step_fn(cfg: RunConfig, round: int, version: Any, previous: Any | None, progress: Any = None):
        from stillhouse.tasks.steps import train_target
        from stillhouse.tasks.training.trainer import finished_result

        ex = cfg.execution
        if ex.work_pool is None or "train" not in ex.steps:
            return fn(cfg, round, version, previous, progress)
        _, out, _ = train_target(cfg, round, version, previous)
        if finished_result(out) is not None:  # trained before: the round's call says Cached
            return fn(cfg, round, version, previous, progress)
        folder = train_job.write_job(cfg, round, version, previous)
        dispatcher = PoolDispatcher(ex, run_label(cfg.run_name, cfg.workdir), round, "train")
        dispatcher.stats["total"] = 1
        dispatcher.run_jobs([PoolJob(
            label=f"training of round {round}", files=folder, index=train_job.JOB_INDEX,
            deployment=ex.train_deployment, run_name=f"{dispatcher.prefix}-{out.name[:8]}",
            parameters={"job_dir": str(folder)}, done=lambda: train_job.finished(folder) is not None,
            finish=lambda: None,
            missing_output="its flow run completed without a finished adapter (workdir not shared with the worker?)",
        )], f"training submitted to {ex.train_deployment}")
        result = fn(cfg, round, version, previous, progress)
        info = train_job.finished(folder) or {}
        # Done on the pool for this invocation: computed, with the worker's model seconds (the ledger's).
        return dataclasses.replace(result, computed=True, metrics={
            **result.metrics, "model_seconds": float(info.get("metrics", {}).get("model_seconds") or 0.0),
            **{f"train_shards_{k}": v for k, v in dispatcher.stats.items()}})

    return step_fn
