"""Fit y(x) = a − Σ_{i=1..m} b_i r_i^x (b_i ≥ 0, 0 < r_i < 1) to a measured accuracy-vs-tokens curve.

This is the shape EntiGraph's random-graph model predicts (``dataeff.synth.theory``) and the law Yang et al.
(ICLR 2025, App. G.1) fitted to QuALITY accuracy against synthetic tokens: ``a`` is the plateau the
synthetic corpus would reach, and each term a component learned at its own rate.

Fitting: nonlinear least squares (``scipy.optimize.least_squares``, trust-region reflective, analytic
Jacobian) in the parameters (a, b_i, log k_i) with r_i = exp(−k_i), b_i ≥ 0 as bounds, from every
combination of m time constants 1/k on a geometric grid spanning the data's x spacing to ten times its
range, each started from the bounded linear fit of (a, b) at those rates; the best is kept and its terms are
sorted slowest first. With 2m + 1 parameters a fit needs at least 2m + 2 distinct x (one degree of freedom
left for the noise); fewer is refused. Intervals come from a residual bootstrap (residuals inflated by
sqrt(n/(n − 2m − 1)), resampled onto the fitted curve, refitted from the fit) as percentile intervals on
``a`` and on predictions.

Data (the paper's, as published): the fitted law y = 64.5456 − 13.8352·0.9989^x − 8.4705·0.8961^x −
3.932·0.0546^x with x = EntiGraph tokens in millions and y = QuALITY closed-book accuracy in %, and the two
measured endpoints stated in the text: 39.49% (Llama 3 8B base, x = 0) and 56.22% (455M tokens). The
individual points of the paper's scaling figure are not in the public repository
(``ZitongYang/Synthetic_Continued_Pretraining`` has no fitting script or results table) and could not be
retrieved, so none are entered here; two points cannot determine even one term.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares, lsq_linear

from dataeff.errors import DataeffError

_LOG_K = (-30.0, 30.0)  # bounds on log k: r from ~1 − 1e-13 to ~0, far outside any sensible fit
_GRID = 6  # time constants per start grid


@dataclass(frozen=True)
class ExpLaw:
    """y(x) = a − Σ b_i r_i^x, terms sorted slowest (largest r) first."""

    a: float
    b: tuple[float, ...]
    r: tuple[float, ...]

    def __call__(self, x: Sequence[float] | np.ndarray | float) -> np.ndarray:
        xs = np.asarray(x, dtype=float)
        return self.a - sum(b * np.power(r, xs) for b, r in zip(self.b, self.r, strict=True))


# Yang, Band, Li, Candès, Hashimoto, "Synthetic continued pretraining", ICLR 2025 (arXiv:2409.07431).
PAPER_LAW = ExpLaw(a=64.5456, b=(13.8352, 8.4705, 3.932), r=(0.9989, 0.8961, 0.0546))
PAPER_LAW_SOURCE = ("Yang et al., ICLR 2025, App. G.1: the mixture-of-exponentials law fitted to EntiGraph "
                    "CPT's QuALITY accuracy (%) against synthetic tokens x (millions)")
PAPER_ENDPOINTS = ((0.0, 39.49), (455.0, 56.22))
PAPER_ENDPOINTS_SOURCE = ("Yang et al., ICLR 2025, §4 main results: Llama 3 8B base 39.49%; EntiGraph CPT on "
                          "455M synthetic tokens 56.22% (QuALITY closed-book QA accuracy)")


@dataclass(frozen=True)
class ExpFit:
    law: ExpLaw
    m: int
    n: int
    rss: float
    sigma: float  # residual standard deviation, sqrt(rss / (n − 2m − 1))
    ci: float
    a_low: float
    a_high: float
    x_pred: np.ndarray
    pred: np.ndarray
    pred_low: np.ndarray
    pred_high: np.ndarray
    boot_a: np.ndarray  # the bootstrap refits' plateaus (fits that failed are left out)


def _unpack(theta: np.ndarray, m: int) -> tuple[float, np.ndarray, np.ndarray]:
    return float(theta[0]), theta[1 : m + 1], np.exp(theta[m + 1 :])


def _residuals(theta: np.ndarray, x: np.ndarray, y: np.ndarray, m: int) -> np.ndarray:
    a, b, k = _unpack(theta, m)
    return a - np.exp(-np.outer(x, k)) @ b - y


def _jacobian(theta: np.ndarray, x: np.ndarray, y: np.ndarray, m: int) -> np.ndarray:
    _, b, k = _unpack(theta, m)
    e = np.exp(-np.outer(x, k))
    return np.hstack([np.ones((len(x), 1)), -e, e * b * np.outer(x, k)])


def _solve(x: np.ndarray, y: np.ndarray, m: int, start: np.ndarray, evals: int = 100) -> tuple[np.ndarray, float] | None:
    lower = np.concatenate([[-np.inf], np.zeros(m), np.full(m, _LOG_K[0])])
    upper = np.concatenate([[np.inf], np.full(m, np.inf), np.full(m, _LOG_K[1])])
    try:
        sol = least_squares(_residuals, np.clip(start, lower, upper), jac=_jacobian, bounds=(lower, upper),
                            args=(x, y, m), method="trf", x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12,
                            max_nfev=evals)
    except (ValueError, np.linalg.LinAlgError):
        return None
    if not np.all(np.isfinite(sol.x)):
        return None
    return sol.x, float(np.sum(sol.fun**2))


def _linear_start(x: np.ndarray, y: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(a, b) by bounded linear least squares at fixed rates k."""
    design = np.hstack([np.ones((len(x), 1)), -np.exp(-np.outer(x, k))])
    lo = np.concatenate([[-np.inf], np.zeros(len(k))])
    sol = lsq_linear(design, y, bounds=(lo, np.full(len(k) + 1, np.inf)))
    return np.concatenate([sol.x, np.log(k)])


