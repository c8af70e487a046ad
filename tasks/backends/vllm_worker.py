"""The vLLM side of the `vllm` backend: runs inside the vLLM environment (.venv-vllm).

This module may import only the standard library, pyarrow and vllm: the vLLM environment has no
Prefect, no pydantic config and none of Stillhouse's other modules' dependencies (vLLM's pins clash
with Prefect's, which is why it lives in its own venv at all). Start it from the repository root:

    .venv-vllm/bin/python -m tasks.backends.vllm_worker --engine '{"model": "..."}' --input in.parquet --output out.parquet
    .venv-vllm/bin/python -m tasks.backends.vllm_worker --engine '{...}' --serve

Input Parquet, one row per prompt (sampling parameters per row, so one file can mix them):

    prompt_token_ids list<int32>   the prompt, already rendered and tokenized by the driver
    n                int32         completions for this prompt (child i of a seeded row uses seed + i)
    seed             int64 (null)  per-row seed; null = unseeded
    temperature, top_p  float64    0 temperature = greedy
    max_tokens       int32
    stop             list<string>  stop strings (cut from the text)
    stop_token_ids   list<int32>   tokens that end a completion (counted, not shown)

Output Parquet, one row per completion, written atomically (tmp file + os.replace):

    row, sample      int32         input row and index among its n completions
    text             string
    token_ids        list<int32>   generated tokens, the EOS/stop token included when one ended it
    prompt_tokens, completion_tokens  int32
    finish_reason    string        "stop" (EOS, stop token or stop string) or "length"

`--serve` keeps one engine loaded and takes jobs as JSON lines on stdin:

    {"cmd": "generate", "job": "<id echoed in its events>",
     "shards": [{"input": "a.in.parquet", "output": "a.parquet"}, ...]}
    {"cmd": "reference", "job": "...", "input": "a.in.parquet"}   (bench: plain LLM.generate)
    {"cmd": "shutdown"}

and answers with JSON lines on its protocol channel (the original stdout): {"event": "ready"} once
the engine is up, then per job "progress", "shard_done" (after the shard's file is in place) and
"job_done", or "error". Everything else the process prints (vLLM logs to stdout) is moved to stderr
before vLLM is imported, so nothing can interleave with the protocol. Shards run one after another
with one generate pass each, so a shard's file exists before the next shard starts: a killed worker
loses only the shard it was on.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback

INPUT_COLUMNS = ("prompt_token_ids", "n", "seed", "temperature", "top_p", "max_tokens", "stop", "stop_token_ids")
# vLLM accepts only these LoRA ranks for max_lora_rank (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
PROGRESS_EVERY_S = 1.0
# Tests only: seconds to wait between a job's shards, so that a test can kill a worker at a known
# point (after its first shard, before its second) instead of racing a fast engine.
PAUSE_S = float(os.environ.get("STILLHOUSE_VLLM_WORKER_PAUSE_S") or 0)


class JobError(Exception):
    """A job failed but the engine is fine: report it and take the next job."""


def _output_schema():
    import pyarrow as pa

    return pa.schema([
        ("row", pa.int32()),
        ("sample", pa.int32()),
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),
    ])


def write_atomic(table, path: str) -> None:
    """Write `table` so that `path` is either absent or complete (same folder, then os.replace)."""
    import pyarrow.parquet as pq

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_rows(path: str) -> list[dict]:
    """The input rows, checked column by column so a bad file names its column and row."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in INPUT_COLUMNS if c not in table.column_names]
    if missing:
        raise JobError(f"{path}: missing input column(s) {missing}; expected {list(INPUT_COLUMNS)}")
    rows = table.select(list(INPUT_COLUMNS)).to_pylist()
    for i, r in enumerate(rows):
        if not r["prompt_token_ids"]:
            raise JobError(f"{path} row {i}: prompt_token_ids is empty")
        if r["n"] is None or r["n"] < 1:
            raise JobError(f"{path} row {i}: n must be >= 1, got {r['n']}")
        if r["max_tokens"] is None or r["max_tokens"] < 1:
            raise JobError(f"{path} row {i}: max_tokens must be >= 1, got {r['max_tokens']}")
    return rows


