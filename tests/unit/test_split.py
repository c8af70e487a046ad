"""Easy / hard / mid split against hand-computed labels, boundaries included."""

import math

import pytest

from stillhouse.tasks.config import SplitConfig
from stillhouse.tasks.problems import Problem
from stillhouse.tasks.split import split_by_pass_rate

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("rate", "label"),
    [
        (1.0, "easy"),
        (0.75, "easy"),  # == easy threshold -> easy
        (0.7499, "mid"),
        (0.5, "mid"),
        (0.2501, "mid"),
        (0.25, "hard"),  # == hard threshold -> hard
        (0.0, "hard"),
    ],
)
def test_labels_at_default_thresholds(rate, label):
    cfg = SplitConfig()  # easy 0.75, hard 0.25
    res = split_by_pass_rate({"p": rate}, cfg.easy_threshold, cfg.hard_threshold)
    assert res.labels == {"p": label}


def test_k_sample_fractions_hit_the_boundaries_exactly():
    # pool_k = 4 -> rates 0, 1/4, 2/4, 3/4, 1; pool_k = 10 with threshold 0.7 / 0.3
    rates = {f"q{c}": c / 4 for c in range(5)}
    res = split_by_pass_rate(rates, 0.75, 0.25)
    assert res.labels == {"q0": "hard", "q1": "hard", "q2": "mid", "q3": "easy", "q4": "easy"}
    assert res.counts == {"easy": 2, "hard": 2, "mid": 1}

    res10 = split_by_pass_rate({f"r{c}": c / 10 for c in range(11)}, 0.7, 0.3)
    assert res10.counts == {"easy": 4, "hard": 4, "mid": 3}  # 7..10 easy, 0..3 hard, 4..6 mid
    assert res10.labels["r7"] == "easy" and res10.labels["r3"] == "hard"


def test_counts_cover_every_label_and_ids_keep_order():
    res = split_by_pass_rate({"b": 1.0, "a": 1.0, "c": 0.5}, 0.75, 0.25)
    assert res.counts == {"easy": 2, "hard": 0, "mid": 1}
    assert res.ids("easy") == ["b", "a"]
    assert res.ids("hard") == []
    assert sum(res.counts.values()) == len(res.labels)


def test_empty_pool():
    res = split_by_pass_rate({}, 0.75, 0.25)
    assert res.labels == {} and res.counts == {"easy": 0, "hard": 0, "mid": 0}


def test_extreme_thresholds():
    # easy only at a perfect score, hard only at zero: everything else is mid
    res = split_by_pass_rate({"a": 1.0, "b": 0.99, "c": 0.01, "d": 0.0}, 1.0, 0.0)
    assert res.labels == {"a": "easy", "b": "mid", "c": "mid", "d": "hard"}


def test_select_problems_by_label():
    probs = [Problem.make(f"What is {i} + 1?", str(i + 1), source="t") for i in range(3)]
    rates = {probs[0].id: 1.0, probs[1].id: 0.0, probs[2].id: 0.5}
    res = split_by_pass_rate(rates, 0.75, 0.25)
    assert res.select(probs, "easy") == [probs[0]]
    assert res.select(probs, "hard") == [probs[1]]
    assert res.select(probs, "mid") == [probs[2]]


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_bad_pass_rate_is_an_error(bad):
    with pytest.raises(ValueError, match="pass rate"):
        split_by_pass_rate({"p": bad}, 0.75, 0.25)


@pytest.mark.parametrize(("easy", "hard"), [(0.5, 0.5), (0.3, 0.6), (1.2, 0.1), (0.7, -0.1)])
def test_bad_thresholds_are_an_error(easy, hard):
    with pytest.raises(ValueError):
        split_by_pass_rate({"p": 0.5}, easy, hard)
