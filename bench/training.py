"""Throughput of `stillhouse.tasks.training.trainer.train_lora` against the plain transformers `Trainer`, same run.

Both train the same LoRA (same PeftConfig, same seed) on the same base model and the same tokenized
samples (rendered chat prompt + GSM-style worked solution + EOS, labels -100 on the prompt), with
the same batch size, number of optimizer steps, max length, learning rate, schedule, clipping,
float32 on CPU, no evaluation, no saving, dataloader workers 0. Our trainer gets unit weights so
both optimise the same objective.

Throughput = non-padding tokens (attention_mask == 1) through forward + backward per second of the
training loop (ours: TrainResult.train_seconds, model loading and the final save excluded; Trainer:
on_train_begin to on_train_end through a callback; its tokens are counted in its collator). Runs
alternate (ours, Trainer, ours, Trainer, ...) so drift in machine load hits both alike; the best run
of each counts. Both run with one torch thread by default: on a small shared machine two OpenMP
threads spin at barriers whenever another process takes a core, which makes a run 2-20x slower at
random and the comparison meaningless (`--threads 0` for torch's default on a quiet machine).

Where the speed comes from: length-grouped micro-batches (less padding than the Trainer's random
batches) and logits only at completion positions (`logits_to_keep` with a boolean mask: prompt and
padding positions never reach the vocabulary projection or the softmax).

loss_diff: on the first batch, at the initial weights, our weighted loss with all weights 1 against
the mean of Trainer.compute_loss over the batch's samples one by one (the Trainer's own loss path;
ours is the mean of per-sample means, so single samples are the like-for-like comparison).

    python bench/training.py              # a 4-layer Llama (hidden 256) built by build_tiny_model
    python bench/training.py --model smollm2-135m-instruct   # the prepared SmolLM2 (slower)

The last line is `training: ours_tok_s=... trainer_tok_s=... ratio=... loss_diff=...` (goal: ratio >= 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stillhouse.tasks.config import LoraConfig, TrainingConfig  # noqa: E402
from stillhouse.tasks.training.data import TrainExample, encode_examples  # noqa: E402
from stillhouse.tasks.training.trainer import train_lora  # noqa: E402


def gsm_samples(tok, n: int, seed: int = 0) -> list[TrainExample]:
    """GSM-style questions with worked solutions of varied length (1 to 5 steps)."""
    rng = random.Random(seed)
    names = ["Maya", "Liam", "Noah", "Emma", "Olivia", "Lucas", "Ava", "Ethan"]
    items = ["cupcakes", "stickers", "marbles", "books", "apples", "pencils", "tickets", "shells"]
    out = []
    for _ in range(n):
        who, item = rng.choice(names), rng.choice(items)
        total = rng.randint(5, 60)
        q = f"{who} has {total} {item}."
        steps = []
        for _ in range(rng.randint(1, 5)):
            x = rng.randint(2, 30)
            if rng.random() < 0.5:
                q += f" Then {who} gets {x} more {item}."
                steps.append(f"After getting {x} more, {who} has {total} + {x} = {total + x} {item}.")
                total += x
            else:
                q += f" Then {who} gives away {x} {item}."
                steps.append(f"After giving away {x}, {who} has {total} - {x} = {total - x} {item}.")
                total -= x
        q += f" How many {item} does {who} have now?"
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "Solve the following math problem step by step.\n\n" + q}],
            tokenize=False, add_generation_prompt=True,
        )
        completion = " ".join(steps) + f" The answer is \\boxed{{{total}}}."
        out.append(TrainExample(prompt, completion, 1.0))
    return out


def model_dir(name: str, root: Path) -> Path:
    if name == "bench-llama":
        from stillhouse.tasks.models.tiny import build_tiny_model

        return build_tiny_model(root / "bench-llama", seed=0, vocab_size=2048, hidden_size=256, num_layers=4,
                                num_heads=4, intermediate_size=768)
    from stillhouse.tasks.models.resolve import resolve_model  # a prepared name such as smollm2-135m-instruct

    return Path(resolve_model(name))


def run_trainer(base: Path, examples, cfg: TrainingConfig, lora: LoraConfig, steps: int, tok, workdir: Path,
                group_by_length: bool = False):
    """The plain transformers Trainer on the same data and LoRA; returns (tok/s, tokens, final loss)."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments)

    from stillhouse.tasks.training.trainer import match_target_modules

    enc = encode_examples(tok, examples, cfg.max_length)
    data = [
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * p + ids[p:]}
        for ids, p in zip(enc.input_ids, enc.prompt_lens, strict=True)
    ]
    torch.manual_seed(cfg.seed)
    base_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    base_model.config.use_cache = False
    pcfg = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                          target_modules=match_target_modules(base_model, lora.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(base_model, pcfg)

    pad = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    counted = {"tokens": 0, "padded": 0}

    def collate(features):
        batch = pad(features)
        counted["tokens"] += int(batch["attention_mask"].sum())
        counted["padded"] += batch["attention_mask"].numel()
        return batch

    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            counted["tokens"] = counted["padded"] = 0
            clock["t0"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            clock["t1"] = time.perf_counter()

    args = TrainingArguments(
        output_dir=str(workdir), per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.schedule,
        warmup_steps=0, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        logging_steps=steps, save_strategy="no", eval_strategy="no", report_to=[], dataloader_num_workers=0,
        use_cpu=True, seed=cfg.seed, data_seed=cfg.seed, remove_unused_columns=False, disable_tqdm=True,
        bf16=False, fp16=False, train_sampling_strategy="group_by_length" if group_by_length else "random",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Clock()])

    # loss_diff: the Trainer's own loss path on the first batch's samples one by one, at init.
    first = [data[i] for i in range(cfg.batch_size)]
    model.eval()
    with torch.no_grad():
        trainer_first = sum(float(trainer.compute_loss(model, pad([f]))) for f in first) / len(first)
    model.train()

    out = trainer.train()
    secs = clock["t1"] - clock["t0"]
    # The data the Trainer's sampler drew is counted above; drop the loss_diff batches.
    return (counted["tokens"] / secs, counted["tokens"], counted["padded"], float(out.training_loss),
            trainer_first, first)


def ours_first_batch_loss(base: Path, first, lora: LoraConfig, seed: int) -> float:
    import torch

    from stillhouse.tasks.training.trainer import batch_loss, load_base, wrap_lora

    torch.manual_seed(seed)
    model = wrap_lora(load_base(base, torch.float32, "cpu"), lora, None).eval()
    width = max(len(f["input_ids"]) for f in first)
    ids = torch.zeros((len(first), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, f in enumerate(first):
        n = len(f["input_ids"])
        ids[r, :n] = torch.tensor(f["input_ids"])
        mask[r, :n] = 1
        labels[r, :n] = torch.tensor(f["labels"])
    with torch.no_grad():
        return float(batch_loss(model, ids, mask, labels, torch.ones(len(first))))


def run(a: argparse.Namespace, root: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    base = model_dir(a.model, root / "models")
    tok = AutoTokenizer.from_pretrained(str(base))
    examples = gsm_samples(tok, a.samples)
    lens = [len(s) for s in encode_examples(tok, examples, a.max_length).input_ids]
    # epochs such that our plan has exactly `steps` optimizer steps (grad_accum 1).
    per_epoch = -(-len(lens) // a.batch_size)
    cfg = TrainingConfig(learning_rate=2e-4, schedule="linear", warmup_ratio=0.0, epochs=a.steps / per_epoch,
                         batch_size=a.batch_size, grad_accum=1, max_length=a.max_length, weight_decay=0.0,
                         max_grad_norm=1.0, checkpoint_every=10**6, seed=0)
    lora = LoraConfig()
    mc = AutoConfig.from_pretrained(str(base))
    print(f"model {a.model}: {mc.num_hidden_layers} layers, hidden {mc.hidden_size}, vocab {mc.vocab_size}; "
          f"{len(examples)} samples, lengths {min(lens)}..{max(lens)} (mean {sum(lens) / len(lens):.0f}), "
          f"batch {a.batch_size}, {a.steps} steps, torch threads {torch.get_num_threads()}", flush=True)

    ours_best, trainer_best = 0.0, 0.0
    ours_loss = trainer_loss = float("nan")
    trainer_first = float("nan")
    first = None
    for r in range(a.repeats):
        shutil.rmtree(root / f"ours-{r}", ignore_errors=True)  # a finished out_dir would be returned as is
        res = train_lora(base, examples, root / f"ours-{r}", cfg, lora, dtype="float32", device="cpu")
        assert res.steps == a.steps, res.steps
        ours_best = max(ours_best, res.tokens_per_s)
        ours_loss = sum(v for _, v in res.loss_curve) / len(res.loss_curve)
        print(f"  run {r}: ours    {res.tokens_per_s:8.0f} tok/s  {res.tokens} tokens "
              f"({res.extra['padded_tokens']} with padding) in {res.train_seconds:.1f}s  "
              f"mean train loss {ours_loss:.4f}", flush=True)
        tps, toks, padded, trainer_loss, trainer_first, first = run_trainer(base, examples, cfg, lora, a.steps, tok,
                                                                    root / f"trainer-{r}", a.trainer_group_by_length)
        trainer_best = max(trainer_best, tps)
        print(f"  run {r}: Trainer {tps:8.0f} tok/s  {toks} tokens ({padded} with padding)  "
              f"mean train loss {trainer_loss:.4f}", flush=True)

    ours_first = ours_first_batch_loss(base, first, lora, cfg.seed)
    loss_diff = abs(ours_first - trainer_first)
    print(f"first batch, unit weights: ours {ours_first:.6f} Trainer (per sample) {trainer_first:.6f}")
    print(f"training: ours_tok_s={ours_best:.0f} trainer_tok_s={trainer_best:.0f} "
          f"ratio={ours_best / trainer_best:.2f} loss_diff={loss_diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="bench-llama", help="bench-llama (built here) or a prepared model name")
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each trainer; best counts")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both trainers; 0 = torch's default (see the module docstring)")
    ap.add_argument("--trainer-group-by-length", action="store_true",
                    help="give the Trainer length-grouped batches too (isolates the masked-logits gain)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    root = Path(a.workdir or tempfile.mkdtemp(prefix="bench-training-"))
    try:
        run(a, root)
    finally:
        if not a.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
