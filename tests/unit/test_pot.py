"""Program-of-thought pieces that need no sandbox: program extraction and the pot config."""

import pytest

from stillhouse.tasks.config import ConfigError, parse_config
from stillhouse.tasks.prompts import POT_FEW_SHOT, POT_SOLVE, solve_messages
from stillhouse.tasks.verify.programs import extract_program

pytestmark = pytest.mark.unit

MINIMAL = {
    "problems": [{"kind": "jsonl", "path": "p.jsonl"}],
    "teacher": {"name_or_path": "t"},
    "student": {"model": {"name_or_path": "s"}},
}


@pytest.mark.parametrize("response, program", [
    ("```python\nprint(1)\n```", "print(1)\n"),
    ("First:\n```python\nprint(1)\n```\nBetter:\n```python\nprint(2)\n```\nDone", "print(2)\n"),
    ("```py\nx = 3\nprint(x)\n```", "x = 3\nprint(x)\n"),
    # a language-less fence counts when there is no python one; a python one wins over it
    ("```\nprint(4)\n```", "print(4)\n"),
    ("```python\nprint(5)\n```\n```\n5\n```", "print(5)\n"),
    # cut at the token limit inside the block: the code so far
    ("```python\nprint(6)\nprint(", "print(6)\nprint("),
    # no fence: the whole response is the program
    ("print(7)", "print(7)"),
    ("", ""),
], ids=["one", "last-of-two", "py", "bare-fence", "python-wins", "unclosed", "no-fence", "empty"])
def test_extract_program(response, program):
    assert extract_program(response) == program


def test_pot_config_gets_pot_prompts_unless_it_names_its_own():
    cfg = parse_config({**MINIMAL, "verifier": {"rationale": "pot"}})
    assert cfg.prompts.solve == POT_SOLVE
    assert [tuple(p) for p in cfg.prompts.few_shot] == list(POT_FEW_SHOT)
    msgs = solve_messages("Ann has 2 pens.", cfg.prompts)
    assert "```python" in msgs[1]["content"] and "Ann has 2 pens." in msgs[-1]["content"]
    own = parse_config({**MINIMAL, "verifier": {"rationale": "pot"},
                        "prompts": {"solve": "Program for: {question}"}})
    assert own.prompts.solve == "Program for: {question}" and own.prompts.few_shot
    cot = parse_config(MINIMAL)
    assert cot.verifier.rationale == "cot" and "boxed" in cot.prompts.solve


@pytest.mark.parametrize("field, value", [("rationale", "code"), ("sandbox", {"min_level": 4}),
                                          ("sandbox", {"workers": 0}), ("sandbox", {"typo": 1})])
def test_bad_pot_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"verifier.{field}"):
        parse_config({**MINIMAL, "verifier": {field: value}})
