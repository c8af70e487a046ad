"""The `hf` backend: transformers `generate` in process, on CPU (float32) or CUDA (bfloat16).

Reproducible per request, whatever else is in the batch
--------------------------------------------------------
`generate(do_sample=True)` draws every row's token from one global RNG, so a sample depends on its
batch-mates and on its position. Here each request owns a torch.Generator seeded with its
`seed`, and sampling is done with the Gumbel-max trick inside a LogitsProcessor:

    scores = top_p(logits / temperature)           # the rule of generate's warpers
    token  = argmax(scores + Gumbel(0, 1) noise)   # noise from the row's own generator

argmax(log p + G) with i.i.d. standard Gumbel G is an exact sample from softmax(log p), so this is
the same distribution as multinomial sampling; `generate` itself runs greedy and takes the argmax.
Row i's t-th token always uses the t-th noise draw of its own generator, so the same (key,
sample_index, seed) gives the same text in any batch, up to float differences of the batch's
shape (padding, matmul blocking) that can flip an argmax only at a near-tie. Temperature 0 is plain
greedy decoding.

Accounting
----------
prompt_tokens counts the prompt's tokens without padding; completion_tokens counts generated tokens
up to and including the EOS, or up to the token that completed a stop string, never padding.
finish_reason is "stop" for EOS or a stop string (the text is cut before the stop string) and
"length" when max_new_tokens ran out.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path

from stillhouse.tasks.backends.base import Completion, Progress, SampleRequest, SamplingParams, accepting_info
from stillhouse.tasks.prompts import PLAIN_TEXT_STOP, has_chat_template, render_prompt

log = logging.getLogger(__name__)


def _make_gumbel_processor():
    """Build the LogitsProcessor class lazily so importing this module never imports torch."""
    import torch
    from transformers import LogitsProcessor

    class GumbelMaxSampler(LogitsProcessor):
        """Temperature, then top-p, then per-row Gumbel noise: argmax of the result is a sample."""

        # The nucleus is looked for among the top 256, then 4096 tokens (a partial top-k is far
        # cheaper than sorting a 50k vocabulary on CPU); rows whose nucleus is wider still fall
        # back to a full sort. Every path applies the same rule to the same numbers.
        candidates = (256, 4096)

        def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device):
            if temperature <= 0:
                raise ValueError("GumbelMaxSampler needs temperature > 0 (use greedy for 0)")
            self.temperature = float(temperature)
            self.top_p = float(top_p)
            self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

        def _top_p(self, scores):
            # TopPLogitsWarper's rule: in descending probability order keep a token while the mass
            # strictly above it is < top_p (so the most likely token always stays).
            probs = scores.softmax(dim=-1)
            rows = None  # None = all rows
            vocab = probs.shape[-1]
            for k in (*[c for c in self.candidates if c < vocab], vocab):
                sub = probs if rows is None else probs[rows]
                top, idx = sub.topk(k, dim=-1) if k < vocab else sub.sort(dim=-1, descending=True)
                cum = top.cumsum(dim=-1)
                cut = torch.ones_like(sub, dtype=torch.bool).scatter_(1, idx, (cum - top) >= self.top_p)
                if rows is None:
                    remove = cut
                else:
                    remove[rows] = cut
                wide = cum[:, -1] < self.top_p  # nucleus not inside the k candidates
                if k == vocab or not bool(wide.any()):
                    break
                rows = wide.nonzero().squeeze(1) if rows is None else rows[wide]
            return scores.masked_fill(remove, float("-inf"))

        def __call__(self, input_ids, scores):
            scores = scores.float() / self.temperature
            if self.top_p < 1.0:
                scores = self._top_p(scores)
            # U ~ Uniform[0, 1) per row from the row's own generator; -log(-log U) is Gumbel(0, 1).
            # U is floored at the smallest normal float so no kept token gets -inf noise.
            u = torch.empty_like(scores)
            for row, gen in enumerate(self.generators):
                torch.rand(u.shape[-1], generator=gen, device=u.device, out=u[row])
            gumbel = u.clamp_min_(torch.finfo(u.dtype).tiny).log_().neg_().log_().neg_()
            return scores + gumbel

    return GumbelMaxSampler


class HFBackend:
    """Batched, left-padded, length-sorted generate over a local folder or hub id.

    `adapter_path` merges a PEFT LoRA adapter into the weights (a student after a round).
    """

    name = "hf"

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 16,
        chat_template: str | None = None,
        revision: str | None = None,
        adapter_path: str | Path | None = None,
        models_dir: str | Path | None = None,
    ):
        from stillhouse.tasks.models.resolve import load_model_and_tokenizer, resolve_model

        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        # Prepared names ('smollm2-135m-instruct', 'tiny-llama') are built under models_dir
        # (default stillhouse.tasks.models.resolve.default_models_dir()) on first use; folders and hub ids pass through.
        model_path = resolve_model(str(model_path), models_dir)
        self.model_path = str(model_path)
        self.batch_size = batch_size
        self.chat_template = chat_template
        self.model, self.tokenizer = load_model_and_tokenizer(
            model_path, dtype=dtype, device=device, revision=revision, adapter_path=adapter_path
        )
        self.adapter_path = None if adapter_path is None else str(adapter_path)
        self.device = self.model.device
        self.uses_chat_template = has_chat_template(self.tokenizer, chat_template)
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id
        self.sampler_cls = _make_gumbel_processor()

    # ------------------------------------------------------------------ helpers

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gen_eos = self.model.generation_config.eos_token_id
        for x in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])):
            ids.append(int(x))
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        return sorted(set(ids))

    def render(self, messages) -> str:
        return render_prompt(self.tokenizer, messages, self.chat_template)

    def encode(self, messages) -> list[int]:
        text = self.render(messages)
        # A chat template already writes the special tokens the model expects.
        return self.tokenizer(text, add_special_tokens=not self.uses_chat_template)["input_ids"]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ sampling

    def sample(
        self,
        requests: list[SampleRequest],
        params: SamplingParams,
        progress: Progress | None = None,
    ) -> list[Completion]:
        total = len(requests)
        if total == 0:
            return []
        progress = accepting_info(progress)
        stops = tuple(s for s in params.stop if s)
        if not self.uses_chat_template:
            stops += tuple(s for s in PLAIN_TEXT_STOP if s not in stops)

        prompts = [self.encode(r.messages) for r in requests]
        # Longest first: similar lengths share a batch (little padding) and an OOM shows up at once.
        order = sorted(range(total), key=lambda i: -len(prompts[i]))
        results: list[Completion | None] = [None] * total
        done = 0
        for start in range(0, total, self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self._generate([prompts[i] for i in idx], [requests[i].seed for i in idx], params, stops)
            for i, (tokens, text, n_new, reason) in zip(idx, batch):
                r = requests[i]
                results[i] = Completion(
                    key=r.key,
                    sample_index=r.sample_index,
                    text=text,
                    prompt_tokens=len(prompts[i]),
                    completion_tokens=n_new,
                    finish_reason=reason,
                    extra={"seed": r.seed},
                )
            done += len(idx)
            if progress is not None:
                progress(done, total, tokens=sum(n_new for _, _, n_new, _ in batch))
        return results  # type: ignore[return-value]

    def _generate(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams, stops):
        import torch

        width = max(len(p) for p in prompts)
        pad = self.pad_id if self.pad_id is not None else self.eos_ids[0]
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)

        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,  # greedy argmax; sampling happens in the Gumbel processor
            num_beams=1,
            eos_token_id=self.eos_ids,
            pad_token_id=pad,
            # Unset the model's sampling defaults so generate does not warn or add its own warpers.
            temperature=None,
            top_p=None,
            top_k=None,
        )
        if not params.greedy:
            kwargs["logits_processor"] = [
                self.sampler_cls(seeds, params.temperature, params.top_p, self.device)
            ]
        if stops:
            kwargs["stop_strings"] = list(stops)
            kwargs["tokenizer"] = self.tokenizer
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device), **kwargs
            )
        new = out[:, width:].tolist()
        return [self._finish(row, stops) for row in new]

    def _finish(self, row: list[int], stops: tuple[str, ...]):
        """(tokens, text, completion_tokens, finish_reason) for one generated row."""
        eos = set(self.eos_ids)
        end = next((j for j, t in enumerate(row) if t in eos), None)
        body = row if end is None else row[:end]
        text = self._decode(body)
        cut = _first_stop(text, stops)
        if cut is not None:
            # Rows stopped by a stop string are padded afterwards (the pad may equal EOS), so count
            # the shortest prefix whose text already holds the stop string: monotone, bisect it.
            lo, hi = 1, len(body)
            while lo < hi:
                mid = (lo + hi) // 2
                if _first_stop(self._decode(body[:mid]), stops) is not None:
                    hi = mid
                else:
                    lo = mid + 1
            return body[:hi], text[:cut], hi, "stop"
        if end is not None:
            return row[: end + 1], text, end + 1, "stop"
        # No EOS and no stop string: max_new_tokens (or the model's own length cap) ended it.
        return row, text, len(row), "length"

    def close(self) -> None:
        """Drop the model and return its memory (CUDA cache included)."""
        if getattr(self, "model", None) is None:
            return
        on_cuda = str(self.device).startswith("cuda")
        self.model = None
        gc.collect()
        if on_cuda:
            import torch

            torch.cuda.empty_cache()

    def __enter__(self) -> HFBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
