"""The experiment's statistics, checked against what they must do (not against today's output):
an exact test's p-values from the binomial's definition, intervals that contain their estimate and
narrow with n, pairing that removes problem difficulty, and numbers that do not change on a rerun."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stillhouse.tasks.experiment.stats import accuracy_interval, mcnemar_exact, paired_difference

pytestmark = pytest.mark.unit


def _binom_two_sided(b: int, c: int) -> float:
    # P(X <= min) + P(X >= max) for X ~ Binomial(b + c, 1/2), summed term by term.
    n, lo, hi = b + c, min(b, c), max(b, c)
    p = sum(math.comb(n, k) for k in range(n + 1) if k <= lo or k >= hi) / 2**n
    return min(1.0, p)


@pytest.mark.parametrize("b,c", [(0, 0), (1, 0), (5, 5), (10, 0), (0, 10), (7, 2), (3, 12), (40, 25)])
def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(_binom_two_sided(b, c))


def test_mcnemar_reference_values():
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pair: no evidence either way
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact(4, 4) == 1.0
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)


def test_accuracy_mean_is_exact_and_inside_its_interval():
    rng = np.random.default_rng(1)
    m = rng.random((3, 40)) < 0.6
    res = accuracy_interval(m, samples=2000)
    assert res["mean"] == pytest.approx(m.mean())
    lo, hi = res["ci95"]
    assert lo <= res["mean"] <= hi
    assert (res["seeds"], res["problems"]) == (3, 40)
    assert res["per_seed"] == pytest.approx(list(m.mean(axis=1)))


def test_interval_narrows_with_more_problems_and_is_degenerate_without_variation():
    small = accuracy_interval(np.tile([1, 0], (1, 10)), samples=4000)
    large = accuracy_interval(np.tile([1, 0], (1, 250)), samples=4000)
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert width(large) < width(small) / 3  # ~1/sqrt(n): sqrt(25) = 5
    assert accuracy_interval(np.ones((2, 30)), samples=500)["ci95"] == [1.0, 1.0]


def test_seed_variation_widens_the_interval():
    # Same problem outcomes on average, but one seed's student is much better than the other's:
    # an interval over seeds and problems must be wider than one that ignores the seeds.
    rng = np.random.default_rng(2)
    good = rng.random(60) < 0.9
    bad = rng.random(60) < 0.3
    split = accuracy_interval(np.stack([good, bad]), samples=4000)
    pooled = accuracy_interval(np.concatenate([good, bad])[None, :], samples=4000)
    assert split["ci95"][1] - split["ci95"][0] > pooled["ci95"][1] - pooled["ci95"][0]


def test_identical_arms_differ_by_exactly_zero():
    rng = np.random.default_rng(3)
    m = rng.random((2, 50)) < 0.5
    d = paired_difference(m, m, samples=1000)
    assert d["mean"] == 0.0 and d["ci95"] == [0.0, 0.0]
    assert d["mcnemar_p"] is None and d["mcnemar_p_per_seed"] == [1.0, 1.0]  # 2 seeds: per seed only
    assert d["arm_better"] == d["arm_worse"] == 0 and not d["significant"]
    assert d["mde80"] > 0  # no spread observed is not a design that detects everything


def test_paired_difference_counts_and_sign():
    control = np.zeros((1, 30), dtype=bool)
    arm = control.copy()
    arm[0, :6] = True  # right on 6 problems the control gets wrong, worse on none
    d = paired_difference(arm, control, samples=2000)
    assert d["mean"] == pytest.approx(6 / 30)
    assert (d["arm_better"], d["arm_worse"]) == (6, 0)
    assert d["mcnemar_p"] == pytest.approx(2 / 2**6)
    assert d["ci95"][0] > 0 and d["significant"]
    flipped = paired_difference(control, arm, samples=2000)
    assert flipped["mean"] == pytest.approx(-d["mean"])
    assert flipped["mcnemar_p"] == d["mcnemar_p"]


def test_pairing_removes_problem_difficulty_from_the_noise():
    # Problems vary from easy to hard; the arm solves what the control solves plus 4 more. The
    # paired interval of the difference must be much narrower than the unpaired accuracies' spread.
    rng = np.random.default_rng(4)
    control = (rng.random((1, 80)) < 0.5)
    arm = control.copy()
    arm[0, np.flatnonzero(~control[0])[:4]] = True
    paired = paired_difference(arm, control, samples=4000)
    a, c = accuracy_interval(arm, samples=4000), accuracy_interval(control, samples=4000)
    unpaired_half = math.hypot((a["ci95"][1] - a["ci95"][0]) / 2, (c["ci95"][1] - c["ci95"][0]) / 2)
    assert (paired["ci95"][1] - paired["ci95"][0]) / 2 < unpaired_half / 2


def test_mde_shrinks_like_one_over_sqrt_n():
    rng = np.random.default_rng(5)
    def mde(n):
        c = rng.random((1, n)) < 0.5
        a = c ^ (rng.random((1, n)) < 0.2)  # ~20% discordant
        return paired_difference(a, c, samples=200)["mde80"]
    assert mde(1600) < mde(100) / 2.5  # sqrt(16) = 4, with sampling noise


def test_same_outcomes_give_the_same_numbers():
    rng = np.random.default_rng(6)
    a, c = rng.random((2, 30)) < 0.6, rng.random((2, 30)) < 0.5
    assert paired_difference(a, c) == paired_difference(a.copy(), c.copy())
    assert accuracy_interval(a) == accuracy_interval(a.copy())


def test_shapes_must_match_and_be_non_empty():
    with pytest.raises(ValueError, match="same seeds x problems"):
        paired_difference(np.ones((1, 3)), np.ones((1, 4)))
    with pytest.raises(ValueError, match="non-empty"):
        accuracy_interval(np.ones((1, 0)))


def test_mcnemar_is_per_seed_and_does_not_pool_repeated_cells():
    # The same pair of students listed under 3 seeds: pooling the cells would test 3x the evidence.
    control = np.zeros((1, 40), dtype=bool)
    arm = control.copy()
    arm[0, :5] = True
    one = paired_difference(arm, control, samples=500)
    three = paired_difference(np.repeat(arm, 3, axis=0), np.repeat(control, 3, axis=0), samples=500)
    assert three["mcnemar_p_per_seed"] == [one["mcnemar_p"]] * 3
    assert three["mcnemar_p"] is None
