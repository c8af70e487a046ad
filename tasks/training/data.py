"""Training data: examples, tokenisation with prompt/completion labels, the micro-batch plan.

>>> plan_micro_batches([5, 3, 8, 2], batch_size=2, epochs=1, seed=0) == plan_micro_batches([5, 3, 8, 2], 2, 1, 0)
True
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stillhouse.tasks.training.loss import IGNORE_INDEX

log = logging.getLogger(__name__)

_MEGA_BATCHES = 16


@dataclass(frozen=True)
class TrainExample:
    """One teacher sample: the rendered prompt, the completion to learn, its loss weight."""

    prompt: str
    completion: str
    weight: float = 1.0



# --------------------------------------------------------------------------- data


def load_examples(source: Sequence[TrainExample] | str | Path) -> list[TrainExample]:
    """A list of TrainExample (or dicts with prompt/completion/weight), or a Parquet file."""
    if isinstance(source, (str, Path)):
        import pyarrow.parquet as pq

        table = pq.read_table(source)
        missing = {"prompt", "completion", "weight"} - set(table.column_names)
        if missing:
            raise ValueError(f"{source}: Parquet file lacks columns {sorted(missing)}")
        cols = table.select(["prompt", "completion", "weight"]).to_pydict()
        return [
            TrainExample(p, c, float(w)) for p, c, w in zip(cols["prompt"], cols["completion"], cols["weight"], strict=True)
        ]
    out = []
    for ex in source:
        if isinstance(ex, TrainExample):
            out.append(ex)
        elif isinstance(ex, dict):
            out.append(TrainExample(ex["prompt"], ex["completion"], float(ex.get("weight", 1.0))))
        else:
            raise TypeError(f"expected TrainExample or dict, got {type(ex).__name__}")
    return out


@dataclass
class Encoded:
    input_ids: list[list[int]]
    prompt_lens: list[int]
    weights: list[float]
    truncated: int
    skipped_too_long: int


def encode_examples(tokenizer, examples: Sequence[TrainExample], max_length: int, *,
                    prompt_special_tokens: bool | None = None) -> Encoded:
    """Tokenize prompt and completion (+EOS) separately; cut at max_length; skip empty completions.

    Separate tokenization matches generation, where the completion's tokens follow the prompt's.
    prompt_special_tokens: whether the prompt gets the tokenizer's BOS. None (default): when the
    tokenizer adds one and the rendered prompt does not already start with it (a chat template that
    writes its own BOS is not doubled). Pass the sampling backend's rule (stillhouse.tasks.backends.hf encodes
    chat-templated text without special tokens) to mirror it exactly.
    """
    prompts = [e.prompt for e in examples]
    completions = [e.completion for e in examples]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"] if completions else []
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]
    if prompt_special_tokens is not None:
        adds_bos = adds_bos and prompt_special_tokens
    eos = tokenizer.eos_token_id
    enc = Encoded([], [], [], 0, 0)
    for ex, p, c in zip(examples, p_ids, c_ids, strict=True):
        if adds_bos and (prompt_special_tokens or not (p and p[0] == bos)):
            p = [bos, *p]
        ids = list(p) + list(c) + ([eos] if eos is not None else [])
        if len(ids) > max_length:
            if len(p) >= max_length:
                enc.skipped_too_long += 1
                continue
            ids = ids[:max_length]
            enc.truncated += 1
        if len(ids) == len(p):  # empty completion and no EOS: nothing to learn
            enc.skipped_too_long += 1
            continue
        enc.input_ids.append(ids)
        enc.prompt_lens.append(len(p))
        enc.weights.append(ex.weight)
    return enc


def plan_micro_batches(lengths: Sequence[int], batch_size: int, epochs: float, seed: int,
                       micro_batches: int | None = None) -> list[list[int]]:
    """The whole run's micro-batches (lists of sample indices), a pure function of its arguments.

    Per epoch: a seeded shuffle; windows of `_MEGA_BATCHES` micro-batches are sorted by length and
    cut into micro-batches (similar lengths, little padding); the micro-batch order is shuffled.
    `epochs` may be fractional: round(epochs * batches_per_epoch) micro-batches in all (>= 1).
    `micro_batches` fixes the count instead (a step budget): epochs follow one another, each in
    its own seeded order, until it is reached.
    """
    n = len(lengths)
    if n == 0:
        return []
    per_epoch = math.ceil(n / batch_size)
    total = micro_batches if micro_batches is not None else max(1, round(epochs * per_epoch))
    window = batch_size * _MEGA_BATCHES
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < total:
        rng = random.Random(f"stillhouse-data:{seed}:{epoch}")
        order = list(range(n))
        rng.shuffle(order)
        batches = []
        for s in range(0, n, window):
            chunk = sorted(order[s : s + window], key=lambda i: -lengths[i])
            batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
        rng.shuffle(batches)
        plan.extend(batches)
        epoch += 1
    return plan[:total]


def collate(enc: Encoded, idx: Sequence[int], pad_id: int, pad_to: int = 1):
    import torch

    seqs = [enc.input_ids[i] for i in idx]
    width = max(len(s) for s in seqs)
    width = -(-width // pad_to) * pad_to
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (i, s) in enumerate(zip(idx, seqs, strict=True)):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
        labels[r, enc.prompt_lens[i] : len(s)] = torch.tensor(s[enc.prompt_lens[i] :])
    weights = torch.tensor([enc.weights[i] for i in idx], dtype=torch.float32)
    return ids, mask, labels, weights


