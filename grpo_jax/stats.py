"""Seed statistics for ``grpo-jax ablate``: the mean over seeds with a percentile-bootstrap interval, and the paired
difference of a variant against an anchor run on the same seeds.

    bootstrap: draw n of the n per-seed values with replacement, ``resamples`` times; the interval is the
    (1-level)/2 and (1+level)/2 quantiles of the resampled means (Efron's percentile interval).
    paired:    d_s = variant_s - anchor_s for every seed s both have (same seed = same warm start and data), then
               the bootstrap above on the d_s.

With 5 seeds a percentile interval is narrow-biased (it cannot reach beyond the extreme seeds): read it as what these
seeds support, not as a guarantee. Fewer than 2 finite values give no interval (nan).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    n: int  # finite values used

    def excludes(self, value: float) -> bool:
        """Whether the interval lies entirely above or below ``value`` (e.g. 0 for a paired difference)."""
        return bool(self.n >= 2 and (self.lo > value or self.hi < value))


def bootstrap(values: Sequence[float], *, level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> Interval:
    """Mean of the finite ``values`` with its percentile-bootstrap interval at ``level``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    if x.size == 1:
        return Interval(float(x[0]), float("nan"), float("nan"), 1)
    means = x[np.random.default_rng(seed).integers(0, x.size, (resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(x.mean()), float(lo), float(hi), int(x.size))


def paired(variant: Sequence[float], anchor: Sequence[float], **kw) -> Interval:
    """``bootstrap`` of the per-seed differences variant - anchor (seeds where both are finite)."""
    v, a = np.asarray(variant, np.float64), np.asarray(anchor, np.float64)
    if v.shape != a.shape:
        raise ValueError(f"paired: {v.size} variant values against {a.size} anchor values (one per seed each)")
    return bootstrap(v - a, **kw)
