"""A round's LoRA training as a job for another machine: the plain half of training on the pool.

With "train" in `execution.steps`, the round does not train in its own process: it writes the
training's inputs into a job folder beside the adapter folder it will read,

    <workdir>/adapters/round-<r>/<key>.job/train.json     the run config (workdir made absolute),
                                                          the round, the dataset version and the
                                                          adapter to start from

and a flow run on the GPU pool (stillhouse.flows.shards.run_train) calls `run_train_job` there. That
runs `steps.train_student` itself, so the adapter lands in the very folder (same key, same content) an
in-process run writes, and the round then finds it finished, as a rerun would. The job is one shard as
far as liveness goes: its heartbeat and worker record are the dispatch files of index 0 of the job
folder (stillhouse.tasks.backends.dispatch), and the round watches them as it watches shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from stillhouse.storage import parquet_io
from stillhouse.tasks.backends.base import Progress
from stillhouse.tasks.backends.dispatch import Heartbeat, read_worker, worker_path
from stillhouse.tasks.config import RunConfig

JOB_FILE = "train.json"
JOB_INDEX = 0  # the heartbeat and worker record of the job are those of a one-shard call


def job_dir(adapter_dir: str | os.PathLike[str]) -> Path:
    adapter_dir = Path(adapter_dir)
    return adapter_dir.with_name(adapter_dir.name + ".job")


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def write_job(cfg: RunConfig, round: int, version: Any, previous: Any | None) -> Path:
    """The job folder for training round `round` on `version` (a StepResult) from `previous` (the
    previous round's train StepResult or None); its spec is written atomically, and rewritten only
    if missing (the folder is named by the training's key, so an existing spec is this one)."""
    from stillhouse.tasks.steps import train_target

    _, out, _ = train_target(cfg, round, version, previous)
    folder = job_dir(out.resolve())
    if (folder / JOB_FILE).is_file():
        return folder
    # Another machine's working directory is not ours: every path it opens must be absolute.
    shared = cfg.model_copy(update={"workdir": _absolute(cfg.workdir), "cache_dir": _absolute(cfg.cache_dir)})

    def step(result: Any | None) -> dict[str, Any] | None:
        if result is None:
            return None
        fields = dataclasses.asdict(result)
        return {**fields, "path": _absolute(fields["path"]), "metrics": {}}

    folder.mkdir(parents=True, exist_ok=True)
    parquet_io.write_json_atomic(
        {"config": shared.model_dump(mode="json"), "round": round, "version": step(version),
         "previous": step(previous)},
        folder / JOB_FILE,
    )
    return folder


def read_job(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / JOB_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no training job; is the run's workdir on storage this worker sees "
                                f"(same path on every machine)?") from None


def run_train_job(folder: str | os.PathLike[str], heartbeat_s: float = 5.0, attempt: str = "",
                  progress: Progress | None = None) -> dict[str, Any]:
    """Train the job in `folder` here (or find it trained); returns who trained it and the step's
    metrics, also written as the job's worker record before this returns."""
    from stillhouse.tasks.steps import StepResult, train_student, train_target

    folder = Path(folder)
    spec = read_job(folder)
    cfg = RunConfig.model_validate(spec["config"])
    version = StepResult(**spec["version"])
    previous = StepResult(**spec["previous"]) if spec["previous"] else None
    t0 = time.perf_counter()
    with Heartbeat(folder, JOB_INDEX, heartbeat_s, attempt) as beat:
        result = train_student(cfg, spec["round"], version, previous, progress)
        earlier = read_worker(folder, JOB_INDEX)
        if not result.computed and earlier is not None:  # a duplicate of an attempt thought lost
            return {**earlier, "reused": True}
        # The record is what the round waits for (the adapter alone may be an attempt that died
        # before this line): an adapter found finished without one gets it now, with no seconds.
        info = {**beat.info, "round": spec["round"], "adapter": result.path,
                "out": str(train_target(cfg, spec["round"], version, previous)[1]), "metrics": result.metrics,
                "seconds": time.perf_counter() - t0, "attempt": attempt}
        parquet_io.write_json_atomic(info, worker_path(folder, JOB_INDEX))
    return {**info, "reused": not result.computed}


def finished(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The job's worker record once the job is done (adapter finished and record written), else None."""
    from stillhouse.tasks.training.trainer import finished_result

    info = read_worker(folder, JOB_INDEX)
    if info is None or "out" not in info or finished_result(info["out"]) is None:
        return None
    return info
