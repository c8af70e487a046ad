"""Prompt building: messages from PromptsConfig, template rendering and the plain-text fallback."""

from __future__ import annotations

import pytest

from stillhouse.tasks.config import PromptsConfig
from stillhouse.tasks.problems import Problem
from stillhouse.tasks.prompts import (
    PLAIN_TEXT_STOP,
    fill,
    harder_messages,
    has_chat_template,
    plain_text_prompt,
    render_prompt,
    similar_messages,
    solve_messages,
)

pytestmark = pytest.mark.unit


class StubTokenizer:
    """Records apply_chat_template calls; renders a ChatML-like string."""

    def __init__(self, chat_template: str | None = "stub-template"):
        self.chat_template = chat_template
        self.calls: list[dict] = []

    def apply_chat_template(self, messages, chat_template=None, tokenize=True, add_generation_prompt=False):
        self.calls.append(
            dict(messages=messages, chat_template=chat_template, tokenize=tokenize,
                 add_generation_prompt=add_generation_prompt)
        )
        body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")


def test_solve_default_template_fills_question_and_keeps_boxed_braces():
    msgs = solve_messages("What is 2 + 3?", PromptsConfig())
    assert msgs == (
        {"role": "user", "content": PromptsConfig().solve.format(question="What is 2 + 3?")},
    )
    assert "\\boxed{}" in msgs[0]["content"] and msgs[0]["content"].endswith("What is 2 + 3?")


def test_solve_with_system_and_few_shot_turns_in_order():
    cfg = PromptsConfig(system="Be brief.", solve="Q: {question}", few_shot=[("1+1?", "2"), ("2+2?", "4")])
    msgs = solve_messages("3+3?", cfg)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in msgs] == ["Be brief.", "Q: 1+1?", "2", "Q: 2+2?", "4", "Q: 3+3?"]


def test_question_text_with_braces_is_not_reformatted():
    msgs = solve_messages("Is {x} = {0}? {question}", PromptsConfig(solve="Q: {question}"))
    assert msgs[-1]["content"] == "Q: Is {x} = {0}? {question}"


def test_harder_and_similar_take_problem_or_text():
    p = Problem.make("Ann has 3 pens and buys 2. How many?", "5", "t")
    cfg = PromptsConfig(system="sys")
    h = harder_messages(p, cfg)
    s = similar_messages(p.question, cfg)
    assert h[0] == {"role": "system", "content": "sys"} and h[1]["role"] == "user"
    assert p.question in h[1]["content"] and "harder" in h[1]["content"]
    assert p.question in s[1]["content"] and "similar" in s[1]["content"]
    assert harder_messages(p.question, cfg) == h


@pytest.mark.parametrize("template", ["{answer}", "{question.__class__}", "{question[0]}", "{}"])
def test_fill_rejects_unknown_or_computed_fields(template):
    with pytest.raises(ValueError, match="template field"):
        fill(template, question="q")


def test_render_uses_tokenizer_template_with_generation_prompt():
    tok = StubTokenizer()
    msgs = solve_messages("2+2?", PromptsConfig(solve="{question}"))
    out = render_prompt(tok, msgs)
    assert out == "<user>2+2?</user><assistant>"
    call = tok.calls[-1]
    assert call["tokenize"] is False and call["add_generation_prompt"] is True
    assert call["chat_template"] is None and call["messages"] == [dict(m) for m in msgs]


def test_render_override_template_wins_even_without_tokenizer_template():
    tok = StubTokenizer(chat_template=None)
    assert has_chat_template(tok, "custom") and not has_chat_template(tok)
    render_prompt(tok, ({"role": "user", "content": "x"},), chat_template="custom")
    assert tok.calls[-1]["chat_template"] == "custom"


def test_plain_text_fallback_when_no_template():
    tok = StubTokenizer(chat_template=None)
    cfg = PromptsConfig(system="Solve it.", solve="{question}", few_shot=[("1+1?", "2")])
    out = render_prompt(tok, solve_messages("3+3?", cfg))
    assert tok.calls == []
    assert out == "Solve it.\n\nQuestion: 1+1?\nAnswer: 2\n\nQuestion: 3+3?\nAnswer:"
    assert PLAIN_TEXT_STOP == ("\nQuestion:",)


def test_plain_text_fallback_needs_a_final_user_turn():
    with pytest.raises(ValueError):
        plain_text_prompt(({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}))
    with pytest.raises(ValueError):
        plain_text_prompt(({"role": "tool", "content": "q"},))