# --------------------------------------------------------------------------- engine


def lora_rank(adapter_path: str) -> int:
    """The adapter's rank from adapter_config.json, rounded up to a rank vLLM accepts."""
    cfg_path = os.path.join(adapter_path, "adapter_config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except OSError as err:
        raise SystemExit(f"adapter_path {adapter_path!r}: cannot read adapter_config.json ({err})") from None
    ranks = [int(cfg.get("r") or 0), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())]
    r = max(ranks)
    if r < 1:
        raise SystemExit(f"{cfg_path}: field r is missing or < 1")
    for allowed in LORA_RANKS:
        if r <= allowed:
            return allowed
    raise SystemExit(f"{cfg_path}: rank {r} is above vLLM's largest max_lora_rank {LORA_RANKS[-1]}")


def build_engine(spec: dict):
    """vllm.LLM from the driver's engine spec, plus the LoRARequest every prompt uses (or None)."""
    from vllm import LLM
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    dtype = spec.get("dtype", "auto")
    if dtype == "auto":
        # Stillhouse's "auto" (the hf backend's rule): bfloat16 on GPUs, float32 on CPU. vLLM's own
        # "auto" would take the checkpoint's dtype, i.e. float32 on a GPU for float32 checkpoints.
        dtype = "float32" if on_cpu else "bfloat16"
    dp_size, dp_rank = int(spec.get("dp_size", 1)), int(spec.get("dp_rank", 0))
    if on_cpu and dp_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # vLLM CPU binds its OpenMP threads to the same cores in every engine; give each data
        # parallel engine its own share of this process's cores instead.
        cores = sorted(os.sched_getaffinity(0))
        share = cores[dp_rank::dp_size] or cores
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in share)

    kwargs = dict(
        model=spec["model"],
        tokenizer=spec.get("tokenizer") or spec["model"],
        revision=spec.get("revision"),
        dtype=dtype,
        tensor_parallel_size=int(spec.get("tensor_parallel_size", 1)),
        gpu_memory_utilization=float(spec.get("gpu_memory_utilization", 0.9)),
        max_model_len=spec.get("max_model_len"),
        enable_prefix_caching=bool(spec.get("enable_prefix_caching", True)),
        seed=int(spec.get("seed", 0)),
    )
    if on_cpu:
        # With chunked prefill, a prompt split over two steps gets its first step's sampled token
        # discarded, and vLLM rewinds that request's seeded generator with set_offset, which only
        # CUDA generators have: on CPU the engine dies ("CPU Generator does not use offset") as
        # soon as a step's token budget cuts a seeded prompt. Unchunked, vLLM raises the budget to
        # max_model_len and schedules every prompt whole. (vLLM's CPU platform does the same for
        # MLA models.) engine_args can still turn it back on.
        kwargs["enable_chunked_prefill"] = False
    lora = None
    adapter = spec.get("adapter_path")
    if adapter:
        from vllm.lora.request import LoRARequest

        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank(adapter))
        lora = LoRARequest("stillhouse-adapter", 1, adapter)
    kwargs.update(spec.get("engine_args") or {})
    llm = LLM(**kwargs)
    return llm, lora


