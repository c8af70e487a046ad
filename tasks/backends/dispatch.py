"""The files and the switch that let a generation call's shards run in other processes.

`ResumableBackend.sample` cuts a call into shards cached as Parquet parts of the call's folder.
When `SHARDING` (a context variable set around a step by stillhouse.flows.shards) carries a
`dispatch`, the backend writes the call's requests and its own spec here:

    <call dir>/dispatch/spec.json         how to open the backend again (model, batch size, adapter,
                                          shard size) and the sampling parameters
    <call dir>/dispatch/requests.parquet  the call's requests in order (key, sample index, seed, messages)

and hands the missing shard indices to `dispatch`, which has them run elsewhere
(stillhouse.tasks.shards.run_shard on a worker) and returns when their parts exist. Who ran a shard
and whether it is still alive are recorded beside them:

    <call dir>/dispatch/shard-NNNNN.worker.json     host, pid, parent pids, seconds
    <call dir>/dispatch/shard-NNNNN.heartbeat       rewritten while it runs (a counter, see Heartbeat)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from stillhouse.storage import parquet_io
from stillhouse.tasks.backends.base import SampleRequest, SamplingParams

log = logging.getLogger(__name__)

DISPATCH = "dispatch"

# dispatch(call_dir, missing shard indices, number of shards, on_done(index, generated, seconds)):
# runs the missing shards elsewhere and returns once every one of them has its part file.
Dispatch = Callable[[Path, list[int], int, Callable[[int, int, float], None]], None]


@dataclass
class Sharding:
    """How the generation calls of the current step are cut and where their shards run."""

    shard_size: int | None = None  # None: the backend's own cache shard
    dispatch: Dispatch | None = None  # None: generate in this process


SHARDING: ContextVar[Sharding | None] = ContextVar("stillhouse_sharding", default=None)


@contextlib.contextmanager
def sharding(value: Sharding | None) -> Iterator[Sharding | None]:
    token = SHARDING.set(value)
    try:
        yield value
    finally:
        SHARDING.reset(token)


# --------------------------------------------------------------------------- the call's dispatch files


def dispatch_dir(call_dir: str | os.PathLike[str]) -> Path:
    return Path(call_dir) / DISPATCH


def write_dispatch(call_dir: Path, spec: dict[str, Any], requests: list[SampleRequest], params: SamplingParams,
                   shard_size: int) -> None:
    """What a worker needs to run any shard of this call; written once (the call dir is
    content-addressed, so an existing copy is the same)."""
    d = dispatch_dir(call_dir)
    if (d / "spec.json").is_file():
        return
    d.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "key": [r.key for r in requests],
        "sample_index": pa.array([r.sample_index for r in requests], pa.int32()),
        "seed": pa.array([r.seed for r in requests], pa.int64()),
        "messages": [json.dumps(list(r.messages)) for r in requests],
    })
    parquet_io.write_parquet_atomic(table, d / "requests.parquet")
    # Written last: its presence says the requests are in place.
    parquet_io.write_json_atomic({"backend": spec, "params": asdict(params), "shard_size": shard_size,
                                  "requests": len(requests)}, d / "spec.json")


def read_dispatch(call_dir: Path) -> tuple[dict[str, Any], list[SampleRequest], SamplingParams, int]:
    d = dispatch_dir(call_dir)
    try:
        spec = json.loads((d / "spec.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{d / 'spec.json'}: no dispatch spec; is the run's cache on storage "
                                f"this worker sees (same path on every machine)?") from None
    rows = parquet_io.read_parquet(d / "requests.parquet").to_pylist()
    requests = [SampleRequest(key=r["key"], sample_index=r["sample_index"], seed=r["seed"],
                              messages=tuple(json.loads(r["messages"]))) for r in rows]
    p = spec["params"]
    params = SamplingParams(temperature=p["temperature"], top_p=p["top_p"], max_new_tokens=p["max_new_tokens"],
                            stop=tuple(p["stop"]))
    return spec, requests, params, int(spec["shard_size"])


def n_shards(n_requests: int, shard_size: int) -> int:
    """
    >>> n_shards(64, 16), n_shards(65, 16), n_shards(0, 16)
    (4, 5, 0)
    """
    return -(-n_requests // shard_size)


def shard_slice(requests: list[SampleRequest], shard_size: int, index: int) -> list[SampleRequest]:
    """Shard `index` of a call: the same cut `ResumableBackend.sample` makes in process."""
    if not 0 <= index < n_shards(len(requests), shard_size):
        raise ValueError(f"shard index {index} out of range: the call has "
                         f"{n_shards(len(requests), shard_size)} shards")
    return requests[index * shard_size:(index + 1) * shard_size]


# --------------------------------------------------------------------------- who ran a shard


def _ancestors(limit: int = 6) -> list[int]:
    """Parent pids up the tree (Linux /proc): tells which worker process started this shard."""
    out, pid = [], os.getppid()
    for _ in range(limit):
        if pid <= 1:
            break
        out.append(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def worker_identity() -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "pid": os.getpid(), "ancestors": _ancestors()}


def worker_path(call_dir: Path, index: int) -> Path:
    return dispatch_dir(call_dir) / f"shard-{index:05d}.worker.json"


def heartbeat_path(call_dir: Path, index: int) -> Path:
    return dispatch_dir(call_dir) / f"shard-{index:05d}.heartbeat"


def read_worker(call_dir: Path, index: int) -> dict[str, Any] | None:
    try:
        return json.loads(worker_path(call_dir, index).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_heartbeat(call_dir: Path, index: int) -> dict[str, Any] | None:
    """The shard's last heartbeat (host, pid, attempt, beat counter), or None before the first."""
    try:
        return json.loads(heartbeat_path(call_dir, index).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class Heartbeat:
    """A thread that rewrites the shard's heartbeat file every `every_s` seconds with a growing
    counter. The round compares counters on its own clock (no clock agreement between machines),
    and a worker killed with -9 stops the counter: that is how a lost shard is told from a slow one."""

    def __init__(self, call_dir: Path, index: int, every_s: float, attempt: str = ""):
        self.path = heartbeat_path(call_dir, index)
        self.every_s = every_s
        self.info = {**worker_identity(), "attempt": attempt, "beat": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{index}", daemon=True)

    def _beat(self) -> None:
        self.info["beat"] += 1
        try:
            parquet_io.write_json_atomic(self.info, self.path)
        except OSError as err:  # a full or flaky shared disk: the round will decide, not this thread
            log.warning("heartbeat %s: %s", self.path, err)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._beat()

    def __enter__(self) -> Heartbeat:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every_s + 5)
