"""Rewards and weights against hand-computed values."""

import math

import pytest

from stillhouse.tasks.config import RewardConfig, WeightingConfig
from stillhouse.tasks.weights import compute_weights, group_advantages, sample_reward

pytestmark = pytest.mark.unit

EPS = 1e-12
SQRT3 = math.sqrt(3)


def test_reward_is_correctness_plus_format():
    cfg = RewardConfig(correct=1.0, wrong=-0.5, format=0.2)
    assert sample_reward(True, True, cfg) == pytest.approx(1.2)
    assert sample_reward(True, False, cfg) == pytest.approx(1.0)
    assert sample_reward(False, True, cfg) == pytest.approx(-0.3)
    assert sample_reward(False, False, cfg) == pytest.approx(-0.5)


def test_one_correct_of_four():
    # mean 0.25, population std sqrt(3)/4 -> advantages sqrt(3) and -1/sqrt(3)
    adv = group_advantages([1, 0, 0, 0], eps=EPS)
    assert adv[0] == pytest.approx(SQRT3)
    assert adv[1:] == pytest.approx([-1 / SQRT3] * 3)
    assert sum(adv) == pytest.approx(0.0, abs=1e-9)


def test_sample_std_option():
    # ddof=1: std = sqrt(0.75/3) = 0.5 -> advantages 1.5 and -0.5
    res = compute_weights(["p"] * 4, [1, 0, 0, 0], [True, False, False, False],
                          WeightingConfig(std="sample", eps=EPS))
    assert res.weights == pytest.approx([1.5, -0.5, -0.5, -0.5])


def test_equal_rewards_give_zero_weight_and_are_counted():
    keys = ["a"] * 3 + ["b"] * 3 + ["c"] * 2
    rewards = [1, 1, 1, 0, 0, 0, 1, 0]
    correct = [r == 1 for r in rewards]
    res = compute_weights(keys, rewards, correct, WeightingConfig(eps=EPS))
    assert res.weights[:6] == [0.0] * 6
    assert res.weights[6:] == pytest.approx([1.0, -1.0])
    assert res.groups == 3 and res.degenerate_groups == 2


def test_interleaved_groups_match_contiguous():
    keys = ["a", "b", "a", "b"]
    res = compute_weights(keys, [1, 0, 0, 1], [True, False, False, True], WeightingConfig(eps=EPS))
    assert res.weights == pytest.approx([1.0, -1.0, -1.0, 1.0])


@pytest.mark.parametrize(
    "negatives, floor, expected_wrong",
    [("keep", -1.0, -1 / SQRT3), ("clip", -1.0, 0.0), ("floor", -0.25, -0.25), ("floor", -5.0, -1 / SQRT3)],
)
def test_negative_handling(negatives, floor, expected_wrong):
    cfg = WeightingConfig(negatives=negatives, floor=floor, eps=EPS)
    res = compute_weights(["p"] * 4, [1, 0, 0, 0], [True, False, False, False], cfg)
    assert res.weights[0] == pytest.approx(SQRT3)
    assert res.weights[1:] == pytest.approx([expected_wrong] * 3)
    # the raw advantage is kept regardless of how weights treat negatives
    assert res.advantages[1] == pytest.approx(-1 / SQRT3)


def test_format_reward_separates_equally_correct_samples():
    rewards = [sample_reward(True, fmt, RewardConfig()) for fmt in (True, False)]
    res = compute_weights(["p", "p"], rewards, [True, True], WeightingConfig(eps=EPS))
    assert res.weights == pytest.approx([1.0, -1.0])
    assert res.degenerate_groups == 0


def test_rft_weights_correct_only():
    res = compute_weights(["a", "a", "b"], [1.1, 0.0, 0.1], [True, False, False],
                          WeightingConfig(scheme="rft"))
    assert res.weights == [1.0, 0.0, 0.0]


def test_uniform_weights_everything():
    res = compute_weights(["a", "a", "b"], [1.1, 0.0, 0.1], [True, False, False],
                          WeightingConfig(scheme="uniform"))
    assert res.weights == [1.0, 1.0, 1.0]


def test_eps_bounds_the_advantage():
    # std 0.5 with eps 0.5 -> (1 - 0.5) / 1.0
    assert group_advantages([1, 0], eps=0.5) == pytest.approx([0.5, -0.5])


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in length"):
        compute_weights(["a"], [1.0, 0.0], [True, False], WeightingConfig())


def test_empty_input():
    res = compute_weights([], [], [], WeightingConfig())
    assert res.weights == [] and res.groups == 0 and res.degenerate_groups == 0
