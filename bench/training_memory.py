"""Peak memory of `stillhouse.tasks.training.trainer.train_lora` with and without gradient checkpointing, same run.

Why it exists: a demo round's LoRA step on SmolLM2-135M (30 layers, fp32, micro-batch 8 x ~300
tokens) took the process to ~9.4 GB RSS. That is activation memory kept for the backward pass (per
layer: attention scores for every head and the MLP's intermediate tensors), not a leak; on a
machine with less memory, or next to other jobs, it turns into swapping. `training.gradient_checkpointing`
recomputes each layer in the backward pass instead.

Each variant runs in its own child process (so one's peak cannot hide the other's): it trains the
same LoRA on the same samples (a rendered chat prompt + worked solution, `--prompt-words` long, in
micro-batches of `--batch-size`) for `--steps` optimizer steps and reports its peak RSS
(ru_maxrss), its RSS after loading the model, and tokens/s of the training loop. Variants alternate
(plain, checkpointed, plain, ...) for `--repeats` rounds; the lowest peak and best tokens/s count.

    python bench/training_memory.py                                  # prepared SmolLM2-135M
    python bench/training_memory.py --model /path/to/hf/folder

Last line: `training_memory: plain_peak_mb=... ckpt_peak_mb=... ratio=... plain_tok_s=... ckpt_tok_s=...`
(ratio = checkpointed peak / plain peak; lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> None:
    import torch

    from stillhouse.tasks.config import LoraConfig, TrainingConfig
    from stillhouse.tasks.models.resolve import resolve_model
    from stillhouse.tasks.training.data import TrainExample
    from stillhouse.tasks.training.trainer import load_base, train_lora

    torch.set_num_threads(args.threads) if args.threads else None
    path = resolve_model(args.model)
    # RSS with the model loaded (the floor any training run starts from).
    base = load_base(path, torch.float32, "cpu")
    loaded_mb = _rss_mb()
    del base
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    filler = " ".join(f"Ann had {i} apples and gave {i % 7} away." for i in range(args.prompt_words // 8))
    examples = []
    for i in range(args.batch_size * args.steps):
        prompt = tok.apply_chat_template([{"role": "user", "content": f"{filler} Question {i}: what is {i} + 3?"}],
                                         tokenize=False, add_generation_prompt=True)
        solution = f"Ann starts with {i} apples. She gets 3 more, so {i} + 3 = {i + 3}. The answer is \\boxed{{{i + 3}}}."
        examples.append(TrainExample(prompt, solution, 1.0 if i % 3 else -0.5))
    cfg = TrainingConfig(batch_size=args.batch_size, max_length=args.max_length, epochs=1, schedule="constant",
                         warmup_ratio=0.0, checkpoint_every=10_000, gradient_checkpointing=args.ckpt)
    lora = LoraConfig(rank=16, alpha=32, dropout=0.0)
    with tempfile.TemporaryDirectory() as out:
        result = train_lora(path, examples, Path(out) / "run", cfg, lora, device="cpu", dtype="float32")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak_mb, "loaded_mb": loaded_mb, "tok_s": result.tokens_per_s}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="prepared name or HF folder")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--prompt-words", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    best: dict[bool, dict[str, float]] = {}
    for _ in range(args.repeats):
        for ckpt in (False, True):
            cmd = [sys.executable, __file__, "--child", "--model", args.model, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--prompt-words", str(args.prompt_words),
                   "--max-length", str(args.max_length), "--threads", str(args.threads)] + (["--ckpt"] if ckpt else [])
            t0 = time.perf_counter()
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{'ckpt ' if ckpt else 'plain'}: peak {r['peak_mb']:.0f} MB, model loaded {r['loaded_mb']:.0f} MB, "
                  f"{r['tok_s']:.1f} tok/s ({time.perf_counter() - t0:.0f} s)", flush=True)
            b = best.setdefault(ckpt, {"peak_mb": float("inf"), "tok_s": 0.0})
            b["peak_mb"] = min(b["peak_mb"], r["peak_mb"])
            b["tok_s"] = max(b["tok_s"], r["tok_s"])
    plain, ck = best[False], best[True]
    print(f"training_memory: plain_peak_mb={plain['peak_mb']:.0f} ckpt_peak_mb={ck['peak_mb']:.0f} "
          f"ratio={ck['peak_mb'] / plain['peak_mb']:.3f} plain_tok_s={plain['tok_s']:.1f} ckpt_tok_s={ck['tok_s']:.1f}")


if __name__ == "__main__":
    main()
