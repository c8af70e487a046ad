"""Throughput of HFBackend.sample against raw `model.generate(do_sample=True)`, same batches.

Both paths share one loaded model, the same rendered prompts (GSM-style questions through the
chat template), the same length-sorted batches, batch size, max_new_tokens, temperature and top_p.
The only differences are ours: per-request generators with Gumbel-max sampling, stop handling and
the accounting. Each batch is timed with both paths back to back, alternating which goes first, so
drift in machine load hits both alike. One warm-up batch for each path runs first.

    python bench/sampling.py            # prepared SmolLM2-135M-Instruct in .models/
    python bench/sampling.py --tiny     # the tiny random Llama (seconds)

The last line is `sampling: ours_tok_s=... raw_tok_s=... ratio=...` (goal: ratio >= 0.9).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stillhouse.tasks.backends.base import SampleRequest, SamplingParams, derive_seed  # noqa: E402
from stillhouse.tasks.config import PromptsConfig  # noqa: E402
from stillhouse.tasks.prompts import solve_messages  # noqa: E402


def gsm_questions(n: int, seed: int = 0) -> list[str]:
    """n GSM8K-style two- and three-step word problems of varied length."""
    rng = random.Random(seed)
    names = ["Maya", "Liam", "Noah", "Emma", "Olivia", "Lucas", "Ava", "Ethan"]
    items = ["cupcakes", "stickers", "marbles", "books", "apples", "pencils", "tickets", "shells"]
    forms = [
        "{a} bakes {x} {i} on Monday and {y} more on Tuesday than on Monday. She sells {z} of them. "
        "How many {i} does she have left?",
        "{a} buys {x} packs of {i} with {y} {i} in each pack. {b} gives {a} {z} more {i}. "
        "How many {i} does {a} have now?",
        "{a} has {x} {i}. {a} gives half of them to {b} and then buys {y} more. {b} already had {z} "
        "{i}. How many {i} do {a} and {b} have together?",
        "A shop sells {i} for ${x} each. {a} buys {y} of them and pays with a ${z}0 bill. "
        "How much change does {a} get?",
    ]
    out = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        out.append(rng.choice(forms).format(a=a, b=b, i=rng.choice(items), x=rng.randint(4, 40) * 2,
                                            y=rng.randint(2, 12), z=rng.randint(3, 30)))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="use the tiny random Llama")
    ap.add_argument("--models-dir", default=".models", help="cache of prepared models")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--repeats", type=int, default=2, help="passes over the batches (order alternates)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0 = torch's default). On a shared, oversubscribed CPU, "
                    "1 avoids OpenMP spin-waits that made 2 threads ~5x slower here")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from stillhouse.tasks.backends.hf import HFBackend
    from stillhouse.tasks.models.prepared import SMOLLM2_NAME
    from stillhouse.tasks.models.resolve import resolve_model
    from stillhouse.tasks.models.tiny import TINY_NAME

    path = resolve_model(TINY_NAME if args.tiny else SMOLLM2_NAME, args.models_dir)
    backend = HFBackend(path, dtype=args.dtype, device=args.device, batch_size=args.batch_size)
    model, tok = backend.model, backend.tokenizer

    cfg = PromptsConfig()
    requests = [
        SampleRequest(f"q{i}", 0, solve_messages(q, cfg), derive_seed(0, f"q{i}", 0))
        for i, q in enumerate(gsm_questions(args.prompts))
    ]
    encoded = [backend.encode(r.messages) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(encoded[i]))  # what HFBackend does
    batches = [order[s : s + args.batch_size] for s in range(0, len(order), args.batch_size)]
    pad = backend.pad_id if backend.pad_id is not None else backend.eos_ids[0]
    eos = set(backend.eos_ids)

    def sync():
        if str(backend.device).startswith("cuda"):
            torch.cuda.synchronize()

    def run_ours(idx, max_new_tokens=args.max_new_tokens):
        p = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=max_new_tokens)
        sync()
        t = time.perf_counter()
        out = backend.sample([requests[i] for i in idx], p)
        sync()
        return time.perf_counter() - t, sum(c.completion_tokens for c in out)

    def run_raw(idx, max_new_tokens=args.max_new_tokens):
        prompts = [encoded[i] for i in idx]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=backend.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=backend.device)
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=args.temperature, top_p=args.top_p, top_k=None,
                                 max_new_tokens=max_new_tokens, eos_token_id=backend.eos_ids, pad_token_id=pad)
        sync()
        dt = time.perf_counter() - t
        n = 0
        for row in out[:, width:].tolist():  # same accounting as ours: up to and including EOS
            n += next((j + 1 for j, x in enumerate(row) if x in eos), len(row))
        return dt, n

    print(f"model={path} device={backend.device} dtype={model.dtype} prompts={len(requests)} "
          f"batch_size={args.batch_size} max_new_tokens={args.max_new_tokens} "
          f"T={args.temperature} top_p={args.top_p} threads={torch.get_num_threads()}", flush=True)
    # Warm-up on the first (widest) batch with a few tokens: allocator and kernels see its shapes.
    run_ours(batches[0], max_new_tokens=4)
    run_raw(batches[0], max_new_tokens=4)

    ours_t = ours_n = raw_t = raw_n = 0.0
    passes = [(r, b, idx) for r in range(args.repeats) for b, idx in enumerate(batches)]
    for step, (r, b, idx) in enumerate(passes):
        runs = (run_ours, run_raw) if step % 2 == 0 else (run_raw, run_ours)
        for fn in runs:
            dt, n = fn(idx)
            if fn is run_ours:
                ours_t, ours_n = ours_t + dt, ours_n + n
            else:
                raw_t, raw_n = raw_t + dt, raw_n + n
            print(f"  pass {r} batch {b} {fn.__name__[4:]:>4}: {n:5d} tokens in {dt:6.2f}s = {n / dt:7.1f} tok/s", flush=True)
    # The per-step cost of the two sampling rules alone, on logits of the batch's shape: stable
    # evidence even when the machine's load makes the end-to-end figures noisy.
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    first = [encoded[i] for i in batches[0]]
    width = max(map(len, first))
    with torch.inference_mode():
        logits = model(
            input_ids=torch.tensor([[pad] * (width - len(p)) + p for p in first], device=backend.device),
            attention_mask=torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in first], device=backend.device),
        ).logits[:, -1].float()  # real next-token logits of the first batch's prompts
    ours_rule = backend.sampler_cls(range(len(first)), args.temperature, args.top_p, backend.device)
    warpers = (TemperatureLogitsWarper(args.temperature), TopPLogitsWarper(args.top_p))

    def raw_rule(x):
        for w in warpers:
            x = w(None, x)
        return torch.multinomial(x.softmax(-1), 1)

    def per_call(fn, reps=10):
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t) / reps * 1000

    print(f"  per-step sampling rule: ours={per_call(lambda: ours_rule(None, logits).argmax(-1)):.2f}ms "
          f"raw={per_call(lambda: raw_rule(logits)):.2f}ms "
          f"(model step ~{1000 * (ours_t + raw_t) / (2 * len(passes) * args.max_new_tokens):.0f}ms)")
    backend.close()
    ours, raw = ours_n / ours_t, raw_n / raw_t
    print(f"sampling: ours_tok_s={ours:.1f} raw_tok_s={raw:.1f} ratio={ours / raw:.3f}")


if __name__ == "__main__":
    main()
