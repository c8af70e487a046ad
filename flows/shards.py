"""Scale-out: a round's generations fan out as shard flow runs over a GPU work pool.

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
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger

from stillhouse.storage import parquet_io
from stillhouse.tasks import shards
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


class PoolDispatcher:
    """Runs a generation call's missing shards as flow runs on the work pool and waits for them."""

    def __init__(self, execution: ExecutionConfig, run_name: str, round: int | None, step: str):
        self.ex = execution
        self.prefix = f"{run_name}-round-{round}-{step}" if round is not None else f"{run_name}-{step}"
        self.step = step
        self.round = round
        self.stats = {"total": 0, "done": 0, "reused": 0, "failed": 0, "resubmitted": 0}
        self._checked = False

    # ----------------------------------------------------------------- submission

    def _check_deployment(self, client) -> None:
        if self._checked:
            return
        from prefect.exceptions import ObjectNotFound

        try:
            dep = client.read_deployment_by_name(self.ex.shard_deployment)
        except ObjectNotFound:
            raise ValueError(
                f"execution.shard_deployment {self.ex.shard_deployment!r} does not exist on the Prefect "
                f"server; deploy it: prefect deploy --prefect-file deployment/prefect.yaml --name gpu-shard "
                f"--pool {self.ex.work_pool}") from None
        if dep.work_pool_name != self.ex.work_pool:
            raise ValueError(f"execution.work_pool is {self.ex.work_pool!r} but the shard deployment "
                             f"{self.ex.shard_deployment!r} runs on pool {dep.work_pool_name!r}")
        self._checked = True

    def _submit(self, call_dir: Path, index: int, attempt: int) -> UUID:
        from prefect.deployments import run_deployment

        name = f"{self.prefix}-{call_dir.name[:8]}-shard-{index:03d}" + (f"-retry{attempt}" if attempt else "")
        # A heartbeat of an earlier round process's attempt with this number (a rerun starts at 0 again)
        # is not the new run's: without it the new run counts as starting (start_timeout_s) until it beats,
        # instead of lost after lost_after_s while a worker still starts it.
        dispatch.heartbeat_path(call_dir, index).unlink(missing_ok=True)
        fr = run_deployment(
            self.ex.shard_deployment,
            parameters={"call_dir": str(call_dir.resolve()), "index": index,
                        "heartbeat_s": self.ex.heartbeat_s, "attempt": str(attempt)},
            timeout=0, flow_run_name=name, as_subflow=True,
            tags=["stillhouse", "shard", self.step] + ([f"round-{self.round}"] if self.round is not None else []),
        )
        return fr.id

    # ----------------------------------------------------------------- waiting

    def __call__(self, call_dir: Path, missing: list[int], n: int,
                 on_done: Callable[[int, int, float], None]) -> None:
        call_dir = Path(call_dir)
        self.stats["total"] += n
        self.stats["reused"] += n - len(missing)
        with _client() as client:
            self._check_deployment(client)
            runs = {i: self._submit(call_dir, i, 0) for i in missing}
            attempts = {i: 0 for i in missing}
            reasons: dict[int, list[str]] = {i: [] for i in missing}
            # Per shard: (flow run state, heartbeat beat, when either last changed on OUR clock).
            seen: dict[int, tuple[str, Any, float]] = {}
            _log().info("%s: %d shards submitted to %s (%d already done)", self.prefix, len(missing),
                     self.ex.shard_deployment, n - len(missing))
            pending = set(missing)
            while pending:
                time.sleep(self.ex.poll_s)
                for i in sorted(pending):
                    reason = self._look(client, call_dir, i, runs[i], attempts[i], seen)
                    if reason is None:
                        continue
                    if reason == "done":
                        pending.discard(i)
                        info = dispatch.read_worker(call_dir, i) or {}
                        self.stats["done"] += 1
                        on_done(i, int(info.get("requests", 0)), float(info.get("model_seconds", 0.0)))
                        continue
                    self.stats["failed"] += 1
                    reasons[i].append(reason)
                    if attempts[i] >= self.ex.max_resubmits:
                        raise ShardLostError(
                            f"{self.prefix} shard {i} of {call_dir}: gave up after {attempts[i] + 1} attempts: "
                            + "; ".join(f"attempt {k}: {r}" for k, r in enumerate(reasons[i])))
                    attempts[i] += 1
                    self.stats["resubmitted"] += 1
                    _log().warning("%s shard %d: %s; resubmitting (attempt %d of %d)", self.prefix, i, reason,
                                attempts[i], self.ex.max_resubmits)
                    seen.pop(i, None)
                    runs[i] = self._submit(call_dir, i, attempts[i])

    def _look(self, client, call_dir: Path, i: int, run_id: UUID, attempt: int,
              seen: dict[int, tuple[str, Any, float]]) -> str | None:
        """'done', None (still going) or why the shard's current attempt is gone."""
        if parquet_io.shard_path(call_dir, i).is_file():
            return "done"
        state = client.read_flow_run(run_id).state
        if state is None:
            return None
        if state.is_final():
            if parquet_io.shard_path(call_dir, i).is_file():  # written between the two looks
                return "done"
            if state.is_completed():
                return "its flow run completed without writing the part (cache not shared with the worker?)"
            return f"flow run {state.name}: {(state.message or '').strip()[:300]}"
        if not (state.is_running() or state.is_pending()):
            return None  # Scheduled / Late / AwaitingConcurrencySlot: waiting for a free worker
        beat = dispatch.read_heartbeat(call_dir, i)
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
