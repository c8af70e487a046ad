"""Throughput of the vllm backend against raw `LLM.generate`: same prompts, same engine.

One engine (one `stillhouse.tasks.backends.vllm_worker` process of the vLLM venv) serves both paths, so the engine
settings, its process placement and its warm state are the same for both:

- ours: `VLLMBackend.sample()` timed in this process: rendering and tokenizing the prompts, the
  Parquet shard files both ways, the JSON-line protocol, the engine pass with shard bookkeeping,
  and building the Completions.
- raw:  `LLM.generate` on the same prompt token ids with the same per-request SamplingParams,
  called inside the worker on that same engine (`VLLMBackend.reference_generate`), timed around
  the call only.

Engine start is excluded from both (the engine is up before the first rep); a short warm-up call
over every prompt runs per path first, so the prefix cache holds the same prompts for both. Reps alternate which path goes first, so drift in machine load hits both
alike. tokens/s = completion tokens / seconds of the call; the median over reps is reported.

Why one engine and not two side by side: on vLLM's CPU build the model runner is pinned to a core
while the engine's other processes float, and two engines' runs differed by up to ~30% from where
the OS happened to put those processes, whichever path ran on them.

    python bench/vllm.py                 # prepared SmolLM2-135M-Instruct (if available), else tiny
    python bench/vllm.py --tiny --eager  # the tiny random Llama, no torch.compile warm-up

The last line is `vllm: ours_tok_s=... raw_tok_s=... ratio=...` (goal: ratio >= 0.95).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pick_model(tiny: bool, work: Path) -> str:
    """The prepared SmolLM2-135M-Instruct (prepared now if the packaged GGUF is installed), else tiny."""
    from stillhouse.tasks.models.prepared import SMOLLM2_NAME
    from stillhouse.tasks.models.resolve import resolve_model
    from stillhouse.tasks.models.tiny import build_tiny_model

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
    ap.add_argument("--eager", action="store_true", help="enforce_eager (skip torch.compile)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="default 0.9 on a GPU, 0.1 on CPU (where it is the share of host memory)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--vllm-python", default=None, help="default: STILLHOUSE_VLLM_PYTHON or .venv-vllm")
    args = ap.parse_args(argv)

    # Stopped with SIGTERM, still stop the engine (the `finally` below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bench.sampling import gsm_questions
    from stillhouse.tasks.backends.base import SampleRequest, SamplingParams, derive_seed
    from stillhouse.tasks.config import PromptsConfig
    from stillhouse.tasks.prompts import solve_messages
    from stillhouse.tasks.backends.vllm import VLLMBackend

    work = Path(tempfile.mkdtemp(prefix="stillhouse-bench-vllm-"))
    model = pick_model(args.tiny, work)
    util = args.gpu_memory_utilization
    if util is None:
        import torch

        util = 0.9 if torch.cuda.is_available() else 0.1

    cfg = PromptsConfig()
    requests = [
        SampleRequest(f"q{i}", j, solve_messages(q, cfg), derive_seed(0, f"q{i}", j))
        for i, q in enumerate(gsm_questions(args.prompts)) for j in range(args.samples)
    ]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)

    t0 = time.perf_counter()
    # cleanup=True: ours deletes its shard files after each call, so every rep really generates.
    backend = VLLMBackend(
        model, work_dir=work, vllm_python=args.vllm_python, cleanup=True, gpu_memory_utilization=util,
        max_model_len=args.max_model_len, engine_args={"enforce_eager": True} if args.eager else {},
    )
    try:
        ready = backend.workers[0].ready
        print(f"model={model} engine up in {time.perf_counter() - t0:.0f}s (worker: {ready['seconds']:.0f}s) "
              f"requests={len(requests)} max_new_tokens={args.max_new_tokens} T={args.temperature} "
              f"top_p={args.top_p} gpu_memory_utilization={util} eager={args.eager} vllm={ready['vllm']}",
              flush=True)

        # Warm-up over every prompt: with prefix caching on, whichever path ran first would
        # otherwise be the one paying for the prompts' prefill.
        warm = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=4)
        backend.sample(requests, warm)
        backend.reference_generate(requests, warm)

        def ours() -> tuple[float, int]:
            t = time.perf_counter()
            out = backend.sample(requests, params)
            return time.perf_counter() - t, sum(c.completion_tokens for c in out)

        def raw() -> tuple[float, int]:
            return backend.reference_generate(requests, params)

        rates: dict[str, list[float]] = {"ours": [], "raw": []}
        tokens: dict[str, set[int]] = {"ours": set(), "raw": set()}
        for rep in range(args.reps):
            order = (("ours", ours), ("raw", raw))
            for name, fn in order if rep % 2 == 0 else order[::-1]:
                dt, n = fn()
                rates[name].append(n / dt)
                tokens[name].add(n)
                extra = ""
                if name == "ours":
                    gen_s = sum(x["generate_s"] for x in backend.stats.shard_seconds)
                    extra = f" (engine pass {gen_s:.2f}s, rest {dt - gen_s:.2f}s)"
                print(f"  rep {rep} {name:>4}: {n:6d} tokens in {dt:7.2f}s = {n / dt:8.1f} tok/s{extra}", flush=True)
    finally:
        backend.close()
    # Same seeds, same engine, same batch: both paths should write the same completions.
    print(f"  completion tokens per rep: ours={sorted(tokens['ours'])} raw={sorted(tokens['raw'])}")
    o, r = statistics.median(rates["ours"]), statistics.median(rates["raw"])
    print(f"vllm: ours_tok_s={o:.1f} raw_tok_s={r:.1f} ratio={o / r:.3f}")


if __name__ == "__main__":
    main()
