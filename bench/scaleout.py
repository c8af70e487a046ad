"""Scale-out: the same sampling call in process, on a pool with one worker, and with two, in one run.

A real `prefect server start` on loopback, a process pool with the shard deployment
(deployment/prefect.yaml, 'gpu-shard'), and process workers with `--limit 1` (one shard at a time,
as a box with one GPU). The workload is one teacher call of `--shards` x `--shard-size` requests
(tiny-tutor, hf backend, sampled), run three times into fresh caches:

    in process    ResumableBackend.sample with no dispatcher (model loaded once)
    1 worker      every shard a flow run, one worker
    2 workers     the same with a second worker started

and checked to give the same completions. Per-shard overhead = (1-worker wall - in-process wall) /
shards: flow-run submission, the worker's poll, a fresh process (pull step, imports), loading the
model again, the round's polling and the merge. The overhead model then says which share of a round's
wall time goes to coordination with N workers:

    wall(N) = G / N + ceil(S / N) * o        coordination share = ceil(S / N) * o / wall(N)

for a round of G seconds of in-process generation cut into S shards. This machine has 2 CPU cores
shared with other work: the two workers compete for the same cores as the models, so 2 workers
cannot be 2x here; on N GPU boxes the G / N term is real.

    .venv/bin/python bench/scaleout.py                  # 8 shards of 16 requests (~4 min)
    .venv/bin/python bench/scaleout.py --shards 4       # quicker

Last line: `scaleout: speedup=<1 worker / 2 workers> overhead_s=<per shard> ...`.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# This process's log lines stay on the console: shipped to the API they would be flushed at exit,
# after the server is gone, and print an error after the result line.
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.server.harness import PREFECT_FILE, Procs, child_env, free_port, wait_healthy  # noqa: E402

PREFECT = [sys.executable, "-m", "prefect", "--no-prompt"]


def _requests(n: int):
    from stillhouse.tasks.backends.base import SampleRequest, derive_seed

    return [SampleRequest(f"q{k}", 0, ({"role": "user", "content": f"Tom has {k % 9 + 2} apples and buys "
                                        f"{k % 7 + 1} more. How many apples does he have?"},),
                          derive_seed(0, f"q{k}", 0)) for k in range(n)]


def _call(cache: Path, n: int, shard_size: int, dispatcher=None):
    """One teacher call; returns (completions, wall seconds)."""
    from stillhouse.tasks.backends import dispatch
    from stillhouse.tasks.backends.base import SamplingParams
    from stillhouse.tasks.backends.open import open_backend
    from stillhouse.tasks.config import ModelConfig

    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=48)
    t0 = time.perf_counter()
    with dispatch.sharding(dispatch.Sharding(shard_size=shard_size, dispatch=dispatcher)):
        with open_backend(ModelConfig(name_or_path="tiny-tutor"), cache, step="teacher", batch_size=4) as b:
            out = b.sample(_requests(n), params)
    return [(c.key, c.text) for c in out], time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--round-hours", type=float, default=1.0,
                    help="in-process generation time G of the modelled round (hours)")
    args = ap.parse_args(argv)
    n = args.shards * args.shard_size

    tmp = Path(tempfile.mkdtemp(prefix="stillhouse-scaleout-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    models = Path(os.environ.get("STILLHOUSE_MODELS_DIR", Path.home() / ".cache" / "stillhouse" / "models"))
    env = child_env(tmp / "prefect-home", models, url)
    procs = Procs(tmp / "logs", env)
    os.environ.update({"PREFECT_API_URL": url, "PREFECT_HOME": str(tmp / "prefect-home"),
                       "STILLHOUSE_MODELS_DIR": str(models), "OMP_NUM_THREADS": "1"})
    try:
        wait_healthy(url, procs.start("server", [*PREFECT, "server", "start", "--host", "127.0.0.1",
                                                 "--port", str(port)]))
        procs.run(*PREFECT, "work-pool", "create", "gpu", "--type", "process")
        procs.run(*PREFECT, "deploy", "--prefect-file", str(PREFECT_FILE), "--name", "gpu-shard", "--pool", "gpu")

        from prefect import flow

        from stillhouse.flows.shards import PoolDispatcher
        from stillhouse.tasks.config import ExecutionConfig

        ex = ExecutionConfig(work_pool="gpu", heartbeat_s=2, lost_after_s=60, poll_s=0.5)

        @flow(name="bench-scaleout")
        def pooled(cache: str) -> tuple[list, float]:
            return _call(Path(cache), n, args.shard_size, PoolDispatcher(ex, "bench", 0, "sample"))

        local, t_in = _call(tmp / "in-process", n, args.shard_size)
        walls = {}
        for workers in (1, 2):
            procs.start(f"worker-{workers}", [*PREFECT, "worker", "start", "--pool", "gpu", "--type", "process",
                                              "--name", f"box-{workers}", "--limit", "1"])
            got, walls[workers] = pooled(str(tmp / f"workers-{workers}"))
            assert got == local, f"{workers} worker(s): completions differ from the in-process call"
            print(f"{workers} worker(s): {walls[workers]:.1f} s for {args.shards} shards", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    o = max((walls[1] - t_in) / args.shards, 0.0)
    speedup = walls[1] / walls[2]
    print(f"in process: {t_in:.1f} s ({n} requests, model loaded once)")
    print(f"per-shard overhead o = (1-worker wall - in-process wall) / shards = {o:.1f} s "
          "(submission, worker poll, process start, model load, polling, merge)")
    g = args.round_hours * 3600
    for workers in (8, 64):
        for shards in (workers, 4 * workers):
            wall = g / workers + math.ceil(shards / workers) * o
            share = math.ceil(shards / workers) * o / wall
            print(f"model: G={args.round_hours:g} h, {workers} workers, {shards} shards: wall {wall:.0f} s, "
                  f"coordination {share:.1%}")
    print("note: 2 shared CPU cores here; the workers and their models compete for them")
    print(f"scaleout: speedup={speedup:.2f} overhead_s={o:.1f} in_process_s={t_in:.1f} "
          f"one_worker_s={walls[1]:.1f} two_workers_s={walls[2]:.1f} shards={args.shards}")


if __name__ == "__main__":
    main()
