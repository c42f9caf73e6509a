"""Paired comparisons of two recipes: the difference of their asymptotes, and of their losses at each matched
size, with intervals that keep the seeds paired.

Seed s trains both recipes from the same initialisation and data order, so their seed deviations are
correlated and a difference is better measured than two marginal intervals suggest (or worse, if they are
anti-correlated). Two resampling schemes, named in every result:

- ``seeds``: resample seed labels with replacement, the same labels at every size for both recipes, and refit
  both laws to the resampled means. Needs the same seeds everywhere, and enough of them: with 2-4 seeds a
  seed bootstrap has only a handful of distinct resamples and its spread is too small by (n-1)/n.
- ``parametric``: draw each point's mean log loss around its fitted law from a bivariate normal whose
  covariance (each recipe's seed noise and their correlation) is pooled over every size measured on several
  seeds in both recipes, divided by that point's seed count; refit both. Each replicate scales the noise by a
  draw of σ̂'s own uncertainty (ν / χ²_ν on its ν dof), which matters with 2-3 seeds. Where no point has several seeds it
  falls back to a given σ with no correlation (``parametric-independent``), since the pairing is unmeasured.

At matched sizes the difference of mean losses gets a t interval on the seed-wise differences, their variance
pooled over sizes (so 2 seeds at 4 sizes give 4 degrees of freedom rather than 1 per size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from dataeff.errors import DataeffError
from dataeff.experiment import scaling

PairedMethod = Literal["seeds", "parametric", "parametric-independent"]


def verdict(lo: float | None, hi: float | None) -> Literal["lower", "higher", "not distinguishable"]:
    """A's relation to B from the interval of A − B."""
    if hi is not None and hi < 0:
        return "lower"
    if lo is not None and lo > 0:
        return "higher"
    return "not distinguishable"


@dataclass(frozen=True)
class PairNoise:
    """Seed noise of one run's log loss for recipes A and B, their correlation, and its degrees of freedom."""

    sigma_a: float
    sigma_b: float
    rho: float
    dof: int


def pair_noise(runs_a: list[list[float]], runs_b: list[list[float]]) -> PairNoise | None:
    """Pooled over the sizes where both recipes have the same number (≥ 2) of seeds, paired by position."""
    saa = sbb = sab = 0.0
    dof = 0
    for a, b in zip(runs_a, runs_b, strict=True):
        if len(a) < 2 or len(a) != len(b):
            continue
        da, db = np.log(a) - np.log(a).mean(), np.log(b) - np.log(b).mean()
        saa, sbb, sab = saa + float(da @ da), sbb + float(db @ db), sab + float(da @ db)
        dof += len(a) - 1
    if dof == 0 or saa == 0 or sbb == 0:
        return None
    return PairNoise(math.sqrt(saa / dof), math.sqrt(sbb / dof), sab / math.sqrt(saa * sbb), dof)


@dataclass(frozen=True)
class PairedAsymptotes:
    diff: float  # E_A − E_B of the point fits
    lo: float
    hi: float
    method: PairedMethod
    n_boot: int
    n_skipped: int
    noise: PairNoise | None
    samples: np.ndarray  # the replicates of E_A − E_B


