"""The vllm backend's processes: data parallel engines, shard resume after a killed worker, errors.

Two engines (data_parallel_size=2) run on this machine's CPU with no CUDA; the single-engine run
they are compared with is the session's shared backend (conftest `vllm_backend`). Small shards (2 requests) make several
shard files per engine, so a kill can land between shards.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from stillhouse.tasks.backends.base import SampleRequest, SamplingParams, derive_seed
from stillhouse.tasks.config import PromptsConfig
from stillhouse.tasks.prompts import harder_messages, solve_messages
from stillhouse.tasks.backends.vllm import VLLMBackend, VLLMWorkerError, gpu_groups, resolve_vllm_python

pytestmark = pytest.mark.vllm

PROMPTS = PromptsConfig()
QUESTIONS = [
    "Ann has 5 apples. Ben gives her 7 more. How many apples does Ann have now?",
    "Cara has 40 coins and gives away 15 of them. How many coins are left?",
    "Dev buys 3 bags with 4 pens in each. How many pens does Dev have?",
]
T1 = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=40)


def requests(base: int) -> list[SampleRequest]:
    """12 requests: a solve and a harder prompt per question, 2 samples each."""
    out = []
    for q, text in enumerate(QUESTIONS):
        for kind, messages in (("s", solve_messages(text, PROMPTS)), ("h", harder_messages(text, PROMPTS))):
            key = f"{kind}{q}"
            out += [SampleRequest(key, i, messages, derive_seed(base, key, i)) for i in range(2)]
    return out


def outcome(c):
    return (c.key, c.sample_index, c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason)


def shard_files(folder: Path) -> set[Path]:
    return {p for p in folder.glob("*.parquet") if not p.name.endswith(".in.parquet")}


def group_gone(pgid: int, wait_s: float = 10.0) -> bool:
    """True once no live process is left in process group `pgid` (zombies count as gone: who
    reaps orphans depends on the container's init)."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
                alive.append(stat.parent.name)
        if not alive or time.monotonic() > deadline:
            return not alive
        time.sleep(0.2)


@pytest.fixture(scope="module")
def single(vllm_backend):
    return vllm_backend


@pytest.fixture(scope="module")
def dp_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dp")


@pytest.fixture(scope="module")
def dp(vllm_model_dir, vllm_python, vllm_cpu_engine, dp_dir):
    # Each worker waits 2 s between its shards (a test knob of the worker): the kill test can then
    # stop a worker after its first shard and before its second, on any machine load.
    b = VLLMBackend(vllm_model_dir, work_dir=dp_dir, vllm_python=str(vllm_python), data_parallel_size=2,
                    shard_size=2, env={"STILLHOUSE_VLLM_WORKER_PAUSE_S": "2"}, **vllm_cpu_engine)
    yield b
    b.close()


def test_two_engines_give_the_same_completions_as_one(single, dp, dp_dir):
    reqs = requests(base=0)
    expect = single.sample(reqs, T1)
    seen = []
    got = dp.sample(reqs, T1, progress=lambda d, t: seen.append(d))
    assert [outcome(c) for c in got] == [outcome(c) for c in expect]
    assert dp.stats.shards == 6 and dp.stats.generated_shards == 6
    assert set(dp.stats.worker_seconds) == {0, 1}  # both engines worked
    assert seen[-1] == len(reqs)
    # Each engine was given its own GPU group (CUDA_VISIBLE_DEVICES), whatever this machine has.
    groups = gpu_groups(2, 1, os.environ.get("CUDA_VISIBLE_DEVICES"))
    for w, group in zip(dp.workers, groups):
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{w.pid}/environ").read_text().split("\0") if "=" in kv)
        assert env.get("CUDA_VISIBLE_DEVICES") == (group if group is not None else os.environ.get("CUDA_VISIBLE_DEVICES"))
    # A rerun of the same work reads the six shard files and generates nothing.
    again = dp.sample(reqs, T1)
    assert [outcome(c) for c in again] == [outcome(c) for c in expect]
    assert dp.stats.reused_shards == 6 and dp.stats.generated_shards == 0
    assert len(shard_files(dp_dir)) == 6


def test_killed_worker_keeps_finished_shards_and_rerun_makes_the_rest(single, dp, dp_dir):
    reqs = requests(base=1)  # new seeds: nothing of this call is on disk yet
    before = shard_files(dp_dir)
    victim = dp.workers[1]
    killed = []

    # Shards of 2 requests, dealt round-robin: worker 0 gets shards 0, 2, 4 and worker 1 gets
    # 1, 3, 5. Both write their first shard, then pause 2 s; two shards reported written = both
    # first shards are on disk (stats are updated before progress is called), and that is when
    # worker 1 dies.
    def kill_after_first_shards(done: int, total: int) -> None:
        if dp.stats.generated_shards >= 2 and not killed:
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(done)

    with pytest.raises(VLLMWorkerError) as err:
        dp.sample(reqs, T1, progress=kill_after_first_shards)
    msg = str(err.value)
    assert "vllm worker 1" in msg and "died during the job (exit code -9)" in msg and "stderr tail" in msg
    # Kept: the killed worker's finished shard and all three of the surviving worker's.
    kept = shard_files(dp_dir) - before
    assert len(kept) == 4 and dp.stats.generated_shards == 4
    assert "4 of 6 missing shards finished and kept" in msg
    # The killed worker's engine process went with it (its process group is empty).
    assert group_gone(victim.pid)

    out = dp.sample(reqs, T1)  # restarts worker 1, generates only the two missing shards
    assert dp.stats.reused_shards == 4 and dp.stats.generated_shards == 2
    assert dp.workers[1].pid != victim.pid
    assert [outcome(c) for c in out] == [outcome(c) for c in single.sample(reqs, T1)]

    pids = [w.pid for w in dp.workers]
    dp.close()
    assert all(group_gone(pid) for pid in pids)  # close() leaves no engine process behind


def test_worker_that_fails_to_start_raises_with_its_stderr(vllm_model_dir, vllm_python, tmp_path):
    # The tiny model has 2048 positions; vLLM refuses a larger max_model_len while building its
    # config. The number appears in the error only through the worker's stderr.
    with pytest.raises(VLLMWorkerError) as err:
        VLLMBackend(vllm_model_dir, work_dir=tmp_path, vllm_python=str(vllm_python),
                    max_model_len=123456, gpu_memory_utilization=0.1)
    msg = str(err.value)
    assert "vllm worker 0" in msg and "before its engine was ready" in msg
    assert "123456" in msg.split("stderr tail:", 1)[1]
    assert list((tmp_path / "logs").glob("worker-0-*.log"))  # the log is kept for a look


def test_interpreter_resolution_names_the_field(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"student\.model\.vllm_python = '/nope/python'"):
        resolve_vllm_python("/nope/python", "student.model.vllm_python")
    monkeypatch.setenv("STILLHOUSE_VLLM_PYTHON", str(tmp_path / "python"))
    with pytest.raises(FileNotFoundError, match=r"\$STILLHOUSE_VLLM_PYTHON"):
        resolve_vllm_python(None)


def test_gpu_groups():
    assert gpu_groups(2, 2, "4,5,6,7") == ["4,5", "6,7"]
    assert gpu_groups(3, 1, None) == ["0", "1", "2"]
    assert gpu_groups(2, 1, "") == [None, None]  # explicitly no GPUs: leave the CPU build alone
    with pytest.raises(ValueError, match=r"data_parallel_size=2 x tensor_parallel_size=2 needs 4 GPUs"):
        gpu_groups(2, 2, "0,1,2")
