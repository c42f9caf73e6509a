"""Profile-likelihood intervals for the asymptote E of ``L(x) = E + A·x^-α``, from the measured seed noise.

Log losses are taken as Gaussian around the law with the seed noise σ of each point's mean (measured across
seeds, :func:`dataeff.experiment.fitting.seed_noise`). For every E on a grid, A and α are refitted by least
squares; χ²(E) = min_{A,α} Σ (log y_i − log(E + A x_i^-α))² / σ_i². The interval holds every E with
χ²(E) − min χ² ≤ the cut: the χ²₁ quantile when σ is known, the F(1, ν) quantile when σ was itself measured
with ν degrees of freedom (a profile's Wilks statistic divided by an estimated σ² is F-distributed in the
linear case; with few seeds the χ² cut is too narrow).

E is searched from ``floor`` (0, or a known entropy floor of the data: never a guess) up to 6σ above the smallest
loss: unlike the Huber fits, which keep E below every loss, the likelihood lets noise put a loss below E.
When χ²(floor) is within the cut the data do not bound E from below, and the interval says so rather than
quoting the floor as if it were measured. :func:`suggest` then asks which extra measurement would bound it:
it adds the points the fitted law predicts (an extra size, or more seeds shrinking σ) and recomputes the
lower end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from dataeff.errors import DataeffError

_ALPHA = (1e-3, 10.0)
_B = (-60.0, 30.0)
_STARTS = np.geomspace(0.02, 5.0, 10)


@dataclass(frozen=True)
class Profile:
    E: float  # the least-squares optimum
    A: float
    alpha: float
    lo: float  # the floor itself when not bounded below
    hi: float
    bounded_below: bool
    bounded_above: bool  # False: every E up to the smallest loss is within the cut
    chi2_min: float
    cut: float
    floor: float
    grid: np.ndarray  # E values, ascending
    delta: np.ndarray  # χ²(E) − min χ² on the grid


def cut(ci: float, sigma_dof: int | None) -> float:
    """The Δχ² threshold of a ``ci`` interval: χ²₁ with known σ, F(1, ν) with σ measured on ν dof."""
    return float(stats.chi2.ppf(ci, 1) if sigma_dof is None else stats.f.ppf(ci, 1, sigma_dof))


def _profile_rows(e: np.ndarray, lu: np.ndarray, logz: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(χ², b, α) minimised over (b, α) for each e, by damped Gauss-Newton from several α starts, all at once."""
    m, k = len(e), len(_STARTS)
    ee = np.repeat(e, k)
    alpha = np.tile(_STARTS, m)
    z = np.exp(logz)[None, :]
    # E may exceed a noisy loss (the residual is then negative); the start only needs a positive excess.
    excess = np.maximum(z - ee[:, None], 1e-3 * z)
    b = np.clip((np.log(excess) + alpha[:, None] * lu).mean(axis=1), *_B)
    lam = np.full(m * k, 1e-3)

    def ssr(b: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with np.errstate(over="ignore"):
            q = np.exp(b[:, None] - alpha[:, None] * lu)
        p = ee[:, None] + q
        r = np.log(p) - logz
        return (w * r * r).sum(axis=1), r, q / p

    f, r, s = ssr(b, alpha)
    for _ in range(80):
        jb, ja = s, -lu * s
        h = np.stack([(w * jb * jb).sum(1), (w * jb * ja).sum(1), (w * ja * ja).sum(1)], axis=1)
        g = np.stack([(w * jb * r).sum(1), (w * ja * r).sum(1)], axis=1)
        h00, h01, h11 = h[:, 0] * (1 + lam) + 1e-12, h[:, 1], h[:, 2] * (1 + lam) + 1e-12
        det = h00 * h11 - h01 * h01
        db = -(h11 * g[:, 0] - h01 * g[:, 1]) / det
        da = -(h00 * g[:, 1] - h01 * g[:, 0]) / det
        b1, a1 = np.clip(b + db, *_B), np.clip(alpha + da, *_ALPHA)
        f1, r1, s1 = ssr(b1, a1)
        better = f1 < f
        b, alpha = np.where(better, b1, b), np.where(better, a1, alpha)
        f, r, s = np.where(better, f1, f), np.where(better[:, None], r1, r), np.where(better[:, None], s1, s)
        lam = np.where(better, lam / 3, lam * 10)
    f, b, alpha = f.reshape(m, k), b.reshape(m, k), alpha.reshape(m, k)
    best = f.argmin(axis=1)
    rows = np.arange(m)
    return f[rows, best], b[rows, best], alpha[rows, best]


def profile_E(x: ArrayLike, y: ArrayLike, sigma: float | ArrayLike, *, ci: float = 0.95, floor: float = 0.0,
              sigma_dof: int | None = None, n_grid: int = 120) -> Profile:
    """The profile-likelihood interval of E (see the module docstring); ``sigma`` is the noise of each point's
    log loss (a scalar, or one per point), ``floor`` the lowest E allowed."""
    xa, ya = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    sa = np.broadcast_to(np.asarray(sigma, dtype=float), xa.shape)
    if len(xa) != len(ya) or len(np.unique(xa)) < 3:
        raise DataeffError(f"profile likelihood needs >= 3 distinct sizes with one loss each, got x={list(xa)}")
    if not (np.all(np.isfinite(ya)) and np.all(ya > 0) and np.all(np.isfinite(sa)) and np.all(sa > 0)):
        raise DataeffError("profile likelihood: losses and sigma must be finite and > 0")
    y_scale, x_scale = float(ya.min()), float(np.exp(np.log(xa).mean()))
    if not 0 <= floor < y_scale:
        raise DataeffError(f"profile likelihood: floor={floor} must lie in [0, the smallest loss {y_scale:.4g})")
    lu, logz, w = np.log(xa / x_scale), np.log(ya / y_scale), 1.0 / sa**2
    c = cut(ci, sigma_dof)
    # E is searched past the smallest loss, by 6 of its noise σ: noise can put every loss of the largest sizes
    # below a true asymptote that the law approaches closely there.
    top = math.exp(6 * float(sa.max()))
    lo_e, hi_e = floor / y_scale, top
    grids, chis, bs, als = [], [], [], []
    # A coarse pass over [floor, min y), then two finer passes around the region within the cut.
    for _ in range(3):
        g = np.linspace(lo_e, hi_e, n_grid)
        f, b, al = _profile_rows(g, lu, logz, w)
        grids.append(g), chis.append(f), bs.append(b), als.append(al)
        e_all, f_all = np.concatenate(grids), np.concatenate(chis)
        inside = e_all[f_all - f_all.min() <= c]
        step = (hi_e - lo_e) / (n_grid - 1)
        lo_e, hi_e = max(floor / y_scale, inside.min() - 2 * step), min(top, inside.max() + 2 * step)
    e_all, f_all = np.concatenate(grids), np.concatenate(chis)
    b_all, a_all = np.concatenate(bs), np.concatenate(als)
    order = np.argsort(e_all, kind="stable")
    e_all, f_all, b_all, a_all = e_all[order], f_all[order], b_all[order], a_all[order]
    k = int(f_all.argmin())
    delta = f_all - f_all[k]
    accepted = np.flatnonzero(delta <= c)
    i, j = int(accepted.min()), int(accepted.max())
    bounded_below, bounded_above = i > 0, j < len(e_all) - 1
    lo = _crossing(e_all, delta, i - 1, i, c) if bounded_below else e_all[0]
    hi = _crossing(e_all, delta, j, j + 1, c) if bounded_above else e_all[-1]
    return Profile(
        E=float(e_all[k] * y_scale), A=float(math.exp(b_all[k] + a_all[k] * math.log(x_scale)) * y_scale),
        alpha=float(a_all[k]), lo=float(lo * y_scale), hi=float(hi * y_scale), bounded_below=bounded_below,
        bounded_above=bounded_above, chi2_min=float(f_all[k]), cut=c, floor=floor, grid=e_all * y_scale,
        delta=delta)


def _crossing(e: np.ndarray, delta: np.ndarray, i: int, j: int, c: float) -> float:
    """Where Δχ² crosses the cut between grid points i and j (linearly)."""
    d0, d1 = delta[i], delta[j]
    return float(e[i] + (c - d0) * (e[j] - e[i]) / (d1 - d0)) if d1 != d0 else float(e[i])


@dataclass(frozen=True)
class Suggestion:
    """An extra measurement and the lower end of E's interval it is projected to give."""

    what: str
    projected_lo: float
    bounds: bool  # the projected interval bounds E from below


def suggest(x: ArrayLike, y: ArrayLike, sigma: float, n_seeds: int, *, ci: float = 0.95, floor: float = 0.0,
            sigma_dof: int | None = None, next_sizes: list[tuple[str, float]] | None = None) -> list[Suggestion]:
    """Project the profile's lower end under extra measurements: the fitted law's predictions at each of
    ``next_sizes`` (label, x) added with the current noise, or the current points with one more seed, or
    twice the seeds (σ shrinks as 1/√seeds). Cheapest first; ``bounds`` says whether E would be bounded."""
    xa, ya = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    p = profile_E(xa, ya, sigma, ci=ci, floor=floor, sigma_dof=sigma_dof)
    law = lambda v: p.E + p.A * np.asarray(v, dtype=float) ** -p.alpha  # noqa: E731
    dof = sigma_dof
    plans: list[tuple[str, np.ndarray, np.ndarray, float, int | None]] = [
        (f"one more seed at every size ({n_seeds + 1})", xa, ya, sigma * math.sqrt(n_seeds / (n_seeds + 1)),
         None if dof is None else dof + len(xa)),
        (f"twice the seeds ({2 * n_seeds})", xa, ya, sigma / math.sqrt(2), None if dof is None else 2 * dof + len(xa)),
    ]
    added: list[float] = []
    for label, nx in next_sizes or []:
        added.append(nx)
        extra = np.array(added)
        plans.append((f"{'sizes' if len(added) > 1 else 'size'} up to {label}", np.concatenate([xa, extra]),
                      np.concatenate([ya, law(extra)]), sigma, dof))
    out = []
    for what, px, py, ps, pd in plans:
        q = profile_E(px, py, ps, ci=ci, floor=floor, sigma_dof=pd)
        out.append(Suggestion(what, q.lo, q.bounded_below))
    return out