def paired_asymptotes(x: ArrayLike, runs_a: list[list[float]], runs_b: list[list[float]], *, n_boot: int = 1000,
                      seed: int = 0, ci: float = 0.95, method: Literal["auto", "seeds", "parametric"] = "auto",
                      min_seed_resample: int = 5, sigma: float | None = None) -> PairedAsymptotes:
    """The interval of E_A − E_B, both laws fitted to mean losses over seeds at sizes ``x``; ``runs_*[i]`` are
    the per-seed losses at ``x[i]`` in the same seed order. ``auto`` resamples seeds when every point has the
    same ≥ ``min_seed_resample`` seeds, else draws parametric noise; ``sigma`` (one run's log-loss noise) is
    the fallback when no point has several seeds."""
    xa = np.asarray(x, dtype=float).ravel()
    if not len(xa) == len(runs_a) == len(runs_b):
        raise DataeffError(f"paired comparison: {len(xa)} sizes but {len(runs_a)} and {len(runs_b)} sets of runs")
    if any(not r for r in (*runs_a, *runs_b)):
        raise DataeffError("paired comparison: every size needs at least one finite loss in both recipes")
    mean_a = np.array([np.mean(r) for r in runs_a])
    mean_b = np.array([np.mean(r) for r in runs_b])
    fit_a, fit_b = scaling.fit_power_law(xa, mean_a), scaling.fit_power_law(xa, mean_b)
    n_seeds = {len(r) for r in (*runs_a, *runs_b)}
    noise = pair_noise(runs_a, runs_b)
    rng = np.random.default_rng(seed)
    chosen: PairedMethod
    if method == "seeds" or (method == "auto" and len(n_seeds) == 1 and min(n_seeds) >= min_seed_resample):
        if len(n_seeds) != 1 or min(n_seeds) < 2:
            raise DataeffError("paired comparison: method=seeds needs the same number (≥ 2) of seeds at every point")
        n = n_seeds.pop()
        idx = rng.integers(0, n, size=(n_boot, n))
        la = np.log(np.stack([np.asarray(r)[idx].mean(axis=1) for r in runs_a], axis=1))
        lb = np.log(np.stack([np.asarray(r)[idx].mean(axis=1) for r in runs_b], axis=1))
        chosen = "seeds"
    else:
        counts = np.array([min(len(a), len(b)) for a, b in zip(runs_a, runs_b, strict=True)], dtype=float)
        if noise is not None:
            sa, sb, rho = noise.sigma_a, noise.sigma_b, noise.rho
            chosen = "parametric"
        elif sigma is not None:
            sa, sb, rho = sigma, sigma, 0.0
            chosen = "parametric-independent"
        else:
            raise DataeffError("paired comparison: no point has several seeds in both recipes, so the seed noise is "
                               "unmeasured; add confirm_seeds or set fit.sigma")
        z1, z2 = rng.standard_normal((2, n_boot, len(xa)))
        scale = 1.0 / np.sqrt(counts)
        if noise is not None:
            # σ was measured on few dof: each replicate draws its own from σ̂'s sampling law (σ̂² ν / χ²_ν), so
            # the interval carries that uncertainty too (with σ̂ held fixed, 4 sizes × 2 seeds covered 89%).
            scale = scale * np.sqrt(noise.dof / rng.chisquare(noise.dof, size=(n_boot, 1)))
        la = np.log(fit_a.predict(xa)) + sa * scale * z1
        lb = np.log(fit_b.predict(xa)) + sb * scale * (rho * z1 + math.sqrt(max(1 - rho * rho, 0.0)) * z2)
    d = scaling.refit_samples(xa, mean_a, la)[:, 0] - scaling.refit_samples(xa, mean_b, lb)[:, 0]
    ok = np.isfinite(d)
    lo, hi = np.quantile(d[ok], [(1 - ci) / 2, (1 + ci) / 2], method="inverted_cdf")
    return PairedAsymptotes(fit_a.E - fit_b.E, float(lo), float(hi), chosen, n_boot, int((~ok).sum()), noise, d[ok])


@dataclass(frozen=True)
class PairedPoint:
    diff: float  # mean loss of A − mean loss of B
    lo: float | None  # None: no seed-wise differences to measure the noise
    hi: float | None
    n_seeds: int


def paired_at_sizes(runs_a: list[list[float]], runs_b: list[list[float]], *, ci: float = 0.95) -> tuple[list[PairedPoint], int]:
    """Per matched size, the difference of mean losses with a pooled paired t interval; and its dof."""
    ss, dof = 0.0, 0
    for a, b in zip(runs_a, runs_b, strict=True):
        if len(a) >= 2 and len(a) == len(b):
            d = np.asarray(a) - np.asarray(b)
            ss += float(((d - d.mean()) ** 2).sum())
            dof += len(d) - 1
    s = math.sqrt(ss / dof) if dof else None
    t = float(stats.t.ppf((1 + ci) / 2, dof)) if dof else math.nan
    out = []
    for a, b in zip(runs_a, runs_b, strict=True):
        n = min(len(a), len(b))
        diff = float(np.mean(a) - np.mean(b))
        half = None if s is None else t * s / math.sqrt(n)
        out.append(PairedPoint(diff, None if half is None else diff - half, None if half is None else diff + half, n))
    return out, dof
