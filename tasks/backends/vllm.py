"""The `vllm` backend: vLLM's offline engine in worker processes of the vLLM environment.

Why worker processes in another interpreter
-------------------------------------------
vLLM's pins (fastapi, transformers) clash with Prefect's, so it lives in its own venv
(`.venv-vllm`, see `make .venv-vllm/.installed`), and vLLM does not reliably give GPU memory back
in process. Each engine is a `python -m tasks.backends.vllm_worker --serve` process started once per backend
and kept for every `sample()` call (an engine start takes tens of seconds); `close()` stops it.

What crosses the process boundary
---------------------------------
The driver (this module, in the main venv) renders and tokenizes every prompt exactly as the hf
backend does (same chat template, same `add_special_tokens` rule, same EOS ids, same plain-text stop
string), and hands vLLM token ids, not text: both backends see identical prompt tokens. Requests
travel as Parquet shard files, commands and replies as JSON lines (tasks/vllm_worker.py describes
the format).

Shards, data parallelism, resume
--------------------------------
A call's requests are cut into shards (by default one per engine; `shard_size` makes them smaller).
A shard's output file is named by the content hash of everything that shapes it (model files,
adapter files, dtype, context cap, sampling parameters, prompt ids, seeds), so a rerun of the same
work skips every shard whose file exists: a worker killed mid-call loses only the shard it was on.
With data_parallel_size = D there are D engines, each on its own tensor_parallel_size GPUs
(CUDA_VISIBLE_DEVICES per worker), and the missing shards are dealt out over them. Every request
carries its own seed, so which engine or batch it lands in does not change its text (up to float
differences of the batch shape, which can flip an argmax only at a near-tie).

The student with its LoRA adapter runs through vLLM's LoRARequest (enable_lora, max_lora_rank from
the adapter's adapter_config.json): the adapter is applied unmerged, the results contract is the hf
backend's with adapter_path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import signal
import subprocess
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stillhouse.storage import parquet_io
from stillhouse.tasks.backends.base import Completion, Progress, SampleRequest, SamplingParams
from stillhouse.tasks.prompts import PLAIN_TEXT_STOP, has_chat_template, render_prompt

log = logging.getLogger(__name__)

# The folder that holds `tasks/`: the repository root in a checkout, <site-packages>/stillhouse when
# installed. The worker runs as `python -m tasks.backends.vllm_worker` with only this folder on its
# path: it imports nothing but the standard library, pyarrow and vllm, and `tasks/__init__.py` and
# `tasks/backends/__init__.py` stay empty so that importing it pulls in nothing else.
REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON_ENV = "STILLHOUSE_VLLM_PYTHON"
STDERR_TAIL_CHARS = 4000


class VLLMWorkerError(RuntimeError):
    """A vLLM worker failed to start or died or failed during a job; the message has its stderr tail."""


# --------------------------------------------------------------------------- configuration


def resolve_vllm_python(configured: str | None = None, field_name: str = "teacher.vllm_python") -> str:
    """The vLLM environment's interpreter: the config field, else $STILLHOUSE_VLLM_PYTHON, else
    <repo>/.venv-vllm/bin/python; a clear error naming the field when none exists."""

    def checked(path: str, source: str) -> str:
        p = Path(path).expanduser()
        if not p.is_absolute() and not p.exists():
            p = REPO_ROOT / p  # configs write `.venv-vllm/bin/python`: relative to the repository
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise FileNotFoundError(f"{source} = {path!r}: not an executable Python interpreter")
        # Not resolved: a venv's bin/python is a symlink to the base interpreter, and running the
        # link is what makes Python pick up the venv's site-packages.
        return str(p.absolute())

    if configured:
        return checked(configured, field_name)
    if os.environ.get(PYTHON_ENV):
        return checked(os.environ[PYTHON_ENV], f"${PYTHON_ENV}")
    default = REPO_ROOT / ".venv-vllm" / "bin" / "python"
    if default.is_file():
        return str(default)
    raise FileNotFoundError(
        f"no vLLM environment found: set `{field_name}` in the run config (or ${PYTHON_ENV}) to the "
        f"Python of a venv with vLLM, or create {default.parent.parent} with `make .venv-vllm/.installed`"
    )


def gpu_groups(data_parallel_size: int, tensor_parallel_size: int, visible: str | None) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each engine: engine i gets GPUs [i*tp, (i+1)*tp) of the visible ones.

    visible is the driver's CUDA_VISIBLE_DEVICES: unset means GPUs 0..dp*tp-1; set but empty means
    no GPUs (CPU build), and the workers inherit it unchanged (None).
    """
    need = data_parallel_size * tensor_parallel_size
    if visible is None:
        devices = [str(i) for i in range(need)]
    else:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
        if not devices:
            return [None] * data_parallel_size
        if len(devices) < need:
            raise ValueError(
                f"data_parallel_size={data_parallel_size} x tensor_parallel_size={tensor_parallel_size} "
                f"needs {need} GPUs; CUDA_VISIBLE_DEVICES={visible!r} lists {len(devices)}"
            )
    return [",".join(devices[i * tensor_parallel_size : (i + 1) * tensor_parallel_size])
            for i in range(data_parallel_size)]


