"""Gain closed, SBP's headline number: the share of the gap from repetition to the oracle that a method closes,

    gain = (L_rep − L_method) / (L_rep − L_oracle),

0 when the method is no better than repeating the real data, 1 when it matches fresh real data. Its interval
is a percentile bootstrap over seeds: each arm's seed losses are resampled with replacement, independently,
and the ratio of the resampled means is taken. A resample in which the oracle is no better than repetition
has no gain to close; when more than the interval's tail share of resamples are such, the interval is
unbounded (None at both ends).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Gain:
    value: float | None  # None: the oracle's mean loss is not below repetition's
    low: float | None
    high: float | None


def _means(values: Sequence[float], rng: np.random.Generator, n_boot: int) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    return x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)


def mean_interval(values: Sequence[float], n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` with a percentile-bootstrap interval."""
    if not values:
        raise ValueError("no values")
    means = _means(values, np.random.default_rng(seed), n_boot)
    low, high = np.percentile(means, [50 * (1 - ci), 50 * (1 + ci)])
    return float(np.mean(values)), float(low), float(high)


def gain_closed(rep: Sequence[float], method: Sequence[float], oracle: Sequence[float], n_boot: int = 2000,
                ci: float = 0.95, seed: int = 0) -> Gain:
    """The gain closed by ``method`` between ``rep`` and ``oracle`` (each a list of per-seed losses)."""
    if not rep or not method or not oracle:
        raise ValueError("every arm needs at least one loss")
    gap = float(np.mean(rep) - np.mean(oracle))
    value = float((np.mean(rep) - np.mean(method)) / gap) if gap > 0 else None
    rng = np.random.default_rng(seed)
    r, m, o = (_means(v, rng, n_boot) for v in (rep, method, oracle))
    gaps = r - o
    ok = gaps > 0
    tail = (1 - ci) / 2
    if value is None or (~ok).mean() > tail:
        return Gain(value, None, None)
    # An undefined resample (no gap) could lie at either extreme: it counts as -inf for the low end and +inf
    # for the high end, so the ends are the k-th values in from each side, k = the tail's count minus them.
    finite = np.sort((r[ok] - m[ok]) / gaps[ok])
    k = int(np.floor(tail * n_boot)) - int((~ok).sum())
    return Gain(value, float(finite[k]), float(finite[len(finite) - 1 - k]))
