"""Does a problem's prompt fit the models that will read it? Checked before any model work.

A problem whose prompt is longer than a model's context cannot be sampled: transformers tries to
allocate attention for the whole prompt (a 1 MB question asked for ~1 TB) and crashes the step with
no row named, and since the problem stays in the catalog's pool, every resume crashes the same
way. `unfit_problems` finds such problems so that the run can quarantine them (storage's
`quarantine` table) with the reason, and go on with the rest.

The budget of a prompt is the model's context length minus the tokens it is asked to generate.
The context length comes from the model's config (`max_position_embeddings` and its aliases), or
`max_model_len` for vLLM; for the openai backend it is unknown and nothing is checked. Prompts are
rendered exactly as the backends render them (chat template, or the plain-text fallback) and
tokenized with the model's tokenizer; a question so long that it cannot fit even at one token per
`_MAX_CHARS_PER_TOKEN` characters is refused without tokenizing it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# No tokenizer in use packs more characters than this into one token (BPE vocabularies top out at
# ~10-20 for long repeated words); beyond it the prompt cannot fit, tokenizing it is not needed.
_MAX_CHARS_PER_TOKEN = 32
_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclass(frozen=True)
class PromptBudget:
    """One model reading the problems: its name (for messages), its context length, the tokens it
    generates after the prompt, how a problem becomes its prompt, and how a prompt is counted."""

    who: str
    context: int
    new_tokens: int
    render: Callable[[Any], str]
    count: Callable[[Sequence[str]], list[int]]

    @property
    def max_prompt_tokens(self) -> int:
        return self.context - self.new_tokens


def unfit_problems(problems: Iterable[Any], budgets: Sequence[PromptBudget]) -> dict[str, str]:
    """problem id -> why its prompt does not fit one of the budgets (problems that fit are absent).

    >>> budget = PromptBudget("teacher", 16, 4, render=lambda p: p.question,
    ...                       count=lambda texts: [len(t.split()) for t in texts])
    >>> from types import SimpleNamespace as P
    >>> unfit_problems([P(id="a", question="two words"), P(id="b", question="w " * 20)], [budget])
    {'b': 'teacher prompt 20 tokens + 4 new > context 16'}
    """
    problems = list(problems)
    out: dict[str, str] = {}
    for budget in budgets:
        todo = []
        for p in problems:
            if p.id in out:
                continue
            if len(p.question) > budget.context * _MAX_CHARS_PER_TOKEN:
                out[p.id] = (f"{budget.who} prompt of {len(p.question):,} characters cannot fit "
                             f"context {budget.context:,} (+ {budget.new_tokens} new tokens)")
            else:
                todo.append(p)
        if not todo:
            continue
        counts = budget.count([budget.render(p) for p in todo])
        for p, n in zip(todo, counts, strict=True):
            if n > budget.max_prompt_tokens:
                out[p.id] = f"{budget.who} prompt {n:,} tokens + {budget.new_tokens} new > context {budget.context:,}"
    return out


def context_length(model: Any, path: str) -> int | None:
    """A model's context length in tokens, or None when it cannot be known here (openai backend,
    a config without a length)."""
    if model.backend == "openai":
        return None
    if model.backend == "vllm" and model.max_model_len:
        return int(model.max_model_len)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, revision=model.revision)
    except (OSError, ValueError) as err:
        log.warning("prompt length check skipped for %s: cannot read its config (%s)", path, err)
        return None
    for attr in _CONTEXT_ATTRIBUTES:
        value = getattr(config, attr, None) or getattr(getattr(config, "text_config", None), attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def hf_budget(who: str, model: Any, path: str, new_tokens: int, messages: Callable[[Any], Any]) -> PromptBudget | None:
    """The budget of a transformers/vLLM model: its tokenizer renders and counts the prompts as the
    backends do (chat template with special tokens inside, or plain text with them added)."""
    context = context_length(model, path)
    if context is None:
        return None
    from stillhouse.tasks.models.resolve import load_tokenizer
    from stillhouse.tasks.prompts import has_chat_template, render_prompt

    tok = load_tokenizer(path, revision=model.revision)
    special = not has_chat_template(tok, model.chat_template)

    def count(texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in tok(list(texts), add_special_tokens=special)["input_ids"]]

    return PromptBudget(who, context, new_tokens, lambda p: render_prompt(tok, messages(p), model.chat_template), count)
