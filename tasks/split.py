"""Split the training pool into easy / hard / mid by the student's pass rate (FDD's feedback).

easy: the student already solves it (pass rate >= easy_threshold) -> the teacher writes a harder variant.
hard: the student fails it (pass rate <= hard_threshold) -> the teacher writes a similar new problem.
mid:  everything in between stays in the pool as it is.

Pure: no model, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Label = Literal["easy", "hard", "mid"]
LABELS: tuple[Label, ...] = ("easy", "hard", "mid")

# Pass rates are k/n fractions; a threshold typed as 0.7 must still catch 7/10 if it is computed in a
# way that lands one ulp below. The tolerance is far below any real 1/n step.
_TOL = 1e-9


@dataclass(frozen=True)
class SplitResult:
    labels: dict[str, Label]  # problem id -> label
    counts: dict[str, int] = field(default_factory=dict)  # label -> how many (all three present)

    def ids(self, label: Label) -> list[str]:
        """Ids with this label, in the order of the pass-rate mapping."""
        return [pid for pid, lab in self.labels.items() if lab == label]

    def select(self, problems: Iterable, label: Label) -> list:
        """The problems (anything with `.id`) carrying `label`, in the order given."""
        return [p for p in problems if self.labels.get(p.id) == label]


def label_for(pass_rate: float, easy_threshold: float, hard_threshold: float) -> Label:
    if pass_rate >= easy_threshold - _TOL:
        return "easy"
    if pass_rate <= hard_threshold + _TOL:
        return "hard"
    return "mid"


def split_by_pass_rate(
    pass_rates: Mapping[str, float], easy_threshold: float, hard_threshold: float
) -> SplitResult:
    """Label every problem id; pass rate >= easy -> 'easy', <= hard -> 'hard', else 'mid'.

    Raises ValueError on thresholds out of [0, 1] or not ordered (hard < easy), and on a pass rate
    that is NaN or outside [0, 1]: a bad pass rate means a bug upstream, not a problem to label.
    """
    for name, t in (("easy_threshold", easy_threshold), ("hard_threshold", hard_threshold)):
        if not (0.0 <= t <= 1.0):
            raise ValueError(f"{name}={t} must lie in [0, 1]")
    if hard_threshold >= easy_threshold:
        raise ValueError(
            f"hard_threshold={hard_threshold} must be below easy_threshold={easy_threshold}"
        )
    labels: dict[str, Label] = {}
    counts = {lab: 0 for lab in LABELS}
    for pid, rate in pass_rates.items():
        rate = float(rate)
        if math.isnan(rate) or not (0.0 <= rate <= 1.0):
            raise ValueError(f"pass rate of problem {pid!r} is {rate}, expected a value in [0, 1]")
        lab = label_for(rate, easy_threshold, hard_threshold)
        labels[pid] = lab
        counts[lab] += 1
    return SplitResult(labels=labels, counts=counts)