def sampling_params(row: dict):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=int(row["n"]),
        seed=row["seed"],
        temperature=float(row["temperature"]),
        top_p=float(row["top_p"]),
        # Explicitly off, whatever the model's generation_config suggests: the hf backend applies
        # exactly temperature and top-p, nothing else.
        top_k=0,
        min_p=0.0,
        repetition_penalty=1.0,
        max_tokens=int(row["max_tokens"]),
        stop=list(row["stop"] or []) or None,
        stop_token_ids=list(row["stop_token_ids"] or []) or None,
        skip_special_tokens=True,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def generate_shard(llm, lora, rows: list[dict], on_progress=None):
    """Run one shard through the engine: the same enqueue + step loop LLM.generate runs, plus
    throttled progress. Returns the output table."""
    import pyarrow as pa
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(r["prompt_token_ids"])) for r in rows]
    params = [sampling_params(r) for r in rows]
    try:
        ids = llm.enqueue(prompts, params, lora_request=lora, use_tqdm=False)
    except Exception as err:  # validation (prompt too long, bad parameter): the engine is intact
        raise JobError(f"vLLM refused the shard's requests: {type(err).__name__}: {err}") from err
    # Outputs carry the id the LLM gave the request; enqueue returns it with vLLM's internal
    # random suffix ("7-1a2b3c4d"), so map both spellings to the row.
    row_of: dict[str, int] = {}
    for i, rid in enumerate(ids):
        row_of[rid] = i
        row_of[rid.rsplit("-", 1)[0]] = i
    engine = llm.llm_engine
    results: dict[int, object] = {}
    total = sum(int(r["n"]) for r in rows)
    done, last = 0, time.monotonic()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if not out.finished:
                continue
            i = row_of.get(out.request_id)
            if i is None:
                raise RuntimeError(f"vLLM returned an output for unknown request id {out.request_id!r}")
            results[i] = out
            done += len(out.outputs)
        now = time.monotonic()
        if on_progress is not None and now - last >= PROGRESS_EVERY_S:
            on_progress(done, total)
            last = now
    missing = [i for i in range(len(rows)) if i not in results]
    if missing:
        raise RuntimeError(f"vLLM finished without outputs for rows {missing[:10]}")

    cols: dict[str, list] = {name: [] for name in _output_schema().names}
    for i in range(len(rows)):
        out = results[i]
        samples = sorted(out.outputs, key=lambda c: c.index)
        if len(samples) != rows[i]["n"]:
            raise RuntimeError(f"row {i}: asked for n={rows[i]['n']} completions, got {len(samples)}")
        for s in samples:
            if s.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"row {i} sample {s.index}: finish_reason {s.finish_reason!r}")
            cols["row"].append(i)
            cols["sample"].append(s.index)
            cols["text"].append(s.text)
            cols["token_ids"].append(list(s.token_ids))
            cols["prompt_tokens"].append(len(out.prompt_token_ids))
            cols["completion_tokens"].append(len(s.token_ids))
            cols["finish_reason"].append(s.finish_reason)
    return pa.table(cols, schema=_output_schema())


# --------------------------------------------------------------------------- modes


class Channel:
    """JSON lines on a private duplicate of the original stdout (fd 1 itself goes to stderr)."""

    def __init__(self):
        self._file = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self._lock = threading.Lock()

    def send(self, **event) -> None:
        with self._lock:
            self._file.write(json.dumps(event) + "\n")
            self._file.flush()


def watch_parent(parent: int) -> None:
    """End this worker (and the engine processes it started) when the driver is gone.

    A driver killed without close() would otherwise leave an engine holding GPU memory. Polled
    rather than PR_SET_PDEATHSIG: that signal fires when the parent *thread* ends, and the driver
    may start workers from a short-lived thread (Prefect runs tasks in worker threads).
    """
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            if os.getpgrp() == os.getpid():  # our own process group: the driver started a session
                os.killpg(os.getpid(), signal.SIGKILL)
            os._exit(1)


