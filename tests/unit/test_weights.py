"""Rewards and weights against hand-computed values and against the method's invariants."""

import itertools
import math
import random

import pytest

from stillhouse.tasks.config import RewardConfig, WeightingConfig
from stillhouse.tasks.weights import compute_weights, group_advantages, sample_reward

pytestmark = pytest.mark.unit

EPS = 1e-12
SQRT3 = math.sqrt(3)


def test_reward_is_correctness_plus_format_on_correct_answers():
    cfg = RewardConfig(correct=1.0, wrong=-0.5, format=0.2)
    assert sample_reward(True, True, cfg) == pytest.approx(1.2)
    assert sample_reward(True, False, cfg) == pytest.approx(1.0)
    # A well-formatted wrong answer earns nothing over other wrong answers (the default)...
    assert sample_reward(False, True, cfg) == pytest.approx(-0.5)
    assert sample_reward(False, False, cfg) == pytest.approx(-0.5)
    # ...unless asked for.
    assert sample_reward(False, True, cfg.model_copy(update={"format_requires_correct": False})) == pytest.approx(-0.3)


def test_one_correct_of_four():
    # mean 0.25, population std sqrt(3)/4 -> advantages sqrt(3) and -1/sqrt(3)
    adv = group_advantages([1, 0, 0, 0], eps=EPS)
    assert adv[0] == pytest.approx(SQRT3)
    assert adv[1:] == pytest.approx([-1 / SQRT3] * 3)
    assert sum(adv) == pytest.approx(0.0, abs=1e-9)


def test_sample_std_option():
    # ddof=1: std = sqrt(0.75/3) = 0.5 -> advantages 1.5 and -0.5
    res = compute_weights(["p"] * 4, [1, 0, 0, 0], [True, False, False, False],
                          WeightingConfig(std="sample", eps=EPS, negatives="floor"))
    assert res.weights == pytest.approx([1.5, -0.5, -0.5, -0.5])


def test_equal_rewards_give_zero_weight_and_are_counted():
    keys = ["a"] * 3 + ["b"] * 3 + ["c"] * 2
    rewards = [1, 1, 1, 0, 0, 0, 1, 0]
    correct = [r == 1 for r in rewards]
    res = compute_weights(keys, rewards, correct, WeightingConfig(eps=EPS, negatives="floor"))
    assert res.weights[:6] == [0.0] * 6
    assert res.weights[6:] == pytest.approx([1.0, -1.0])
    assert res.groups == 3 and res.degenerate_groups == 2


def test_interleaved_groups_match_contiguous():
    keys = ["a", "b", "a", "b"]
    res = compute_weights(keys, [1, 0, 0, 1], [True, False, False, True], WeightingConfig(eps=EPS, negatives="floor"))
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


def _weights(correct, formatted, reward_cfg=RewardConfig(), **weighting):
    # Negative weights kept down to the floor unless a test says otherwise: these tests are about
    # the advantage's sign and size, which the default (clip) would hide for wrong answers.
    rewards = [sample_reward(c, f, reward_cfg) for c, f in zip(correct, formatted)]
    cfg = WeightingConfig(eps=EPS, **{"negatives": "floor", **weighting})
    return compute_weights(["p"] * len(correct), rewards, correct, cfg)


def test_format_alone_is_no_preference_signal():
    # The two groups of 8: on the old code the one boxed wrong answer got +2.646 and the
    # one unboxed correct answer -2.646.
    wrong_one_boxed = _weights([False] * 8, [True] + [False] * 7)
    assert wrong_one_boxed.weights == [0.0] * 8 and wrong_one_boxed.degenerate_groups == 1
    correct_one_unboxed = _weights([True] * 8, [False] + [True] * 7)
    assert correct_one_unboxed.weights == [0.0] * 8 and correct_one_unboxed.degenerate_groups == 1
    two_correct = _weights([True, True], [True, False])
    assert two_correct.weights == [0.0, 0.0]


def test_the_sign_comes_from_correctness_even_with_every_safeguard_off():
    loose = RewardConfig(format_requires_correct=False)
    res = _weights([False] * 8, [True] + [False] * 7, loose, zero_if_correctness_uniform=False, negatives="keep")
    assert res.weights[0] == 0.0  # the boxed wrong answer: never pushed up
    assert all(w < 0 for w in res.weights[1:])
    res = _weights([True] * 8, [False] + [True] * 7, loose, zero_if_correctness_uniform=False, negatives="keep")
    assert res.weights[0] == 0.0 and all(w > 0 for w in res.weights[1:])


def test_a_correct_answer_below_its_groups_mean_reward_is_not_pushed_down():
    # N = 20, 18 boxed correct, 1 unboxed correct, 1 wrong: mean 1.035 > 1.0 of the unboxed one.
    correct = [True] * 19 + [False]
    formatted = [True] * 18 + [False, True]
    res = _weights(correct, formatted)
    assert res.advantages[18] < 0  # what the raw advantage says...
    assert res.weights[18] == 0.0  # ...is not what the weight does
    assert res.weights[-1] < 0 and all(w > 0 for w in res.weights[:18])


@pytest.mark.parametrize("std", ["population", "sample", "none"])
@pytest.mark.parametrize("requires_correct, zero_uniform, negatives",
                         list(itertools.product([True, False], [True, False], ["keep", "clip", "floor"])))
def test_invariant_wrong_never_up_correct_never_down(std, requires_correct, zero_uniform, negatives):
    rng = random.Random(f"{std}{requires_correct}{zero_uniform}{negatives}")
    reward_cfg = RewardConfig(format_requires_correct=requires_correct, format=rng.choice([0.1, 0.5, 2.0]))
    for _ in range(200):
        n = rng.randint(1, 16)
        correct = [rng.random() < 0.5 for _ in range(n)]
        formatted = [rng.random() < 0.7 for _ in range(n)]
        res = _weights(correct, formatted, reward_cfg, std=std, zero_if_correctness_uniform=zero_uniform,
                       negatives=negatives)
        for c, w in zip(correct, res.weights):
            assert (w >= 0) if c else (w <= 0), (correct, formatted, res.weights)


def test_a_rarer_correct_answer_weighs_more():
    # The advantage's point: solving a problem the teacher usually fails is worth more.
    one_of_four = _weights([True, False, False, False], [True] * 4)
    three_of_four = _weights([True, True, True, False], [True] * 4)
    assert one_of_four.weights[0] > three_of_four.weights[0] > 0


def test_no_std_division_is_reward_minus_mean():
    res = _weights([True, False, False, False], [False] * 4, std="none", negatives="keep")
    assert res.weights == pytest.approx([0.75, -0.25, -0.25, -0.25])


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


def test_the_default_trains_only_better_than_average_samples():
    # Chosen by configs/experiments/advdistill-cpu.yaml: negatives clipped, so a wrong answer's
    # weight is 0 and a rare correct answer weighs more than a common one.
    rare = compute_weights(["p"] * 4, [1.0, 0.0, 0.0, 0.0], [True, False, False, False], WeightingConfig()).weights
    common = compute_weights(["p"] * 4, [1.0, 1.0, 1.0, 0.0], [True, True, True, False], WeightingConfig()).weights
    assert rare[1:] == [0.0, 0.0, 0.0] and common[3] == 0.0
    assert rare[0] > common[0] > 0
