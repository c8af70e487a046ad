"""Experiment files: every shipped one loads; arms are paired (same teacher inputs within a seed);
the budget is equal; bad files name the arm and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stillhouse.tasks.config import ConfigError
from stillhouse.tasks.experiment.spec import deep_merge, expand_dotted, load_experiment

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
# What shapes the teacher's samples: arms of one seed must agree on all of it to share them.
TEACHER_INPUTS = ("teacher", "sampling", "prompts", "problems")


def test_the_shipped_experiments_are_there():
    names = {p.stem for p in EXPERIMENTS}
    assert {"smoke", "advdistill-cpu", "fdd-cpu", "advdistill-gsm8k", "fdd-gsm8k"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_shipped_experiment_loads_with_paired_arms_and_equal_budget(path, tmp_path):
    exp = load_experiment(path, workdir=str(tmp_path / "exp"))
    c = exp.config
    assert c.control in c.arms or c.control == "base"
    for seed in c.seeds:
        runs = [exp.runs[(a, seed)] for a in c.arms]
        first_round = [r.section_dict(*TEACHER_INPUTS) for r in runs]
        assert all(x == first_round[0] for x in first_round), "arms of a seed must share the teacher's inputs"
        assert {r.cache_dir for r in runs} == {str(tmp_path / "exp" / "cache")}
        assert len({r.workdir for r in runs}) == len(runs)
        assert all(r.sampling.seed == seed and r.training.seed == seed for r in runs)
        if c.optimizer_steps is not None:
            # Equal budget: total optimizer steps over the run are the same for every arm.
            totals = {r.rounds * (r.training.max_steps or 0) for r in runs}
            assert len(totals) == 1 and totals != {0}, totals


def _write(tmp_path, data, base=None) -> Path:
    base_path = tmp_path / "base.yaml"
    base_path.write_text((REPO / "configs" / "smoke.yaml").read_text() if base is None else yaml.safe_dump(base))
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": "base.yaml", **data}))
    return path


def _arms(**arms):
    return {name: {"overrides": o} for name, o in arms.items()}


def test_overrides_apply_base_then_arm_and_dotted_equals_nested(tmp_path):
    path = _write(tmp_path, {
        "overrides": {"rounds": 1, "training": {"learning_rate": 0.001}},
        "arms": _arms(a={"weighting.scheme": "uniform"}, b={"weighting": {"scheme": "rft"}},
                      c={"training.learning_rate": 0.01}),
        "control": "a", "seeds": [3, 4], "optimizer_steps": 7,
    })
    exp = load_experiment(path, workdir=str(tmp_path / "w"))
    a, b, c = (exp.runs[(x, 4)] for x in "abc")
    assert (a.weighting.scheme, b.weighting.scheme, c.weighting.scheme) == ("uniform", "rft", "group_advantage")
    assert a.rounds == b.rounds == 1
    assert a.training.learning_rate == 0.001 and c.training.learning_rate == 0.01
    assert a.training.max_steps == 7 and a.training.batch_size == 8  # smoke's value kept
    assert a.run_name == "t-a-seed4" and a.workdir == str(tmp_path / "w" / "arms" / "a" / "seed-4")
    assert exp.arm_order() == ["base", "a", "b", "c"]


def test_an_arm_may_set_its_own_step_budget(tmp_path):
    path = _write(tmp_path, {"arms": _arms(a={}, b={"training.max_steps": 9}), "control": "a",
                             "optimizer_steps": 3})
    exp = load_experiment(path)
    assert exp.runs[("a", 0)].training.max_steps == 3 and exp.runs[("b", 0)].training.max_steps == 9


@pytest.mark.parametrize("data,message", [
    ({"arms": _arms(a={"weighting.scheme": "best"}), "control": "a"}, r"(?s)arm a, seed 0.*weighting\.scheme"),
    ({"arms": _arms(a={"sampling.seed": 5}), "control": "a"}, r"arms\.a\.overrides: sampling\.seed is set by the experiment"),
    ({"arms": _arms(a={}), "overrides": {"workdir": "x"}, "control": "a"}, r"overrides: workdir is set by"),
    ({"arms": _arms(a={}), "control": "b"}, r"control 'b' is not one of the arms"),
    ({"arms": _arms(base={}), "control": "base"}, r"'base' is reserved"),
    ({"arms": _arms(**{"a/b": {}}), "control": "a/b"}, r"arm name 'a/b'"),
    ({"arms": _arms(a={}), "control": "a", "seeds": [1, 1]}, r"seeds repeat"),
    ({"arms": _arms(a={}), "control": "a", "colour": 1}, r"colour: Extra inputs"),
    ({"arms": _arms(a={"evaluation.pool_k": 0, "rounds": 2}), "control": "a"}, r"(?s)arm a.*pool_k: 0"),
])
def test_bad_experiments_name_the_file_arm_and_field(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_experiment(_write(tmp_path, data))
    assert str(tmp_path / "exp.yaml") in str(err.value)


def test_missing_base_names_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": "nope.yaml", "arms": _arms(a={}), "control": "a"}))
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_experiment(path)


def test_expand_dotted_and_deep_merge():
    assert expand_dotted({"a.b": 1, "a.c": 2, "d": {"e.f": 3}}) == {"a": {"b": 1, "c": 2}, "d": {"e": {"f": 3}}}
    base = {"a": {"b": 1, "c": [1, 2]}, "x": 0}
    merged = deep_merge(base, {"a": {"c": [3]}})
    assert merged == {"a": {"b": 1, "c": [3]}, "x": 0} and base["a"]["c"] == [1, 2]  # lists replace; no aliasing
