"""The statistics of an experiment: accuracies over seeds and problems, paired differences.

An arm's outcome on one eval set is a seeds x problems 0/1 matrix (greedy pass@1 of the final
student). Two sources of noise: which problems were drawn (the eval set is a sample of its
distribution) and which seed (teacher samples, LoRA init, data order). Both are resampled:

- accuracy: mean over every cell; 95% interval from a two-level bootstrap (seeds drawn with
  replacement, problems drawn with replacement, the same problem draw for every seed);
- paired difference to the control: the same eval problems and, within a seed, the same teacher
  samples, so the arm-minus-control cell differences are bootstrapped with one shared draw of seeds
  and problems for both arms (pairing removes the problems' own difficulty from the noise);
- exact McNemar test on the discordant problems: b = arm right and control wrong, c = the reverse;
  two-sided p = P(Binomial(b + c, 1/2) as far from even as observed). It is computed per seed (the
  problems of one seed are independent pairs); pooling the cells of several seeds would count a
  problem once per seed and overstate the evidence (a base model evaluated once but listed under
  5 seeds gave p = 1e-38 where one seed gives 1e-8), so with several seeds the bootstrap interval
  is the test of record and the per-seed p-values show how consistent the seeds are;
- minimum detectable effect: the paired difference a two-sided 5% test would detect with 80% power
  at this n and this spread of per-problem differences, (1.96 + 0.84) * sd / sqrt(problems).

Pure numpy; a fixed bootstrap seed makes the numbers a function of the outcomes alone, so a rerun
reports exactly the same intervals.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Z_95 = 1.959963984540054
Z_80_POWER = 0.8416212335729143


def _matrix(outcomes: list[list[bool]] | np.ndarray) -> np.ndarray:
    m = np.asarray(outcomes, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"outcomes must be a non-empty seeds x problems matrix, got shape {m.shape}")
    return m


def _bootstrap_means(m: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `samples` two-level resamples of a seeds x problems matrix."""
    seeds, problems = m.shape
    out = np.empty(samples)
    # In chunks: a resample is a (seeds, problems) gather, a few hundred at a time keeps memory small.
    chunk = max(1, 2_000_000 // (seeds * problems))
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        s = rng.integers(0, seeds, size=(k, seeds))
        p = rng.integers(0, problems, size=(k, problems))
        out[start : start + k] = m[s[:, :, None], p[:, None, :]].mean(axis=(1, 2))
    return out


def accuracy_interval(outcomes, samples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Mean accuracy of a seeds x problems 0/1 matrix with its 95% two-level bootstrap interval."""
    m = _matrix(outcomes)
    boot = _bootstrap_means(m, samples, np.random.default_rng(seed))
    lo, hi = np.quantile(boot, [0.025, 0.975])
    per_seed = m.mean(axis=1)
    return {"mean": float(m.mean()), "ci95": [float(lo), float(hi)], "seeds": m.shape[0],
            "problems": m.shape[1], "per_seed": [float(x) for x in per_seed]}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (1.0 when there are none)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_difference(arm, control, samples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """arm - control on the same seeds x problems cells: mean, paired bootstrap 95% interval,
    exact McNemar p, discordant counts and the minimum detectable effect (80% power, 5% level)."""
    a, c = _matrix(arm), _matrix(control)
    if a.shape != c.shape:
        raise ValueError(f"paired outcomes must have the same seeds x problems shape: {a.shape} vs {c.shape}")
    d = a - c
    boot = _bootstrap_means(d, samples, np.random.default_rng(seed))
    lo, hi = np.quantile(boot, [0.025, 0.975])
    better = int(((a == 1) & (c == 0)).sum())
    worse = int(((a == 0) & (c == 1)).sum())
    per_problem = d.mean(axis=0)
    sd = float(per_problem.std(ddof=1)) if d.shape[1] > 1 else 0.0
    if sd == 0.0:
        # No spread observed (e.g. identical arms): use the largest per-problem variance a paired
        # 0/1 difference with this discordance rate can have, so the MDE is not reported as 0.
        rate = (better + worse) / d.size
        sd = math.sqrt(max(rate, 1.0 / d.size))
    per_seed = [mcnemar_exact(int(((a[s] == 1) & (c[s] == 0)).sum()), int(((a[s] == 0) & (c[s] == 1)).sum()))
                for s in range(d.shape[0])]
    return {
        "mean": float(d.mean()), "ci95": [float(lo), float(hi)],
        # The interval excludes 0: the difference is significant at 5% (over seeds and problems).
        "significant": bool(lo > 0 or hi < 0),
        "mcnemar_p": per_seed[0] if len(per_seed) == 1 else None, "mcnemar_p_per_seed": per_seed,
        "arm_better": better, "arm_worse": worse,
        "seeds": d.shape[0], "problems": d.shape[1],
        "mde80": (Z_95 + Z_80_POWER) * sd / math.sqrt(d.shape[1]),
    }