def serve(spec: dict, channel: Channel, parent: int) -> int:
    threading.Thread(target=watch_parent, args=(parent,), daemon=True).start()
    t0 = time.monotonic()
    llm, lora = build_engine(spec)
    import vllm

    channel.send(
        event="ready", pid=os.getpid(), seconds=round(time.monotonic() - t0, 3),
        vllm=vllm.__version__, max_model_len=llm.llm_engine.model_config.max_model_len,
    )
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            channel.send(event="error", message=f"not a JSON line: {line[:200]!r}", fatal=False)
            continue
        cmd = msg.get("cmd")
        if cmd == "shutdown":
            channel.send(event="bye")
            return 0
        if cmd == "reference":
            # bench/vllm.py's yardstick: the same input rows through plain LLM.generate on this
            # very engine (no shard bookkeeping, no output file), timed around the call only.
            try:
                rows = read_rows(msg["input"])
            except JobError as err:
                channel.send(event="error", job=msg.get("job"), message=str(err), fatal=False)
                continue
            from vllm.inputs import TokensPrompt

            prompts = [TokensPrompt(prompt_token_ids=list(r["prompt_token_ids"])) for r in rows]
            params = [sampling_params(r) for r in rows]
            t = time.perf_counter()
            outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
            seconds = time.perf_counter() - t
            channel.send(event="reference_done", job=msg.get("job"), seconds=seconds,
                         completion_tokens=sum(len(c.token_ids) for o in outs for c in o.outputs))
            continue
        if cmd != "generate":
            channel.send(event="error", message=f"unknown cmd {cmd!r}", fatal=False)
            continue
        job = msg.get("job")
        t_job = time.monotonic()
        tokens = 0
        try:
            for k, shard in enumerate(msg["shards"]):
                if k and PAUSE_S:
                    time.sleep(PAUSE_S)
                t_read = time.monotonic()
                rows = read_rows(shard["input"])

                def progress(done: int, total: int, out=shard["output"]) -> None:
                    channel.send(event="progress", job=job, output=out, done=done, total=total)

                t_gen = time.monotonic()
                table = generate_shard(llm, lora, rows, progress)
                t_write = time.monotonic()
                write_atomic(table, shard["output"])
                n_tok = sum(table.column("completion_tokens").to_pylist())
                tokens += n_tok
                channel.send(event="shard_done", job=job, output=shard["output"], rows=table.num_rows,
                             completion_tokens=n_tok, read_s=round(t_gen - t_read, 4),
                             generate_s=round(t_write - t_gen, 4), write_s=round(time.monotonic() - t_write, 4))
        except JobError as err:
            channel.send(event="error", job=job, message=str(err), fatal=False)
            continue
        except Exception as err:
            # Anything else may have left the engine in a bad state: report, then exit so the
            # driver starts a fresh worker for the next job.
            channel.send(event="error", job=job, message=f"{type(err).__name__}: {err}",
                         traceback=traceback.format_exc(), fatal=True)
            return 1
        channel.send(event="job_done", job=job, completion_tokens=tokens, seconds=round(time.monotonic() - t_job, 3))
    return 0  # stdin closed: the driver is gone or done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="vLLM worker of Stillhouse's vllm backend")
    ap.add_argument("--engine", required=True, help="engine spec as JSON (model, dtype, ...)")
    ap.add_argument("--serve", action="store_true", help="persistent: jobs as JSON lines on stdin")
    ap.add_argument("--input", help="one-shot: input Parquet")
    ap.add_argument("--output", help="one-shot: output Parquet")
    args = ap.parse_args(argv)
    spec = json.loads(args.engine)
    if "model" not in spec:
        ap.error("--engine needs a 'model'")
    if args.serve:
        parent = os.getppid()
        channel = Channel()
        try:
            return serve(spec, channel, parent)
        except SystemExit as err:  # our own clear messages (bad adapter config)
            print(err, file=sys.stderr)
            return 2
    if not (args.input and args.output):
        ap.error("give --serve, or both --input and --output")
    rows = read_rows(args.input)
    llm, lora = build_engine(spec)
    write_atomic(generate_shard(llm, lora, rows), args.output)
    return 0


if __name__ == "__main__":
    # The guard matters: vLLM starts its engine core with multiprocessing, which re-imports __main__.
    sys.exit(main())