def _fingerprint(path: str | None) -> object:
    """What identifies a model or adapter folder's content cheaply: its files' names, sizes and
    mtimes (retraining an adapter into the same folder changes them). Hub ids are their name."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_dir():
        return path
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())


def _tail(path: Path, chars: int = STDERR_TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars))
            return f.read().decode(errors="replace")
    except OSError as err:
        return f"(no stderr: {err})"


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill a worker and the engine processes it started: it leads its own session, and an engine
    core can outlive a worker that died. Only called right after the worker ended or to end it, so
    the group id is still this worker's."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _kill_running(procs: list[subprocess.Popen]) -> None:
    """Finalizer of a backend dropped without close(): end the workers that still run."""
    for p in procs:
        if p.poll() is None:
            _kill_group(p)


# --------------------------------------------------------------------------- workers


@dataclass(eq=False)  # identity: a restarted worker is another worker
class _Worker:
    index: int
    proc: subprocess.Popen
    log_path: Path
    ready: dict | None = None
    exited: int | None = None
    failed: bool = False  # a job on it failed; keep its log

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.exited is None and self.proc.poll() is None


@dataclass(eq=False)
class _Shard:
    index: int
    start: int  # first request of the shard in the call
    size: int
    output: Path
    input: Path
    done: int = 0  # completions reported so far
    finished: bool = False


@dataclass
class CallStats:
    """What the last sample() call did (the tests and the bench read it)."""

    shards: int = 0
    reused_shards: int = 0
    generated_shards: int = 0
    completion_tokens: int = 0
    worker_seconds: dict[int, float] = field(default_factory=dict)  # per engine: its whole job
    # Per generated shard, in the worker: reading its input, the engine pass, writing its output.
    shard_seconds: list[dict[str, float]] = field(default_factory=list)


class VLLMBackend:
    """Backend interface over `data_parallel_size` persistent vLLM worker processes."""

    name = "vllm"

    def __init__(
        self,
        model_path: str | Path,
        *,
        work_dir: str | Path,
        vllm_python: str | None = None,
        python_field: str = "teacher.vllm_python",
        dtype: str = "auto",
        chat_template: str | None = None,
        revision: str | None = None,
        adapter_path: str | Path | None = None,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        engine_args: dict | None = None,
        shard_size: int | None = None,
        cleanup: bool = False,
        models_dir: str | Path | None = None,
        env: dict[str, str] | None = None,
    ):
        """
        work_dir: shard files and worker logs (content-addressed names; safe to share).
        vllm_python: the vLLM venv's interpreter (see resolve_vllm_python); python_field names the
            config field it came from, for error messages.
        engine_args: extra keyword arguments for vllm.LLM (enforce_eager, max_num_seqs, ...).
        shard_size: requests per shard file; None = one shard per engine per call (fastest).
        cleanup: delete a call's shard files once it returned (when a caller caches results itself,
            as open_backend's ResumableBackend does).
        env: extra environment variables for the workers.
        """
        from stillhouse.tasks.models.resolve import load_tokenizer, resolve_model

        if data_parallel_size < 1 or tensor_parallel_size < 1:
            raise ValueError("data_parallel_size and tensor_parallel_size must be >= 1")
        if shard_size is not None and shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.python = resolve_vllm_python(vllm_python, python_field)
        self.model_path = resolve_model(str(model_path), models_dir)
        if Path(self.model_path).is_dir():  # workers run in the repository root, not our cwd
            self.model_path = str(Path(self.model_path).absolute())
        self.adapter_path = None if adapter_path is None else str(Path(adapter_path).absolute())
        if self.adapter_path is not None and not (Path(self.adapter_path) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter_path {self.adapter_path!r}: no adapter_config.json")
        self.work_dir = Path(work_dir)
        self.log_dir = self.work_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.data_parallel_size = data_parallel_size
        self.shard_size = shard_size
        self.cleanup = cleanup
        self.chat_template = chat_template
        self.extra_env = dict(env or {})
        self.stats = CallStats()

        # The prompt side, exactly as HFBackend: same tokenizer, template and EOS ids.
        self.tokenizer = load_tokenizer(self.model_path, revision=revision)
        self.uses_chat_template = has_chat_template(self.tokenizer, chat_template)
        self.eos_ids = self._eos_ids(revision)

        self.spec = {
            "model": self.model_path,
            "revision": revision,
            "dtype": dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "enable_prefix_caching": enable_prefix_caching,
            "adapter_path": self.adapter_path,
            "engine_args": dict(engine_args or {}),
            "dp_size": data_parallel_size,
        }
        # Everything about the engine that can change a completion's text (not TP, DP, memory).
        self._engine_key = {
            "model": self.model_path, "model_files": _fingerprint(self.model_path), "revision": revision,
            "adapter": self.adapter_path, "adapter_files": _fingerprint(self.adapter_path),
            "dtype": dtype, "max_model_len": max_model_len, "engine_args": self.spec["engine_args"],
        }
        self._groups = gpu_groups(data_parallel_size, tensor_parallel_size,
                                  os.environ.get("CUDA_VISIBLE_DEVICES"))
        self._events: queue.Queue = queue.Queue()
        self._workers: list[_Worker | None] = [None] * data_parallel_size
        self._procs: list[subprocess.Popen] = []  # every process started, for the finalizer
        self._finalizer = weakref.finalize(self, _kill_running, self._procs)
        self._ensure_workers(range(data_parallel_size))

    # ------------------------------------------------------------------ prompts

    def _eos_ids(self, revision: str | None) -> list[int]:
        """HFBackend._eos_ids without loading the model: generation_config's eos ids (the model
        config's when there is no generation_config.json, as from_pretrained does) + the tokenizer's."""
        from transformers import AutoConfig, GenerationConfig

        try:
            gen = GenerationConfig.from_pretrained(self.model_path, revision=revision)
        except OSError:
            gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(self.model_path, revision=revision))
        ids: set[int] = set()
        eos = gen.eos_token_id
        for x in [eos] if isinstance(eos, int) else list(eos or []):
            ids.add(int(x))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return sorted(ids)

    def render(self, messages) -> str:
        return render_prompt(self.tokenizer, messages, self.chat_template)

    def encode(self, messages) -> list[int]:
        # HFBackend.encode: a chat template already writes the special tokens the model expects.
        text = self.render(messages)
        return self.tokenizer(text, add_special_tokens=not self.uses_chat_template)["input_ids"]

    # ------------------------------------------------------------------ workers

    @property
    def workers(self) -> list[_Worker | None]:
        return list(self._workers)

    @property
    def max_model_len(self) -> int | None:
        ready = [w.ready for w in self._workers if w is not None and w.ready]
        return ready[0]["max_model_len"] if ready else None

    def _worker_env(self, index: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        # Only the repository on the path: the main venv's packages must not leak into vLLM's.
        env["PYTHONPATH"] = str(REPO_ROOT)
        env["PYTHONUNBUFFERED"] = "1"
        if self._groups[index] is not None:
            env["CUDA_VISIBLE_DEVICES"] = self._groups[index]
        env.update(self.extra_env)
        return env

    def _spawn(self, index: int) -> _Worker:
        spec = {**self.spec, "dp_rank": index}
        log_path = self.log_dir / f"worker-{index}-{os.getpid()}-{uuid.uuid4().hex[:8]}.log"
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                [self.python, "-m", "tasks.backends.vllm_worker", "--serve", "--engine", json.dumps(spec)],
                cwd=REPO_ROOT, env=self._worker_env(index), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log_file,
                # Its own process group, so that the engine processes it starts can be ended with it.
                start_new_session=True,
            )
        self._procs.append(proc)
        worker = _Worker(index, proc, log_path)
        threading.Thread(target=self._read_events, args=(worker,), daemon=True,
                         name=f"vllm-worker-{index}-reader").start()
        log.info("vllm worker %d: pid %d, log %s", index, proc.pid, log_path)
        return worker

    def _read_events(self, worker: _Worker) -> None:
        """Forward the worker's JSON lines to the event queue; an 'exit' event when it ends."""
        assert worker.proc.stdout is not None
        for raw in worker.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                event = {"event": "noise", "line": raw.decode(errors="replace")[:200]}
            self._events.put((worker, event))
        rc = worker.proc.wait()
        self._events.put((worker, {"event": "exit", "returncode": rc}))

    def _error(self, worker: _Worker, what: str) -> str:
        worker.failed = True
        return (f"vllm worker {worker.index} (pid {worker.pid}, {self.python}) {what}; "
                f"log {worker.log_path}; stderr tail:\n{_tail(worker.log_path)}")

    def _ensure_workers(self, indices) -> None:
        """Start the workers in `indices` that are not running and wait until their engines are up."""
        starting = []
        for i in indices:
            w = self._workers[i]
            if w is None or not w.alive:
                if w is not None:
                    _kill_group(w.proc)  # leftovers of a dead one (its engine core)
                self._workers[i] = self._spawn(i)
                starting.append(self._workers[i])
        errors = []
        while any(w.ready is None and w.exited is None for w in starting):
            worker, event = self._events.get()
            if event["event"] == "exit":
                worker.exited = event["returncode"]
                if worker.ready is None and worker in starting:
                    errors.append(self._error(worker, f"exited with code {worker.exited} before its engine was ready"))
            elif event["event"] == "ready":
                worker.ready = event
                log.info("vllm worker %d ready in %.1f s (vLLM %s)", worker.index, event["seconds"], event["vllm"])
        if errors:
            for w in starting:
                _kill_group(w.proc)
            raise VLLMWorkerError("\n\n".join(errors))

    # ------------------------------------------------------------------ sampling

    def stops(self, params: SamplingParams) -> tuple[str, ...]:
        """The stop strings of a call: the caller's, plus the plain-text fallback's (as hf)."""
        stops = tuple(s for s in params.stop if s)
        if not self.uses_chat_template:
            stops += tuple(s for s in PLAIN_TEXT_STOP if s not in stops)
        return stops

    def shard_table(self, prompts: list[list[int]], requests: list[SampleRequest], params: SamplingParams,
                    stops: tuple[str, ...]) -> pa.Table:
        """The worker's input rows (tasks/vllm_worker.py) for these prompt ids and requests."""
        k = len(prompts)
        return pa.table({
            "prompt_token_ids": pa.array(prompts, pa.list_(pa.int32())),
            "n": pa.array([1] * k, pa.int32()),
            "seed": pa.array([r.seed for r in requests], pa.int64()),
            "temperature": pa.array([float(params.temperature)] * k, pa.float64()),
            "top_p": pa.array([float(params.top_p)] * k, pa.float64()),
            "max_tokens": pa.array([params.max_new_tokens] * k, pa.int32()),
            "stop": pa.array([list(stops)] * k, pa.list_(pa.string())),
            "stop_token_ids": pa.array([self.eos_ids] * k, pa.list_(pa.int32())),
        })

    def sample(
        self,
        requests: list[SampleRequest],
        params: SamplingParams,
        progress: Progress | None = None,
    ) -> list[Completion]:
        self.stats = CallStats()
        total = len(requests)
        if total == 0:
            return []
        stops = self.stops(params)

        # N samples of a problem share their messages: render and tokenize each prompt once.
        by_messages: dict[tuple, list[int]] = {}
        prompts = []
        for r in requests:
            key = tuple(tuple(sorted(m.items())) for m in r.messages)
            if key not in by_messages:
                by_messages[key] = self.encode(r.messages)
            prompts.append(by_messages[key])
        cap = self.max_model_len
        for r, p in zip(requests, prompts):
            if cap is not None and len(p) >= cap:
                raise ValueError(
                    f"request {r.key!r} sample {r.sample_index}: the prompt has {len(p)} tokens, "
                    f"at least the engine's max_model_len {cap} (raise max_model_len or shorten the prompt)"
                )

        size = self.shard_size or math.ceil(total / self.data_parallel_size)
        shards: list[_Shard] = []
        for index, start in enumerate(range(0, total, size)):
            part = requests[start : start + size]
            key = parquet_io.content_hash({
                "engine": self._engine_key, "stops": stops, "eos": self.eos_ids,
                "params": [params.temperature, params.top_p, params.max_new_tokens],
                "rows": [(p, r.seed) for p, r in zip(prompts[start : start + size], part)],
            })[:32]
            shards.append(_Shard(index, start, len(part), self.work_dir / f"{key}.parquet",
                                 self.work_dir / f"{key}.in.parquet"))
        self.stats.shards = len(shards)

        missing = [s for s in shards if not s.output.is_file()]
        for s in shards:
            if s not in missing:
                s.done, s.finished = s.size, True
        self.stats.reused_shards = len(shards) - len(missing)

        def report() -> None:
            if progress is not None:
                progress(min(sum(s.done for s in shards), total), total)

        if missing:
            log.info("vllm: %d of %d shards to generate (%d requests)", len(missing), len(shards),
                     sum(s.size for s in missing))
            for s in missing:
                parquet_io.write_parquet_atomic(
                    self.shard_table(prompts[s.start : s.start + s.size], requests[s.start : s.start + s.size],
                                     params, stops), s.input)
            try:
                self._run(missing, report)
            finally:
                for s in missing:
                    s.input.unlink(missing_ok=True)
        report()

        results: list[Completion] = []
        for s in shards:
            table = pq.read_table(s.output)
            if table.num_rows != s.size:
                raise RuntimeError(f"{s.output}: {table.num_rows} completions for {s.size} requests; delete the file")
            for row in table.select(["row", "text", "prompt_tokens", "completion_tokens", "finish_reason"]).to_pylist():
                r = requests[s.start + row["row"]]
                results.append(Completion(
                    key=r.key, sample_index=r.sample_index, text=row["text"],
                    prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"],
                    finish_reason=row["finish_reason"], extra={"seed": r.seed},
                ))
            self.stats.completion_tokens += sum(table.column("completion_tokens").to_pylist())
        if self.cleanup:
            for s in shards:
                s.output.unlink(missing_ok=True)
        return results

    def _run(self, missing: list[_Shard], report) -> None:
        """Deal the missing shards out over the engines, wait for all of them, raise on failures.

        A worker that dies or fails does not stop the others: their shards finish and are kept.
        """
        D = self.data_parallel_size
        plan = {i: missing[i::D] for i in range(D) if missing[i::D]}
        try:
            self._ensure_workers(plan)
        except VLLMWorkerError as err:
            raise VLLMWorkerError(f"{err}\n(0 of {len(missing)} missing shards generated)") from None
        job = uuid.uuid4().hex
        by_output = {str(s.output): s for s in missing}
        active: set[int] = set()
        errors: list[str] = []
        for i, part in plan.items():
            w = self._workers[i]
            line = json.dumps({"cmd": "generate", "job": job, "shards": [
                {"input": str(s.input), "output": str(s.output)} for s in part]})
            try:
                w.proc.stdin.write(line.encode() + b"\n")
                w.proc.stdin.flush()
                active.add(i)
            except OSError:
                w.exited = w.proc.wait()
                errors.append(self._error(w, f"could not take the job (exited with code {w.exited})"))
        while active:
            worker, event = self._events.get()
            kind = event["event"]
            if kind == "exit":
                worker.exited = event["returncode"]
                if worker.index in active and self._workers[worker.index] is worker:
                    active.discard(worker.index)
                    _kill_group(worker.proc)
                    errors.append(self._error(worker, f"died during the job (exit code {worker.exited})"))
                continue
            if event.get("job") != job:
                continue  # a late event of an earlier call
            if kind == "progress":
                s = by_output.get(event["output"])
                if s is not None and not s.finished:
                    s.done = event["done"]
                    report()
            elif kind == "shard_done":
                s = by_output[event["output"]]
                s.done, s.finished = s.size, True
                self.stats.generated_shards += 1
                self.stats.shard_seconds.append(
                    {k: event.get(k, 0.0) for k in ("read_s", "generate_s", "write_s")})
                report()
            elif kind == "job_done":
                self.stats.worker_seconds[worker.index] = event["seconds"]
                active.discard(worker.index)
            elif kind == "error":
                active.discard(worker.index)
                detail = event.get("traceback") or ""
                errors.append(self._error(worker, f"failed: {event['message']}\n{detail}".rstrip()))
        if errors:
            done = sum(s.finished for s in missing)
            raise VLLMWorkerError(
                "\n\n".join(errors)
                + f"\n({done} of {len(missing)} missing shards finished and kept in {self.work_dir}; "
                "a rerun generates only the rest)"
            )

    def reference_generate(self, requests: list[SampleRequest], params: SamplingParams) -> tuple[float, int]:
        """Benchmark yardstick (bench/vllm.py): the same worker input rows through plain
        `LLM.generate` on engine 0, inside its worker. Returns (seconds of the generate call,
        completion tokens); nothing is written or cached."""
        prompts = [self.encode(r.messages) for r in requests]
        path = self.work_dir / f"reference-{uuid.uuid4().hex}.in.parquet"
        parquet_io.write_parquet_atomic(self.shard_table(prompts, requests, params, self.stops(params)), path)
        self._ensure_workers([0])
        worker, job = self._workers[0], uuid.uuid4().hex
        try:
            worker.proc.stdin.write(json.dumps({"cmd": "reference", "job": job, "input": str(path)}).encode() + b"\n")
            worker.proc.stdin.flush()
            while True:
                w, event = self._events.get()
                if event["event"] == "exit" and w is worker:
                    worker.exited = event["returncode"]
                    raise VLLMWorkerError(self._error(worker, f"died during the reference run ({worker.exited})"))
                if event.get("job") != job:
                    continue
                if event["event"] == "error":
                    raise VLLMWorkerError(self._error(worker, f"failed: {event['message']}"))
                return event["seconds"], event["completion_tokens"]
        finally:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ lifecycle

    def close(self, timeout: float = 60.0) -> None:
        """Stop every worker (asking first, then killing its process group) and free its engine."""
        workers = [w for w in self._workers if w is not None]
        for w in workers:
            if w.alive:
                try:
                    w.proc.stdin.write(b'{"cmd": "shutdown"}\n')
                    w.proc.stdin.close()
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        for w in workers:
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("vllm worker %d did not stop in %.0f s; killing it", w.index, timeout)
            # The engine core may outlive a worker that exited: end the whole group.
            _kill_group(w.proc)
            if w.proc.returncode == 0 and not w.failed:
                w.log_path.unlink(missing_ok=True)
        self._workers = [None] * self.data_parallel_size

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
