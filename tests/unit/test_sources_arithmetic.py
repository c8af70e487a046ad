"""The built-in arithmetic source: seeded, split by story template, answers that are the arithmetic."""

import json

import pytest

from stillhouse.tasks.config import SourceConfig
from stillhouse.tasks.sources import load_problems

pytestmark = pytest.mark.unit


def _load(**kw):
    return load_problems([SourceConfig(kind="arithmetic", **kw)])


def test_split_by_template_never_by_instance():
    res = _load(eval_templates=4, instances_per_template=3, seed=1)
    templates = {s: {json.loads(p.meta)["template_id"] for p in res.problems if p.split == s} for s in ("train", "eval")}
    assert len(templates["eval"]) == 4 and templates["train"]
    assert not templates["train"] & templates["eval"]
    assert not res.skipped


@pytest.mark.parametrize("ops, steps", [(["add", "sub"], 1), (["add", "sub", "mul"], 2), (["add"], 3)])
def test_reference_answer_is_the_arithmetic_of_the_operands(ops, steps):
    for p in _load(operations=ops, steps=steps, max_operand=12, instances_per_template=2).problems:
        meta = json.loads(p.meta)
        value, operands = None, meta["operands"]
        assert len(meta["operations"]) == steps and set(meta["operations"]) <= set(ops)
        value = operands[0]
        for op, x in zip(meta["operations"], operands[1:]):
            value = {"add": value + x, "sub": value - x, "mul": value * x}[op]
        assert int(p.answer) == value and value >= 1
        assert p.question.rstrip().endswith("?")


def test_seeded_and_stable():
    a, b, c = _load(seed=3), _load(seed=3), _load(seed=4)
    assert [p.id for p in a.problems] == [p.id for p in b.problems]
    assert [p.question for p in a.problems] != [p.question for p in c.problems]


def test_mul_only_multi_step_is_rejected():
    with pytest.raises(ValueError, match="mul"):
        SourceConfig(kind="arithmetic", operations=["mul"], steps=2)