def _best(x: np.ndarray, y: np.ndarray, m: int) -> tuple[np.ndarray, float]:
    distinct = np.unique(x)
    spacing = float(np.min(np.diff(distinct)))
    span = float(distinct[-1] - distinct[0])
    taus = np.geomspace(spacing / 3, 10 * span, _GRID)
    best: tuple[np.ndarray, float] | None = None
    for combo in itertools.combinations(taus, m):
        got = _solve(x, y, m, _linear_start(x, y, 1 / np.asarray(combo)))
        if got is not None and (best is None or got[1] < best[1]):
            best = got
    if best is None:
        raise DataeffError(f"fit: no start converged for {m} exponential terms")
    # Starts stop early (a start far from the data wanders along a flat valley); the winner is polished.
    polished = _solve(x, y, m, best[0], evals=5000)
    return polished if polished is not None and polished[1] <= best[1] else best


def _law(theta: np.ndarray, m: int) -> ExpLaw:
    a, b, k = _unpack(theta, m)
    order = np.argsort(k)  # slowest first
    return ExpLaw(a=a, b=tuple(float(v) for v in b[order]), r=tuple(float(v) for v in np.exp(-k[order])))


def fit_exponentials(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, m: int = 3, *,
                     x_pred: Sequence[float] | np.ndarray | None = None, bootstrap: int = 1000,
                     ci: float = 0.95, seed: int = 0) -> ExpFit:
    """Fit the m-term law; ``x_pred`` (default: the data's x) is where predictions and their intervals go."""
    xs, ys = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if len(xs) != len(ys):
        raise DataeffError(f"fit: {len(xs)} x values but {len(ys)} y values")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
        raise DataeffError("fit: x and y must be finite numbers")
    if m < 1:
        raise DataeffError(f"fit: m={m} must be at least 1")
    params = 2 * m + 1
    distinct = len(np.unique(xs))
    if distinct < params + 1:
        raise DataeffError(f"fit: {distinct} distinct x values cannot fit {m} exponential term(s): "
                           f"a − Σ b_i r_i^x has {params} parameters, so it needs at least {params + 1}")
    if bootstrap < 0 or not 0 < ci < 1:
        raise DataeffError(f"fit: bootstrap={bootstrap} must be >= 0 and ci={ci} strictly between 0 and 1")
    theta, rss = _best(xs, ys, m)
    law = _law(theta, m)
    xp = xs if x_pred is None else np.asarray(x_pred, dtype=float).ravel()
    fitted = law(xs)
    resid = (ys - fitted) * math.sqrt(len(xs) / (len(xs) - params))
    resid -= resid.mean()
    rng = np.random.default_rng(seed)
    boot_a, boot_pred = [], []
    for _ in range(bootstrap):
        got = _solve(xs, fitted + rng.choice(resid, size=len(xs), replace=True), m, theta)
        if got is not None:
            refit = _law(got[0], m)
            boot_a.append(refit.a)
            boot_pred.append(refit(xp))
    q = (50 * (1 - ci), 50 * (1 + ci))
    if boot_a:
        a_low, a_high = (float(v) for v in np.percentile(boot_a, q))
        pred_low, pred_high = np.percentile(np.array(boot_pred), q, axis=0)
    else:
        a_low = a_high = law.a
        pred_low = pred_high = law(xp)
    return ExpFit(law=law, m=m, n=len(xs), rss=rss, sigma=math.sqrt(rss / (len(xs) - params)), ci=ci,
                  a_low=a_low, a_high=a_high, x_pred=xp, pred=law(xp), pred_low=pred_low, pred_high=pred_high,
                  boot_a=np.array(boot_a))
