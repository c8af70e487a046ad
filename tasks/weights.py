"""Rewards and loss weights (AdvDistill): pure functions over plain lists.

A sample's reward is its correctness reward plus a format reward (by default only on correct
answers). Its loss weight comes from the group of N samples the teacher drew for the same problem:

- group_advantage: (r - mean) / (std + eps) within the group (the default; `std: none` gives
  r - mean). A group whose samples are all correct or all wrong carries no preference signal about
  correctness, so every sample in it gets weight 0 and the group is counted as degenerate.
- rft: weight 1 on correct samples, 0 on the rest (rejection-sampling fine-tuning baseline).
- uniform: weight 1 on every sample (plain distillation baseline).

Invariant, whatever the settings: under group_advantage a wrong answer never gets a positive weight
and a correct answer never a negative one (the sign comes from correctness; rewards only size it).
Negative weights are then clipped to 0 (the default), kept or floored (`negatives`); the result is
exactly what the round's version stores and the trainer uses.

>>> from stillhouse.tasks.config import WeightingConfig
>>> res = compute_weights(["p"] * 4, [1.1, 1.1, 0.0, 0.0], [True, True, False, False], WeightingConfig())
>>> [round(w, 3) for w in res.weights]
[1.0, 1.0, 0.0, 0.0]
>>> floored = WeightingConfig(negatives="floor")
>>> [round(w, 3) for w in compute_weights(["p"] * 4, [1.1, 1.1, 0.0, 0.0], [True, True, False, False], floored).weights]
[1.0, 1.0, -1.0, -1.0]
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from stillhouse.tasks.config import RewardConfig, WeightingConfig


def sample_reward(correct: bool, format_ok: bool, cfg: RewardConfig) -> float:
    """Correctness reward plus the format bonus (only on correct answers unless configured).

    >>> from stillhouse.tasks.config import RewardConfig
    >>> sample_reward(False, True, RewardConfig()), sample_reward(True, True, RewardConfig())
    (0.0, 1.1)
    """
    bonus = cfg.format if format_ok and (correct or not cfg.format_requires_correct) else 0.0
    return (cfg.correct if correct else cfg.wrong) + bonus


@dataclass(frozen=True)
class WeightResult:
    advantages: list[float]  # raw group advantage per sample (0 in degenerate groups)
    weights: list[float]  # the loss weight per sample, after the scheme and negative handling
    groups: int
    degenerate_groups: int  # groups with no preference signal (all rewards or all verdicts equal)


def group_advantages(rewards: Sequence[float], eps: float, ddof: int | None = 0) -> list[float]:
    """(r - mean) / (std + eps) over one group (ddof None: r - mean); all-equal rewards give zeros."""
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    if all(r == rewards[0] for r in rewards) or (ddof is not None and n - ddof <= 0):
        return [0.0] * n
    if ddof is None:
        return [r - mean for r in rewards]
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - ddof))
    return [(r - mean) / (std + eps) for r in rewards]


def _signed_by_correctness(adv: float, correct: bool) -> float:
    # The invariant: rewards other than correctness (the format bonus) may size a weight, never
    # flip it. Within a group of N > 10 a correct answer without the bonus can sit below the mean.
    return max(adv, 0.0) if correct else min(adv, 0.0)


def _apply_negatives(adv: float, cfg: WeightingConfig) -> float:
    if adv >= 0 or cfg.negatives == "keep":
        return adv
    return 0.0 if cfg.negatives == "clip" else max(adv, cfg.floor)


def compute_weights(
    group_keys: Sequence[str],
    rewards: Sequence[float],
    correct: Sequence[bool],
    cfg: WeightingConfig,
) -> WeightResult:
    """Weights for samples given in any order; `group_keys[i]` names sample i's group (problem id)."""
    if not (len(group_keys) == len(rewards) == len(correct)):
        raise ValueError(
            f"group_keys, rewards and correct differ in length: "
            f"{len(group_keys)}, {len(rewards)}, {len(correct)}"
        )
    members: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(group_keys):
        members[key].append(i)

    advantages = [0.0] * len(rewards)
    degenerate = 0
    ddof = {"population": 0, "sample": 1, "none": None}[cfg.std]
    for idx in members.values():
        group = [rewards[i] for i in idx]
        uniform_correctness = all(bool(correct[i]) == bool(correct[idx[0]]) for i in idx)
        if all(r == group[0] for r in group) or (cfg.zero_if_correctness_uniform and uniform_correctness):
            degenerate += 1
            continue  # advantages stay 0
        for i, a in zip(idx, group_advantages(group, cfg.eps, ddof)):
            advantages[i] = a

    if cfg.scheme == "group_advantage":
        weights = [_apply_negatives(_signed_by_correctness(a, bool(c)), cfg) for a, c in zip(advantages, correct)]
    elif cfg.scheme == "rft":
        weights = [1.0 if c else 0.0 for c in correct]
    else:  # uniform
        weights = [1.0] * len(rewards)
    return WeightResult(advantages, weights, len(members), degenerate)
