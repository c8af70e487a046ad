"""Throughput of the vllm backend against raw `LLM.generate`: same prompts, same engine settings.

Two engines run side by side, both started from the vLLM venv's interpreter:

- ours: VLLMBackend (driver in this process, engine in its `tasks.vllm_worker` process). Timed is
  one `sample()` call: rendering and tokenizing the prompts, the Parquet files both ways, the JSON
  line protocol, the engine, and building the Completions.
- raw:  this file run by the vLLM interpreter with `--raw`: the engine is built from the very same
  spec (tasks.vllm_worker.build_engine, so LLM(...) gets identical arguments) and timed is one
  `LLM.generate` call on the same prompt token ids with the same per-request SamplingParams.

Engine start is excluded from both (timing starts once both engines are up); a short warm-up call
runs on each first. Reps alternate which path goes first, so drift in machine load hits both alike.
tokens/s = completion tokens / seconds of the call, the median over reps.

    python bench/vllm.py                 # prepared SmolLM2-135M-Instruct (if available), else tiny
    python bench/vllm.py --tiny --eager  # the tiny random Llama, no torch.compile warm-up

The last line is `vllm: ours_tok_s=... raw_tok_s=... ratio=...` (goal: ratio >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path, and this file is named vllm.py:
# drop the folder, or `import vllm` (in --raw mode) would import this file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- raw (vLLM venv)


def raw_main(engine: str, input_path: str) -> int:
    """The raw path, run by the vLLM interpreter: LLM.generate on the driver's rows, on command."""
    import threading

    from tasks.vllm_worker import Channel, build_engine, read_rows, sampling_params, watch_parent

    channel = Channel()  # vLLM logs go to stderr, our replies to the original stdout
    # Like the backend's workers: go (with the engine) when the bench process is killed.
    threading.Thread(target=watch_parent, args=(os.getppid(),), daemon=True).start()
    llm, lora = build_engine(json.loads(engine))
    from vllm.inputs import TokensPrompt

    rows = read_rows(input_path)
    channel.send(event="ready")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "stop":
            break
        part = rows[: cmd.get("limit") or len(rows)]
        prompts = [TokensPrompt(prompt_token_ids=list(r["prompt_token_ids"])) for r in part]
        params = [sampling_params({**r, "max_tokens": cmd.get("max_tokens") or r["max_tokens"]}) for r in part]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        dt = time.perf_counter() - t
        channel.send(event="done", seconds=dt, tokens=sum(len(c.token_ids) for o in outs for c in o.outputs))
    return 0


