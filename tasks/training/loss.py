"""The per-sample weighted causal-LM loss of AdvDistill-style distillation, as a pure function.

Each teacher sample i carries a weight w_i (its group-relative advantage, or 1 for plain
distillation). With nll_i the mean next-token negative log-likelihood over sample i's completion
tokens (labels == -100 on prompt and padding positions are ignored), T_i its number of completion
tokens, n the samples and T the completion tokens of the optimizer step:

    normalizer="samples" (default):  loss = sum_i w_i * nll_i / n
    normalizer="tokens":             loss = sum_i w_i * T_i * nll_i / T

Sign convention: a positive weight pulls a sample's likelihood up (ordinary SFT), a negative weight
pushes it down (the unlikelihood side of an advantage-weighted update); |w| sets how hard. The
denominator never depends on the weights: dividing by the step's own sum |w_i| (as this module once
did) made a lone sample train the same whatever its weight, and a step of only negative samples a
full-size push away from them. With all weights 1, "samples" is exactly the mean of the per-sample
mean NLLs and "tokens" the mean token NLL (plain cross-entropy).

`negative="unlikelihood"` swaps the unbounded -nll_i of negative samples for the bounded token-level
unlikelihood loss mean_t -log(1 - p_t) (Welleck et al. 2019), weighted by |w_i|: it still lowers
their likelihood but stops pushing once p_t is near 0, so a few wrong samples cannot drive the
student's distribution off a cliff.

Edge cases: samples with no completion token contribute nothing (their weight is treated as 0), and
a batch with no completion token or only zero weights gives a loss of exactly 0 whose gradient is
zero everywhere (never NaN), so an optimizer step on it changes nothing (with weight decay 0).

torch is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

from typing import Literal

IGNORE_INDEX = -100
# Floor inside the unlikelihood log: p_t == 1 would otherwise give -log(0) = inf.
_UL_MIN = 1e-6


def per_sample_nll(logits, labels, *, shift: bool = True):
    """Per-token NLL of the labelled positions gathered per sample.

    Returns (token_nll [N], sample_index [N], counts [B]) where N is the number of labelled tokens.
    Only the labelled rows of `logits` are upcast to float32 and fed to cross_entropy, so long
    prompts and padding cost no softmax memory.
    """
    import torch
    import torch.nn.functional as F

    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if shift:
        # Position t predicts token t+1 (HF convention: labels are aligned with input_ids).
        logits = logits[:, :-1]
        labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    counts = mask.sum(dim=1)
    rows = logits[mask].float()  # [N, V]
    targets = labels[mask]
    token_nll = F.cross_entropy(rows, targets, reduction="none")
    sample_index = mask.nonzero(as_tuple=True)[0]
    return token_nll, sample_index, counts.to(torch.long)


def weighted_completion_loss(
    logits,
    labels,
    weights,
    *,
    shift: bool = True,
    reduction: Literal["samples", "tokens"] = "samples",
    normalizer: float | None = None,
    negative: Literal["nll", "unlikelihood"] = "nll",
):
    """The weighted loss of a batch (see the module docstring).

    logits: [B, T, V] (any float dtype; the loss is computed in float32).
    labels: [B, T] token ids, IGNORE_INDEX (-100) where no loss is taken. With `shift=True`
        (default) labels are aligned with the input ids, as for a HF causal LM's `labels=`;
        with `shift=False` labels[:, t] is the target of logits[:, t].
    weights: [B] per-sample weights (any sign).
    reduction: "samples" (per-sample mean NLL, averaged over samples) or "tokens" (every completion
        token counts once, averaged over tokens).
    normalizer: the denominator to use instead of this batch's count of samples (or tokens);
        gradient accumulation passes the optimizer step's count so that k micro-batches equal one
        big batch exactly.
    negative: "nll" (default, the formula above) or "unlikelihood" for negative-weight samples.
    """
    token_nll, sample_index, counts = per_sample_nll(logits, labels, shift=shift)
    return combine_token_nll(
        token_nll, sample_index, counts, weights, reduction=reduction, normalizer=normalizer, negative=negative
    )


def combine_token_nll(
    token_nll,
    sample_index,
    counts,
    weights,
    *,
    reduction: Literal["samples", "tokens"] = "samples",
    normalizer: float | None = None,
    negative: Literal["nll", "unlikelihood"] = "nll",
):
    """The weighted loss from already gathered per-token NLLs (what `weighted_completion_loss` does
    after the gather). The trainer uses it directly when the model returns logits only for the
    labelled positions (`logits_to_keep` with a boolean mask), which skips the vocabulary
    projection of prompt and padding positions altogether.

    token_nll [N] float32, sample_index [N] (which sample each token belongs to), counts [B].
    """
    import torch

    batch = counts.shape[0]
    dev = token_nll.device
    w = torch.as_tensor(weights, dtype=torch.float32, device=dev).reshape(-1)
    if w.numel() != batch:
        raise ValueError(f"got {w.numel()} weights for a batch of {batch}")
    w = torch.where(counts > 0, w, torch.zeros_like(w))
    denom_counts = counts.clamp_min(1).to(torch.float32)

    nll = torch.zeros(batch, dtype=torch.float32, device=dev)
    nll = nll.index_add(0, sample_index, token_nll) / denom_counts
    if negative == "unlikelihood":
        # -log(1 - p) with p = exp(-nll_t); the clamp guards p -> 1 (a certain token).
        p = torch.exp(-token_nll)
        ul_tok = -torch.log1p(-p.clamp_max(1.0 - _UL_MIN))
        ul = torch.zeros(batch, dtype=torch.float32, device=dev)
        ul = ul.index_add(0, sample_index, ul_tok) / denom_counts
        per_sample = torch.where(w < 0, ul * w.abs(), nll * w)
    elif negative == "nll":
        per_sample = nll * w
    else:
        raise ValueError(f"negative must be 'nll' or 'unlikelihood', got {negative!r}")

    if reduction == "tokens":
        # Sample i's mean over its tokens times T_i: every token counts once.
        per_sample = per_sample * counts.to(torch.float32)
    elif reduction != "samples":
        raise ValueError(f"reduction must be 'samples' or 'tokens', got {reduction!r}")
    if normalizer is None:
        present = counts > 0
        denom = counts.sum().to(torch.float32) if reduction == "tokens" else present.sum().to(torch.float32)
    else:
        denom = torch.as_tensor(float(normalizer), dtype=torch.float32, device=dev)
    # An all-masked batch: the numerator is an exact 0 still attached to the graph (through
    # index_add); dividing by 1 instead of 0 keeps it 0 and finite.
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return per_sample.sum() / denom


def sample_mean_nll(logits, labels, *, shift: bool = True):
    """Per-sample mean completion NLL [B] (0 for samples without a labelled token); no grad needed."""
    import torch

    token_nll, sample_index, counts = per_sample_nll(logits, labels, shift=shift)
    out = torch.zeros(labels.shape[0], dtype=torch.float32, device=token_nll.device)
    return out.index_add(0, sample_index, token_nll) / counts.clamp_min(1).to(torch.float32)
