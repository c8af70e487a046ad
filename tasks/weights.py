"""Rewards and loss weights (AdvDistill): pure functions over plain lists.

A sample's reward is its correctness reward plus a format reward. Its loss weight comes from the
group of N samples the teacher drew for the same problem:

- group_advantage: (r - mean) / (std + eps) within the group (the default). A group whose rewards
  are all equal carries no preference signal, so every sample in it gets weight 0 and the group is
  counted as degenerate.
- rft: weight 1 on correct samples, 0 on the rest (rejection-sampling fine-tuning baseline).
- uniform: weight 1 on every sample (plain distillation baseline).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from stillhouse.tasks.config import RewardConfig, WeightingConfig


def sample_reward(correct: bool, format_ok: bool, cfg: RewardConfig) -> float:
    return (cfg.correct if correct else cfg.wrong) + (cfg.format if format_ok else 0.0)


@dataclass(frozen=True)
class WeightResult:
    advantages: list[float]  # raw group advantage per sample (0 under rft/uniform)
    weights: list[float]  # the loss weight per sample, after the scheme and negative handling
    groups: int
    degenerate_groups: int  # groups whose rewards were all equal


def group_advantages(rewards: Sequence[float], eps: float, ddof: int = 0) -> list[float]:
    """(r - mean) / (std + eps) over one group; all-equal rewards give all zeros."""
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    if all(r == rewards[0] for r in rewards) or n - ddof <= 0:
        return [0.0] * n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - ddof))
    return [(r - mean) / (std + eps) for r in rewards]


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
    ddof = 1 if cfg.std == "sample" else 0
    for idx in members.values():
        group = [rewards[i] for i in idx]
        if all(r == group[0] for r in group):
            degenerate += 1
        for i, a in zip(idx, group_advantages(group, cfg.eps, ddof)):
            advantages[i] = a

    if cfg.scheme == "group_advantage":
        weights = [_apply_negatives(a, cfg) for a in advantages]
    elif cfg.scheme == "rft":
        weights = [1.0 if c else 0.0 for c in correct]
    else:  # uniform
        weights = [1.0] * len(rewards)
    return WeightResult(advantages, weights, len(members), degenerate)
