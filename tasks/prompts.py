"""Chat messages for every teacher/student call, and how they become a prompt string.

Messages are tuples of {"role", "content"} dicts (hashable containers are not needed, but tuples
keep a SampleRequest immutable). Templates from PromptsConfig are filled with str.format on named
fields only ({question}, {problem}); attribute or index access in a field ("{question.x}",
"{problem[0]}") is rejected, and model text is never evaluated.

Rendering uses the tokenizer's chat template (or an override) with add_generation_prompt=True.
Models without a chat template get a plain-text prompt instead:

    <system text>                       (only if a system message is given)

    Question: <few-shot question 1>
    Answer: <few-shot solution 1>

    Question: <the question>
    Answer:

Base models continue such text with "Question:" once they are done, so backends add
PLAIN_TEXT_STOP to the stop strings when they use the fallback.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

Message = dict[str, str]
Messages = tuple[Message, ...]

PLAIN_TEXT_STOP: tuple[str, ...] = ("\nQuestion:",)

_FORMATTER = string.Formatter()


def fill(template: str, **fields: str) -> str:
    """str.format restricted to plain named fields that are given; '{{' / '}}' are literal braces."""
    for _, name, _, _ in _FORMATTER.parse(template):
        if name is None:
            continue
        if name not in fields:
            known = ", ".join("{" + k + "}" for k in fields)
            raise ValueError(f"template field {{{name}}} is not one of {known}: {template!r}")
    return template.format(**fields)


def _problem_text(problem: Any) -> str:
    """A Problem's question, or the text itself."""
    return problem if isinstance(problem, str) else problem.question


def _with_system(cfg, turns: list[Message]) -> Messages:
    if cfg.system:
        turns = [{"role": "system", "content": cfg.system}, *turns]
    return tuple(turns)


def solve_messages(question: str, cfg) -> Messages:
    """System (optional), few-shot (question, solution) pairs as earlier turns, then the question."""
    turns: list[Message] = []
    for q, a in cfg.few_shot:
        turns.append({"role": "user", "content": fill(cfg.solve, question=q)})
        turns.append({"role": "assistant", "content": a})
    turns.append({"role": "user", "content": fill(cfg.solve, question=question)})
    return _with_system(cfg, turns)


def solve_requests(problems: Sequence[Any], n: int, base_seed: int, cfg, *, seed_scope: str = "") -> list:
    """n solve requests per problem (key: its id), seeded by derive_seed(base_seed, seed_scope + id, i).

    The teacher's samples use seed_scope "round-<r>/", so a problem that stays in the pool gets
    fresh samples in every round.
    """
    from stillhouse.tasks.backends.base import SampleRequest, derive_seed

    return [
        SampleRequest(p.id, i, solve_messages(p.question, cfg), derive_seed(base_seed, f"{seed_scope}{p.id}", i))
        for p in problems
        for i in range(n)
    ]


def harder_messages(problem: Any, cfg) -> Messages:
    """Ask the teacher for a harder variant of an easy problem (a Problem or its question text)."""
    return _with_system(cfg, [{"role": "user", "content": fill(cfg.harder, problem=_problem_text(problem))}])


def similar_messages(problem: Any, cfg) -> Messages:
    """Ask the teacher for a new problem of similar difficulty to a hard one."""
    return _with_system(cfg, [{"role": "user", "content": fill(cfg.similar, problem=_problem_text(problem))}])


def has_chat_template(tokenizer: Any, chat_template: str | None = None) -> bool:
    return bool(chat_template or getattr(tokenizer, "chat_template", None))


def plain_text_prompt(messages: Sequence[Message]) -> str:
    """The documented fallback for models without a chat template (see the module docstring)."""
    parts: list[str] = []
    pending_question: str | None = None
    for m in messages:
        role, content = m["role"], m["content"].strip()
        if role == "system":
            parts.append(content + "\n\n")
        elif role == "user":
            if pending_question is not None:  # two user turns in a row: keep both as questions
                parts.append(f"Question: {pending_question}\n\n")
            pending_question = content
        elif role == "assistant":
            q = pending_question if pending_question is not None else ""
            parts.append(f"Question: {q}\nAnswer: {content}\n\n")
            pending_question = None
        else:
            raise ValueError(f"unknown message role {role!r}")
    if pending_question is None:
        raise ValueError("the last message must be a user message")
    parts.append(f"Question: {pending_question}\nAnswer:")
    return "".join(parts)


def render_prompt(tokenizer: Any, messages: Sequence[Message], chat_template: str | None = None) -> str:
    """The prompt string: the chat template (override first) with a generation prompt, else plain text.

    The templated string already holds any special tokens the model wants (e.g. a BOS), so encode
    it with add_special_tokens=False; encode the plain-text fallback with add_special_tokens=True.
    """
    if has_chat_template(tokenizer, chat_template):
        return tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )
    return plain_text_prompt(messages)


# Program-of-thought (verifier.rationale: pot): the teacher writes a program that prints the answer;
# the sandbox runs it (tasks/sandbox) and its output is the answer. These are the prompts a pot
# config gets when it names no `prompts.solve` / `prompts.few_shot` of its own (RunConfig): short
# worked examples, because small models copy the shape of the examples more than the instruction.
POT_SOLVE = (
    "{question}\n\nWrite a short Python program that computes the answer and prints it as a "
    "number. Reply with the program only, in a ```python block."
)
POT_FEW_SHOT: tuple[tuple[str, str], ...] = (
    ("Kim has 4 kites. She buys 3 more kites. How many kites does Kim have now?",
     "```python\nkites = 4\nbought = 3\nprint(kites + bought)\n```"),
    ("A box holds 9 eggs. Dan uses 5 of the eggs. How many eggs are in the box now?",
     "```python\neggs = 9\nused = 5\nprint(eggs - used)\n```"),
)