class RawEngine:
    """The raw engine's process (its own session: the engine core it starts goes with it)."""

    def __init__(self, python: str, spec: dict, input_path: Path, log_path: Path):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PYTHONPATH"] = str(ROOT)
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [python, str(Path(__file__).resolve()), "--raw", "--engine", json.dumps(spec),
                 "--input", str(input_path)],
                cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                start_new_session=True,
            )

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"raw engine exited ({self.proc.wait()}); log {self.log_path}:\n{tail}")
        return json.loads(line)

    def wait_ready(self) -> None:
        assert self._reply()["event"] == "ready"

    def run(self, limit: int | None = None, max_tokens: int | None = None) -> tuple[float, int]:
        self.proc.stdin.write(json.dumps({"cmd": "run", "limit": limit, "max_tokens": max_tokens}).encode() + b"\n")
        self.proc.stdin.flush()
        r = self._reply()
        return r["seconds"], r["tokens"]

    def close(self) -> None:
        import signal

        try:
            self.proc.stdin.write(b'{"cmd": "stop"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:  # the engine core it started, if still there
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


# --------------------------------------------------------------------------- driver (main venv)


def pick_model(tiny: bool, work: Path) -> str:
    """The prepared SmolLM2-135M-Instruct (prepared now if the packaged GGUF is installed), else tiny."""
    from tasks.models import SMOLLM2_NAME, build_tiny_model, resolve_model

    if not tiny:
        try:
            return resolve_model(SMOLLM2_NAME)
        except (FileNotFoundError, ImportError) as err:
            print(f"SmolLM2 not available ({err}); using the tiny model", flush=True)
    return str(build_tiny_model(work / "tiny-llama"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny random Llama instead of SmolLM2")
    ap.add_argument("--prompts", type=int, default=32, help="GSM-style questions")
    ap.add_argument("--samples", type=int, default=4, help="samples per question (own seeds)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (skip torch.compile) on both")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="per engine; default 0.4 on a GPU (two engines share it), 0.1 on CPU "
                    "(where it is the share of host memory)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--vllm-python", default=None, help="default: STILLHOUSE_VLLM_PYTHON or .venv-vllm")
    # Raw mode (internal: this file re-run by the vLLM interpreter).
    ap.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.raw:
        sys.exit(raw_main(args.engine, args.input))

    import signal

    # Stopped with SIGTERM, still stop both engines (the `finally` below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bench.sampling import gsm_questions
    from storage.parquet_io import write_parquet_atomic
    from tasks.backend import SampleRequest, SamplingParams, derive_seed
    from tasks.config import PromptsConfig
    from tasks.prompts import solve_messages
    from tasks.vllm_backend import VLLMBackend, resolve_vllm_python

    work = Path(tempfile.mkdtemp(prefix="stillhouse-bench-vllm-"))
    python = resolve_vllm_python(args.vllm_python, "--vllm-python")
    model = pick_model(args.tiny, work)
    util = args.gpu_memory_utilization
    if util is None:
        import torch

        util = 0.4 if torch.cuda.is_available() else 0.1
    engine = {"gpu_memory_utilization": util, "max_model_len": args.max_model_len,
              "engine_args": {"enforce_eager": True} if args.eager else {}}

    cfg = PromptsConfig()
    requests = [
        SampleRequest(f"q{i}", j, solve_messages(q, cfg), derive_seed(0, f"q{i}", j))
        for i, q in enumerate(gsm_questions(args.prompts)) for j in range(args.samples)
    ]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)

    t0 = time.perf_counter()
    raw: RawEngine | None = None
    ours: VLLMBackend | None = None
    try:
        # ours cleans its shard files after each call, so every rep really generates. It starts
        # first: the raw engine takes ours' exact engine spec and ours' tokenized prompts.
        ours = VLLMBackend(model, work_dir=work / "ours", vllm_python=python, cleanup=True, **engine)
        prompts = [ours.encode(r.messages) for r in requests]
        input_path = work / "raw.in.parquet"
        write_parquet_atomic(ours.shard_table(prompts, requests, params, ours.stops(params)), input_path)
        raw = RawEngine(python, {**ours.spec, "dp_rank": 0}, input_path, work / "raw.log")
        raw.wait_ready()
        print(f"model={model} engines up in {time.perf_counter() - t0:.0f}s (ours worker: "
              f"{ours.workers[0].ready['seconds']:.0f}s) requests={len(requests)} "
              f"max_new_tokens={args.max_new_tokens} T={args.temperature} top_p={args.top_p} "
              f"gpu_memory_utilization={util} eager={args.eager} vllm={ours.workers[0].ready['vllm']}", flush=True)

        warm = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=8)
        ours.sample(requests[:8], warm)
        raw.run(limit=8, max_tokens=8)

        def run_ours() -> tuple[float, int]:
            t = time.perf_counter()
            out = ours.sample(requests, params)
            return time.perf_counter() - t, sum(c.completion_tokens for c in out)

        rates: dict[str, list[float]] = {"ours": [], "raw": []}
        tokens: dict[str, set[int]] = {"ours": set(), "raw": set()}
        for rep in range(args.reps):
            order = (("ours", run_ours), ("raw", raw.run))
            for name, fn in order if rep % 2 == 0 else order[::-1]:
                dt, n = fn()
                rates[name].append(n / dt)
                tokens[name].add(n)
                extra = ""
                if name == "ours":
                    job_s = max(ours.stats.worker_seconds.values())
                    gen_s = sum(x["generate_s"] for x in ours.stats.shard_seconds)
                    extra = (f" (engine pass {gen_s:.2f}s, worker job {job_s:.2f}s, "
                             f"driver+IPC {dt - job_s:.2f}s)")
                print(f"  rep {rep} {name:>4}: {n:6d} tokens in {dt:7.2f}s = {n / dt:8.1f} tok/s{extra}", flush=True)
    finally:
        if raw is not None:
            raw.close()
        if ours is not None:
            ours.close()
    # Same seeds, same engine settings, same batch: both paths should write the same completions.
    print(f"  completion tokens per rep: ours={sorted(tokens['ours'])} raw={sorted(tokens['raw'])}")
    o, r = statistics.median(rates["ours"]), statistics.median(rates["raw"])
    print(f"vllm: ours_tok_s={o:.1f} raw_tok_s={r:.1f} ratio={o / r:.3f}")


if __name__ == "__main__":
    main()
