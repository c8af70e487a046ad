"""`tiny-tutor`: a tiny Llama, briefly trained, so that smoke runs see real signal.

The random `tiny-llama` writes garbage: teacher accuracy is 0, every weight group is degenerate and
synthesis keeps nothing. `tiny-tutor` is the same kind of model (2-layer Llama, head_dim 64, ChatML
template, eos <|im_end|>; hidden size 64, ~0.2M parameters) trained from scratch on CPU for about
40 s on a seeded synthetic corpus rendered with the DEFAULT prompts of PromptsConfig:

- solve prompt + a simple word problem (one step +, -, x with operands mostly 2..10; 20% two
  steps) -> a one-line rationale ending in the boxed answer: "8 + 6 = \\boxed{14}." or
  "3 * 4 = 12. 12 - 5 = \\boxed{7}.";
- harder / similar prompt + a parent problem (one of ours, or a longer GSM8K-like story)
  -> "Problem: <a new two-step (harder) or one-step (similar) word problem>?" with new names and
  numbers: stillhouse.tasks.synthesis.parse.parse_generated_problem accepts it and it is no copy of the parent;
- bare facts ("What is 8 + 6?") that drill the arithmetic.

What it learns is deliberately a smoke-scale skill: it copies the numbers and usually picks the
operation, and gets the arithmetic right about half the time, so at T=0.7 it is right on some
simple problems, wrong on others and split on many (mixed-reward groups), and it mostly agrees with
itself on the problems it writes (synthesis keeps them). On GSM8K-level problems it writes the same
one-line rationale from two of the numbers: right only by luck (~0%).

Three choices make that learnable in ~900 small steps (see the functions for why): whole-number
tokens for 0..199, Fourier-feature embeddings for those tokens, and a language-model loss on the
problem text of solve prompts (question_weight), which teaches it to write problems.

Deterministic given its arguments on one machine kind (seeded corpus and init, one CPU thread);
a second call with the same arguments returns the existing folder (manifest written last, atomic
publish, as for the other prepared names: models/publish.py). torch/transformers/tokenizers are
imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

from stillhouse.tasks.config import PromptsConfig
from stillhouse.tasks.models.tutor_corpus import NUMBER_TOKENS, tutor_conversations

log = logging.getLogger(__name__)

TUTOR_NAME = "tiny-tutor"

# Bump when the corpus, tokenizer or training loop changes: a cached folder with another version
# is rebuilt.
CORPUS_VERSION = 1

# --------------------------------------------------------------------------- tokenizer


def _train_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    """Byte-level BPE with tiny-llama's special tokens and ChatML template.

    Digit runs are pre-tokens of their own (no leading space) and "0".."199" are in the training
    text, so a small number is one token wherever it stands ("has 17", "= 17", "{17}"): copying it
    from the question is one attention step. Larger numbers split into pieces.
    """
    from stillhouse.tasks.models.tiny import train_chat_tokenizer

    numbers = " ".join(str(i) for i in range(NUMBER_TOKENS))
    return train_chat_tokenizer(texts + [numbers] * 50, vocab_size, max_length, split_digits=True)


def _fourier_number_embeddings(model, tok) -> None:
    """Give the tokens "0".."199" embeddings made of cos/sin of the value at many periods.

    Why: the rationale's last step maps two numbers to their sum or difference. With random
    embeddings that is a table to memorise, which ~900 steps do not; with these, the sum is a
    product of features of the operands (cos(a+b) = cos a cos b - sin a sin b) that Llama's gated
    MLP computes directly, and neighbouring values get similar codes (slips are off by one, not
    random). The codes stay distinct enough to copy numbers. Other tokens keep the random init,
    and everything is trained.
    """
    import torch

    emb = model.get_input_embeddings().weight
    pairs = emb.shape[1] * 3 // 8  # 3/4 of the dimensions hold the code, the rest stays random
    periods = torch.logspace(math.log10(2.5), math.log10(400.0), pairs)
    with torch.no_grad():
        scale = emb.norm(dim=1).mean() / math.sqrt(pairs)
        for n in range(NUMBER_TOKENS):
            idx = tok.convert_tokens_to_ids(str(n))
            if idx is None or tok.convert_ids_to_tokens(idx) != str(n):
                continue
            angle = 2 * math.pi * n / periods
            emb[idx, : 2 * pairs] = scale * torch.cat([angle.cos(), angle.sin()])


# --------------------------------------------------------------------------- build


def build_tiny_tutor(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = 900,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup: int = 20,
    n_solve: int = 5000,
    n_write: int = 800,
    n_drill: int = 3000,
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 1,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    max_train_tokens: int = 320,
    question_weight: float = 0.3,
) -> Path:
    """Build (or return the cached) tiny tutor into `out_dir`; see the module docstring.

    A freshly initialised tiny Llama (head_dim 64; number embeddings see
    _fourier_number_embeddings) is fully trained on tutor_conversations(seed): AdamW, linear
    warmup then cosine decay, loss on the assistant reply and its <|im_end|> plus, at
    `question_weight`, on the problem text of solve prompts; length-grouped batches, one CPU
    thread. The manifest (written last) records the spec (with a digest of the default prompts
    the corpus was rendered with, so editing them rebuilds), the loss and the build time; a folder
    whose manifest spec matches is returned as is. Takes ~40-50 s on a free core.
    """
    from stillhouse.tasks.models.publish import publish, read_manifest, tmp_sibling
    from stillhouse.tasks.models.tiny import TINY_SPECIAL_TOKENS

    out_dir = Path(out_dir)
    if hidden_size % num_heads or hidden_size // num_heads != 64:
        raise ValueError(f"head_dim must be 64, got hidden_size={hidden_size} num_heads={num_heads}")
    spec = {
        "kind": TUTOR_NAME, "version": CORPUS_VERSION, "seed": seed, "steps": steps,
        "batch_size": batch_size, "lr": lr, "warmup": warmup, "n_solve": n_solve,
        "n_write": n_write, "n_drill": n_drill, "vocab_size": vocab_size,
        "hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
        "intermediate_size": intermediate_size, "max_position_embeddings": max_position_embeddings,
        "max_train_tokens": max_train_tokens, "question_weight": question_weight,
        "prompts": _prompts_digest(PromptsConfig()),
    }
    if (read_manifest(out_dir) or {}).get("spec") == spec:
        return out_dir

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from stillhouse.tasks.prompts import render_prompt

    t0 = time.perf_counter()
    log.info("building %s into %s", TUTOR_NAME, out_dir)
    pairs = tutor_conversations(seed, n_solve=n_solve, n_write=n_write, n_drill=n_drill)
    # The tokenizer learns from the chat text the model will see (without the template's markers).
    tok = _train_tokenizer(
        [m["content"] for msgs, _, _ in pairs for m in msgs] + [reply for _, reply, _ in pairs],
        vocab_size, max_position_embeddings,
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS}
    eos = ids["<|im_end|>"]

    # Prompt and reply are encoded apart, as generation sees them (HFBackend encodes the rendered
    # prompt with add_special_tokens=False, then the model writes the reply and <|im_end|>).
    examples: list[tuple[list[int], list[float]]] = []  # (token ids, loss weight per token)
    for messages, reply, question in pairs:
        rendered = render_prompt(tok, messages)
        enc = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
        p, pw = enc["input_ids"], [0.0] * len(enc["input_ids"])
        if question is not None and question_weight > 0:
            # The problem statement in a solve prompt is language-modelled too: the tutor learns
            # to write such problems from every solve example, not only from the "Problem:"
            # replies, for a few more vocabulary projections.
            lo = rendered.rfind(question)
            hi = lo + len(question)
            pw = [question_weight if lo <= s and e <= hi else 0.0 for s, e in enc["offset_mapping"]]
        c = tok(reply, add_special_tokens=False)["input_ids"] + [eos]
        if len(p) + len(c) > max_train_tokens:
            cut = len(p) + len(c) - max_train_tokens  # keep the end: the template's tail, the marker
            p, pw = p[cut:], pw[cut:]
        examples.append((p + c, pw + [1.0] * len(c)))

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=ids["<s>"], eos_token_id=eos, pad_token_id=ids["<pad>"],
    )
    # One thread: for a model this small a second one buys little and costs a lot on a busy
    # machine (OpenMP workers spin on a shared core), and a fixed thread count keeps the float
    # reductions, hence the weights, the same whatever machine size runs the build.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
            _fourier_number_embeddings(model, tok)
            losses = _train(model, examples, steps=steps, batch_size=batch_size, lr=lr,
                            warmup=warmup, pad_id=ids["<pad>"], rng=random.Random(seed + 1))
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=[eos, ids["</s>"]], pad_token_id=ids["<pad>"]
    )
    seconds = time.perf_counter() - t0
    tail = losses[-20:]
    log.info("built %s in %.1f s (loss %.3f -> %.3f)", TUTOR_NAME, seconds, losses[0], sum(tail) / len(tail))

    tmp = tmp_sibling(out_dir)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        manifest: dict[str, Any] = {
            "name": TUTOR_NAME, "spec": spec, "examples": len(examples),
            "loss_first": round(losses[0], 4), "loss_last": round(sum(tail) / len(tail), 4),
            "build_seconds": round(seconds, 1),
        }
        return publish(tmp, out_dir, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prompts_digest(prompts: PromptsConfig) -> str:
    text = json.dumps([prompts.system, prompts.solve, prompts.harder, prompts.similar, prompts.few_shot])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _train(model, examples: list[tuple[list[int], list[float]]], *, steps: int, batch_size: int, lr: float,
           warmup: int, pad_id: int, rng: random.Random) -> list[float]:
    """Plain AdamW loop over length-grouped batches; returns the loss per step."""
    import torch

    def batches():
        # Endless seeded epochs: shuffle, cut into chunks of 16 batches, sort each chunk by length
        # (little padding), then shuffle the batches of the chunk.
        while True:
            order = list(range(len(examples)))
            rng.shuffle(order)
            chunk = batch_size * 16
            for start in range(0, len(order), chunk):
                part = sorted(order[start:start + chunk], key=lambda i: len(examples[i][0]))
                group = [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
                rng.shuffle(group)
                yield from group

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses: list[float] = []
    for _, idx in zip(range(steps), batches(), strict=False):
        width = max(len(examples[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        weight = torch.zeros((len(idx), width))
        for row, i in enumerate(idx):
            seq, wts = examples[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            attn[row, : len(seq)] = 1
            weight[row, : len(seq)] = torch.tensor(wts)
        # The vocabulary projection only where a loss is taken: the prompt is most of the tokens.
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
        w = weight[:, 1:]
        keep = w > 0
        nll = torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), ids[:, 1:][keep], reduction="none")
        loss = (nll * w[keep]).sum() / w[keep].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses
