"""LoRA training of the student with the per-sample weighted loss (AdvDistill), resumable.

`train_lora` takes rendered prompt text, completion text and a weight per teacher sample (a list of
`TrainExample` or a Parquet file with columns prompt, completion, weight) and trains a PEFT LoRA
adapter on a causal LM with `stillhouse.tasks.training.loss`. It is independent of prompt building: whoever
renders prompts (stillhouse.tasks.prompts) does so before the data reaches here.

What it does, in order:

1. Weights are used exactly as given (the weigh step owns flooring/clipping: the round's version
   stores the weight trained on); samples whose weight is 0 are dropped before batching (they
   would cost compute and contribute nothing).
2. prompt and completion are tokenized separately (completion + EOS), as generation sees them; the
   prompt gets the tokenizer's BOS when the tokenizer adds one and the rendered text lacks it.
   Labels are -100 on prompt and padding. Samples longer than `cfg.max_length` are cut at the end
   (counted); one whose cut would leave no completion token is skipped (counted).
3. A deterministic plan of micro-batches: per epoch a seeded shuffle, length-grouped within
   mega-batches of 16 micro-batches (little padding), micro-batch order shuffled again. Fractional
   epochs take the first part of the last epoch; `cfg.max_steps` instead fixes the number of optimizer
   steps, epochs following one another until it is reached. Right padding.
4. Own loop: AdamW on the LoRA parameters, transformers' warmup + constant/linear/cosine schedule,
   gradient accumulation (each micro-batch's loss is normalised by the whole optimizer step's
   number of samples or completion tokens, `cfg.loss_normalizer`, never by its weights, so k
   micro-batches equal one big batch), gradient clipping. Negative samples get `cfg.negative_loss`.
   The model is asked for logits only at labelled positions (`logits_to_keep` with a boolean mask,
   transformers >= 5): prompt and padding positions never hit the vocabulary projection.
5. Precision: CPU float32. CUDA: frozen base weights in bfloat16, LoRA weights and AdamW state in
   float32 (PEFT upcasts adapters), forward under bf16 autocast, loss in float32. Halves the base
   model's memory and keeps the trainable parameters' updates exact; no loss scaling is needed for
   bf16. float16 is refused (it would need a grad scaler).
6. Checkpoints every `cfg.checkpoint_every` optimizer steps in out_dir/checkpoints/step-N: adapter,
   optimizer, scheduler, RNG states, data position and the loss curve so far; written into a temp
   folder, manifest.json last, then renamed into place. A call with the same out_dir (and the same
   inputs, checked by a fingerprint) resumes from the last complete checkpoint and ends with the same
   adapter as an uninterrupted run (the data plan is a pure function of the seed; RNG states are
   restored for dropout).
7. The final adapter goes to out_dir/adapter (PEFT save_pretrained, atomically), metrics.json last;
   checkpoints are then removed. A call on a finished out_dir returns the stored result.

torch, transformers and peft are imported inside the functions so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stillhouse.storage.parquet_io import write_json_atomic
from stillhouse.tasks.backends.base import accepting_info
from stillhouse.tasks.config import LoraConfig, TrainingConfig
from stillhouse.tasks.training.loss import IGNORE_INDEX, combine_token_nll, weighted_completion_loss
from stillhouse.tasks.models.resolve import resolve_device, resolve_dtype
from stillhouse.tasks.training.checkpoints import (
    ADAPTER_DIR,
    MANIFEST_FILE,
    CHECKPOINTS_DIR,
    complete_checkpoints,
    inputs_fingerprint,
    load_checkpoint,
    save_adapter,
    save_checkpoint,
)
from stillhouse.tasks.training.data import TrainExample, collate, encode_examples, load_examples, plan_micro_batches


log = logging.getLogger(__name__)

# progress(step, total_steps, tokens=, loss=): called after every optimizer step (and after a due
# checkpoint) with the step's non-padding tokens and its loss (the backends' Progress, base.py).
Progress = Callable[..., None]

METRICS_FILE = "metrics.json"


@dataclass
class TrainResult:
    adapter_dir: Path
    loss_curve: list[tuple[int, float]]  # (optimizer step, weighted loss of that step)
    tokens_per_s: float  # non-padding tokens through forward+backward per second of the loop
    samples_used: int
    samples_skipped_zero_weight: int
    samples_truncated: int  # cut at max_length but kept
    steps: int
    train_seconds: float
    samples_skipped_too_long: int = 0  # prompt alone reaches max_length: no completion token left
    tokens: int = 0
    resumed_from_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adapter_dir"] = str(self.adapter_dir)
        d["loss_curve"] = [[int(s), float(v)] for s, v in self.loss_curve]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainResult:
        d = dict(d)
        d["adapter_dir"] = Path(d["adapter_dir"])
        d["loss_curve"] = [(int(s), float(v)) for s, v in d["loss_curve"]]
        return cls(**d)


# --------------------------------------------------------------------------- model


def load_base(base_model_path: str | Path, torch_dtype, device: str):
    import transformers
    from transformers import AutoModelForCausalLM

    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype": torch_dtype} if major >= 5 else {"torch_dtype": torch_dtype}
    model = AutoModelForCausalLM.from_pretrained(str(base_model_path), **kw)
    model.config.use_cache = False
    return model.to(device)


def match_target_modules(model, wanted: Sequence[str]) -> list[str]:
    """The entries of `wanted` that name at least one Linear module (PEFT's suffix rule)."""
    import torch

    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    found = [k for k in wanted if any(n == k or n.endswith("." + k) for n in linear)]
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(
            f"none of the LoRA target_modules {list(wanted)} matches a Linear module of "
            f"{type(model).__name__}; its Linear module names are {leaves}"
        )
    if len(found) < len(wanted):
        log.warning("LoRA target_modules %s not in the model; using %s",
                    sorted(set(wanted) - set(found)), found)
    return found


def wrap_lora(model, lora: LoraConfig, init_adapter: Path | None):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if init_adapter is not None:
        peft_model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        got = peft_model.peft_config["default"]
        if got.r != lora.rank or got.lora_alpha != lora.alpha:
            log.warning("init adapter %s has r=%s alpha=%s; config asks r=%s alpha=%s (the adapter's shape wins)",
                        init_adapter, got.r, got.lora_alpha, lora.rank, lora.alpha)
        return peft_model
    targets = match_target_modules(model, lora.target_modules)
    pcfg = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, pcfg)


def _supports_mask_logits(model) -> bool:
    """Whether forward(logits_to_keep=<bool [B, T]>) returns logits of just those positions."""
    import inspect

    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401  (transformers >= 5)
    except ImportError:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def batch_loss(model, ids, mask, labels, weights, *, normalizer=None, reduction="samples", negative="nll",
               mask_logits=True):
    """Forward one micro-batch and return the weighted loss (see stillhouse.tasks.training.loss)."""
    import torch

    if mask_logits:
        # Logit rows only where a label follows: position t predicts token t+1.
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False)
        logits = out.logits
        if logits.dim() == 2:
            import torch.nn.functional as F

            targets = labels[:, 1:][keep[:, :-1]]
            token_nll = F.cross_entropy(logits.float(), targets, reduction="none")
            sample_index = keep.nonzero(as_tuple=True)[0]
            counts = keep.sum(dim=1)
            return combine_token_nll(token_nll, sample_index, counts, weights, reduction=reduction,
                                     normalizer=normalizer, negative=negative)
        # A model that ignored the mask: fall through with the full logits it returned.
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return weighted_completion_loss(logits, labels, weights, reduction=reduction, normalizer=normalizer,
                                    negative=negative)


# --------------------------------------------------------------------------- training


def _scheduler_name(schedule: str, warmup: int) -> str:
    if schedule == "constant":
        return "constant_with_warmup" if warmup else "constant"
    return schedule  # "linear", "cosine": transformers' names, warmup included


def finished_result(out_dir: str | Path) -> TrainResult | None:
    """The result of a finished training in `out_dir` without loading any model, else None."""
    out_dir = Path(out_dir)
    metrics_path = out_dir / METRICS_FILE
    if not (metrics_path.is_file() and (out_dir / ADAPTER_DIR).is_dir()):
        return None
    return TrainResult.from_dict(json.loads(metrics_path.read_text())["result"])


def train_lora(
    base_model_path: str | Path,
    examples: Sequence[TrainExample] | str | Path,
    out_dir: str | Path,
    cfg: TrainingConfig,
    lora: LoraConfig,
    *,
    init_adapter: str | Path | None = None,
    progress: Progress | None = None,
    dtype: str = "auto",
    device: str = "auto",
    prompt_special_tokens: bool | None = None,
) -> TrainResult:
    """Train a LoRA adapter on (prompt, completion, weight) samples with the weighted loss.

    base_model_path: a local HF model folder (or hub id); prepared names are resolved by the caller.
    examples: TrainExample list or a Parquet file with prompt, completion, weight columns.
    out_dir: gets adapter/, metrics.json and (while running) checkpoints/; calling again with the
        same out_dir and inputs resumes from the last checkpoint or returns the finished result.
    init_adapter: a previous round's adapter to continue training (loaded trainable) instead of a
        fresh LoRA (then `lora`'s rank/alpha are the adapter's own).
    progress: progress(step, total_steps, tokens=, loss=) after each optimizer step; an exception raised from it
        stops training (the last checkpoint stays usable).
    prompt_special_tokens: BOS handling of the prompt (see `encode_examples`).
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    init_adapter = Path(init_adapter) if init_adapter is not None else None
    progress = accepting_info(progress)
    examples = load_examples(examples)
    negative = cfg.negative_loss
    fingerprint = inputs_fingerprint(base_model_path, examples, cfg, lora, init_adapter, negative, prompt_special_tokens)

    metrics_path = out_dir / METRICS_FILE
    if metrics_path.is_file() and (out_dir / ADAPTER_DIR).is_dir():
        stored = json.loads(metrics_path.read_text())
        if stored.get("fingerprint") != fingerprint:
            raise ValueError(f"{out_dir} holds a finished training run on different inputs; use a fresh out_dir")
        log.info("training in %s already finished; returning its result", out_dir)
        return TrainResult.from_dict(stored["result"])

    # 1. weights as given; drop zeros before anything is tokenized.
    bad = [i for i, e in enumerate(examples) if not math.isfinite(float(e.weight))]
    if bad:
        raise ValueError(f"{len(bad)} samples have a non-finite weight (first at index {bad[0]})")
    kept = [e for e in examples if float(e.weight) != 0.0]
    skipped_zero = len(examples) - len(kept)

    from transformers import AutoTokenizer, get_scheduler

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_path))
    enc = encode_examples(tokenizer, kept, cfg.max_length, prompt_special_tokens=prompt_special_tokens)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    budget = cfg.max_steps * cfg.grad_accum if cfg.max_steps else None
    plan = plan_micro_batches([len(s) for s in enc.input_ids], cfg.batch_size, cfg.epochs, cfg.seed, budget)
    total_steps = math.ceil(len(plan) / cfg.grad_accum)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev, training=True)
    autocast = (
        torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16)
        if torch_dtype == torch.bfloat16
        else contextlib.nullcontext()
    )
    pad_to = 8 if dev.startswith("cuda") else 1

    ckpt_root = out_dir / CHECKPOINTS_DIR
    for stale in ckpt_root.glob(".tmp-*") if ckpt_root.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
    checkpoints = complete_checkpoints(ckpt_root)

    # The caller's RNG streams are left as they were; everything in here is seeded from cfg.seed.
    fork_devices = [torch.cuda.current_device()] if dev.startswith("cuda") else []
    with torch.random.fork_rng(devices=fork_devices):
        random_state = random.getstate()
        try:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            model = wrap_lora(load_base(base_model_path, torch_dtype, dev), lora, init_adapter)
            if cfg.gradient_checkpointing:
                # Non-reentrant checkpointing: gradients reach the LoRA weights even though the
                # frozen embeddings' outputs do not require grad (the reentrant kind needs a hook).
                base = model.get_base_model()
                if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x name
                    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise RuntimeError("the LoRA model has no trainable parameters")
            n_train = sum(p.numel() for p in params)
            opt_kw = {"fused": True} if dev.startswith("cuda") else {}
            optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **opt_kw)
            scheduler = get_scheduler(_scheduler_name(cfg.schedule, warmup), optimizer,
                                      num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))

            state: dict[str, Any] = {"step": 0, "loss_curve": [], "tokens": 0, "train_seconds": 0.0}
            resumed_from = None
            if checkpoints:
                step_n, ckpt = checkpoints[-1]
                manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
                if manifest.get("fingerprint") != fingerprint:
                    raise ValueError(f"{ckpt} was written for different inputs; use a fresh out_dir")
                state = load_checkpoint(ckpt, model, optimizer, scheduler)
                resumed_from = step_n
                log.info("resuming from %s (step %d of %d)", ckpt, step_n, total_steps)

            log.info(
                "LoRA training: %d samples (%d zero-weight dropped, %d truncated, %d too long), "
                "%d micro-batches, %d steps, %d trainable params, %s %s",
                len(enc.input_ids), skipped_zero, enc.truncated, enc.skipped_too_long, len(plan),
                total_steps, n_train, dev, str(torch_dtype).replace("torch.", ""),
            )
            if not plan:
                log.warning("no sample with a non-zero weight and a completion token: saving the initial adapter")

            mask_logits = _supports_mask_logits(model)
            probing = True
            model.train()
            loss_curve = [tuple(x) for x in state["loss_curve"]]
            tokens = int(state["tokens"])
            padded = int(state.get("padded_tokens", 0))
            seconds = float(state["train_seconds"])
            log_every = max(1, total_steps // 20)
            for step in range(int(state["step"]), total_steps):
                t0 = time.perf_counter()
                micro = plan[step * cfg.grad_accum : (step + 1) * cfg.grad_accum]
                # The step's samples or completion tokens: independent of the weights' values.
                if cfg.loss_normalizer == "tokens":
                    # Labelled (predicted) tokens: position 0 is never a target.
                    norm = sum(len(enc.input_ids[i]) - max(enc.prompt_lens[i], 1) for mb in micro for i in mb)
                else:
                    norm = sum(len(mb) for mb in micro)
                step_loss = torch.zeros((), device=dev)
                step_tokens = 0
                for mb in micro:
                    cpu_batch = collate(enc, mb, pad_id, pad_to)
                    step_tokens += int(cpu_batch[1].sum())  # counted on the CPU copy: no device sync
                    padded += cpu_batch[1].numel()
                    ids, mask, labels, weights = (t.to(dev, non_blocking=True) for t in cpu_batch)
                    with autocast:
                        try:
                            loss = batch_loss(model, ids, mask, labels, weights, normalizer=norm,
                                              reduction=cfg.loss_normalizer, negative=negative,
                                              mask_logits=mask_logits)
                        except (TypeError, RuntimeError, IndexError) as err:
                            if not (mask_logits and probing):
                                raise
                            # A model whose forward does not take a boolean logits_to_keep: full logits.
                            log.warning("masked logits unsupported by %s (%s); computing all logits",
                                        type(model.get_base_model()).__name__, err)
                            mask_logits = False
                            loss = batch_loss(model, ids, mask, labels, weights, normalizer=norm,
                                              reduction=cfg.loss_normalizer, negative=negative,
                                              mask_logits=False)
                        probing = False
                    loss.backward()
                    step_loss += loss.detach()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_value = float(step_loss)
                seconds += time.perf_counter() - t0
                tokens += step_tokens
                loss_curve.append((step + 1, loss_value))
                if not math.isfinite(loss_value):
                    log.warning("step %d: non-finite loss %s", step + 1, loss_value)
                if (step + 1) % log_every == 0 or step + 1 == total_steps:
                    log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3f tok/s %.0f", step + 1, total_steps,
                             loss_value, scheduler.get_last_lr()[0], float(grad_norm), tokens / max(seconds, 1e-9))
                if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total_steps:
                    save_checkpoint(ckpt_root, step + 1, model, optimizer, scheduler, {
                        "step": step + 1, "next_micro_batch": (step + 1) * cfg.grad_accum,
                        "loss_curve": [list(x) for x in loss_curve], "tokens": tokens, "padded_tokens": padded,
                        "train_seconds": seconds, "fingerprint": fingerprint, "total_steps": total_steps,
                    })
                if progress is not None:
                    progress(step + 1, total_steps, tokens=step_tokens, loss=loss_value)

            adapter_dir = save_adapter(model, out_dir)
        finally:
            random.setstate(random_state)

    result = TrainResult(
        adapter_dir=adapter_dir,
        loss_curve=loss_curve,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        samples_used=len(enc.input_ids),
        samples_skipped_zero_weight=skipped_zero,
        samples_truncated=enc.truncated,
        steps=total_steps,
        train_seconds=seconds,
        samples_skipped_too_long=enc.skipped_too_long,
        tokens=tokens,
        resumed_from_step=resumed_from,
        extra={"trainable_params": n_train, "device": dev, "dtype": str(torch_dtype).replace("torch.", ""),
               "warmup_steps": warmup, "padded_tokens": padded, "micro_batches": len(plan), "negative": negative},
    )
    write_json_atomic({"fingerprint": fingerprint, "result": result.to_dict()}, metrics_path)
    shutil.rmtree(ckpt_root, ignore_errors=True)
    return result
