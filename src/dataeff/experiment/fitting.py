"""Scaling-law fits as the pipeline's stages record them: ``L(x) = E + A·x^-α`` with bootstrap intervals (or the
reason a fit was refused), the seed noise that sets those intervals, and data-efficiency multipliers.

The math is :mod:`dataeff.experiment.scaling`; this module turns it into typed results for ``results.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from dataeff.config import option
from dataeff.errors import DataeffError
from dataeff.experiment import scaling


@dataclass
class FitConfig:
    n_boot: int = option(1000, "bootstrap replicates for every interval", min=1)
    ci: float = option(0.95, "confidence level of the intervals", above=0.0, below=1.0)
    seed: int = option(0, "bootstrap seed", min=0)
    method: Literal["auto", "pairs", "residual", "parametric"] = option(
        "auto", "bootstrap: resample runs (pairs), log residuals, or draw seed noise (parametric); auto picks by "
        "point count, and uses seed noise when there are several seeds")
    sigma: float | None = option(None, "seed-to-seed noise of log loss for the parametric bootstrap (default: "
                                       "measured from the seeds when there are several)", above=0.0)
    params: Literal["total", "non_embedding"] = option("total", "which parameter count is the N of L(N)")
    paired_method: Literal["auto", "seeds", "parametric"] = option(
        "auto", "paired comparisons: resample seeds jointly across recipes (seeds), or draw seed noise with its "
        "measured cross-recipe correlation (parametric); auto resamples seeds from min_seed_resample seeds on")
    min_seed_resample: int = option(5, "seeds per point from which auto resamples seeds rather than drawing noise",
                                    min=2)
    entropy_floor: float | None = option(
        None, "a known entropy of the data in nats per token (e.g. a synthetic world's exact entropy rate): the "
              "lowest E the profile likelihood considers. Set it only when it is a fact, never to tighten an "
              "interval", min=0.0)
    coverage: Literal["refuse", "warn", "off"] = option(
        "refuse", "a design (sizes × seeds) whose 95% intervals covered the truth below 90% in the coverage study "
                  "(docs/intervals.md): refuse it before training, warn, or skip the check")


Interval = tuple[float | None, float | None]


@dataclass
class Fit:
    """A fit of ``E + A·x^-α`` to (x, y) with its bootstrap, or the reason it was refused (then only x, y)."""

    x: list[float]
    y: list[float]
    refused: str | None = None
    E: float | None = None
    A: float | None = None
    alpha: float | None = None
    x_scale: float | None = None  # the geometric mean of x: the fit ran on x / x_scale
    loss: float | None = None  # the summed Huber objective at the optimum
    n_points: int | None = None
    E_ci: Interval | None = None
    A_ci: Interval | None = None
    alpha_ci: Interval | None = None
    method: str | None = None
    n_boot: int | None = None
    n_skipped: int | None = None
    summary: str | None = None
    sigma: float | None = None  # the seed noise of log loss a parametric bootstrap drew
    # The bootstrap refits' (E, A, alpha), kept so reports can draw bands and later fits can pair replicates.
    replicates: dict[str, list[float]] | None = None
    leave_largest_out: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.refused is None and None in (self.E, self.A, self.alpha):
            raise ValueError("a fit that was not refused has E, A and alpha")

    @property
    def fitted(self) -> bool:
        return self.refused is None and all(v is not None and math.isfinite(v) for v in (self.E, self.A, self.alpha)) \
            and (self.A or 0) > 0

    def power_law(self) -> scaling.PowerLawFit:
        assert self.refused is None and self.x_scale is not None and self.n_points is not None
        return scaling.PowerLawFit(self.E, self.A, self.alpha, self.x_scale, self.loss or math.nan, self.n_points)  # type: ignore[arg-type]

    def replicate_fits(self) -> list[scaling.PowerLawFit]:
        """The bootstrap refits as laws (what ``BootstrapResult.fits`` gave when the fit was made)."""
        reps = self.replicates or {}
        f = self.power_law()
        return [scaling.PowerLawFit(e, a, al, f.x_scale, math.nan, f.n_points)
                for e, a, al in zip(reps.get("E", []), reps.get("A", []), reps.get("alpha", []), strict=True)]


def fit_with_intervals(x: list[float], y: list[float], f: FitConfig, sigma: float | None) -> Fit:
    """A fit with bootstrap intervals, or the reason it was refused (too few points)."""
    method = None if f.method == "auto" else f.method
    use_sigma = sigma if method in (None, "parametric") else None
    try:
        boot = scaling.bootstrap_fit(x, y, n_boot=f.n_boot, seed=f.seed, ci=f.ci, method=method, sigma=use_sigma)
    except DataeffError as e:
        return Fit(x=x, y=y, refused=str(e))
    return Fit(
        x=x, y=y, **boot.fit.to_dict(), E_ci=boot.E_interval, A_ci=boot.A_interval, alpha_ci=boot.alpha_interval,
        method=boot.method, n_boot=boot.n_boot, n_skipped=boot.n_skipped, summary=scaling.fit_summary(boot),
        sigma=use_sigma, replicates={"E": boot.E.tolist(), "A": boot.A.tolist(), "alpha": boot.alpha.tolist()},
        leave_largest_out=scaling.leave_largest_out(x, y) if len(set(x)) >= 4 else None,
    )


def seed_noise(seed_losses: list[list[float]]) -> tuple[float, int] | None:
    """(σ of one run's log loss, its degrees of freedom), pooled over every point measured on several seeds."""
    deviations, dof = 0.0, 0
    for losses in seed_losses:
        if len(losses) < 2:
            continue
        logs = np.log(losses)
        deviations += float(((logs - logs.mean()) ** 2).sum())
        dof += len(logs) - 1
    if dof == 0 or deviations == 0:
        return None
    return math.sqrt(deviations / dof), dof


def pooled_sigma(seed_losses: list[list[float]]) -> float | None:
    """The noise of a tuned point's mean log loss, pooled over every point measured on several seeds."""
    noise = seed_noise(seed_losses)
    n_seeds = max((len(s) for s in seed_losses if len(s) >= 2), default=1)
    return None if noise is None else noise[0] / math.sqrt(n_seeds)


@dataclass
class Multiplier:
    """Tokens the data-scaling baseline needs to reach ``loss``, over the world's budget."""

    loss: float
    # From the baseline's fitted token law. None: unbounded (the loss lies below that law's asymptote).
    power_law: float | None = None
    power_law_ci: Interval | None = None
    # By interpolating the baseline's measured losses, never extrapolated; None with the reason in the note.
    interpolated: float | None = None
    interpolated_note: str = ""
    # The target's replicates interpolated on the baseline's losses redrawn with the seed noise. An upper end
    # beyond the largest budget is None (unbounded), and so is a lower end short of the smallest; a lower end
    # beyond the largest is that budget's multiplier (all that the measurements can say).
    interpolated_ci: Interval | None = None
    decided: bool = False  # the paired comparison says the target is lower and both lower ends exceed 1
    decision: str = ""  # in words, also when not decided


def multiplier(loss: float, data_scaling: Fit, budgets: list[float], best_by_budget: list[float], world: int,
               ci: float, replicates: np.ndarray | None = None, baseline_sigma: float | None = None,
               seed: int = 0) -> Multiplier:
    """The multiplier of ``loss`` against the baseline's token law. ``replicates`` are bootstrap samples of the
    loss itself (an asymptote's), paired one to one with the token law's refits so both fits' uncertainty
    enters the interval; without them the loss is held fixed. The interpolated interval redraws the
    baseline's measured losses with ``baseline_sigma`` (the noise of a point's mean log loss), if given."""
    out = Multiplier(loss=loss)
    try:
        interp = scaling.multiplier_interpolated(loss, budgets, best_by_budget, world)
        out.interpolated = interp.value if interp.in_range else None
        out.interpolated_note = "" if interp.in_range else "outside the measured budgets (not extrapolated)"
        out.interpolated_ci = _interpolated_ci(loss, budgets, best_by_budget, world, ci, replicates, baseline_sigma,
                                               seed)
    except DataeffError as e:
        out.interpolated_note = str(e)
    if data_scaling.refused is not None:
        return out
    out.power_law = _bounded(float(scaling.multiplier_power_law(loss, data_scaling.power_law(), world)))
    d_fits = data_scaling.replicate_fits()
    if replicates is not None:
        n = min(len(replicates), len(d_fits))
        reps = np.array([scaling.multiplier_power_law(replicates[i], d_fits[i], world) for i in range(n)], dtype=float)
    else:
        reps = np.array([scaling.multiplier_power_law(loss, f, world) for f in d_fits], dtype=float)
    # Replicates whose loss lies below the token law's asymptote are infinite multipliers: order statistics
    # keep them (as +inf) where interpolating percentiles would turn them into nan.
    reps = np.sort(np.where(np.isnan(reps), np.inf, reps))
    q = [(1 - ci) / 2, (1 + ci) / 2]
    out.power_law_ci = tuple(_bounded(float(reps[round(p * (len(reps) - 1))])) for p in q)  # type: ignore[assignment]
    return out


def _interpolated_ci(loss: float, budgets: list[float], best_by_budget: list[float], world: int, ci: float,
                     replicates: np.ndarray | None, sigma: float | None, seed: int) -> Interval | None:
    if replicates is None and sigma is None:
        return None
    rng = np.random.default_rng(seed)
    n = len(replicates) if replicates is not None else 1000
    targets = np.asarray(replicates, dtype=float) if replicates is not None else np.full(n, loss)
    base = np.log(np.asarray(best_by_budget, dtype=float))
    values = []
    for t in targets:
        curve = np.exp(base + (rng.normal(0.0, sigma, len(base)) if sigma else 0.0))
        try:
            v = scaling.multiplier_interpolated(float(t), budgets, curve, world).value
        except DataeffError:  # this redraw of the baseline does not fall with every budget
            continue
        # Above the worst measured loss ranks below every measured budget, below the best beyond every one.
        values.append(0.0 if math.isnan(v) else v)
    if not values:
        return None
    reps = np.sort(values)
    lo, hi = (float(reps[round(p * (len(reps) - 1))]) for p in ((1 - ci) / 2, (1 + ci) / 2))
    # A lower end beyond every measured budget is known only to exceed the largest one's multiplier; one short
    # of the smallest budget is unknown.
    return (min(lo, max(budgets) / world) if lo > 0 else None, _bounded(hi))


def _bounded(v: float) -> float | None:
    return v if math.isfinite(v) else None


def finite_or_none(v: Any) -> float | None:
    """A loss as results record it: None for a failed run (inf or nan), its reason kept beside it."""
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None
