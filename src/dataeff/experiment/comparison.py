"""The decisions as the pipeline's stages record them: paired differences of two recipes (at the asymptote and at
each matched size) and profile-likelihood intervals of an asymptote, each with its verdict in words.

The math is :mod:`dataeff.experiment.paired` and :mod:`dataeff.experiment.profile`; this module turns it into
typed results for ``results.json`` and the sentences the report and the verdict quote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from dataeff.errors import DataeffError
from dataeff.experiment import paired, profile
from dataeff.experiment.fitting import FitConfig, Interval

_METHOD_TEXT = {
    "seeds": "paired bootstrap resampling seeds jointly across recipes and sizes",
    "parametric": "paired parametric bootstrap: seed noise and its cross-recipe correlation pooled over the points "
                  "with several seeds",
    "parametric-independent": "parametric bootstrap with the given σ and no correlation (one seed per point: the "
                              "pairing is unmeasured)",
    "independent": "difference of independent bootstrap replicates (the two fits share no runs)",
}


@dataclass
class SizeDifference:
    """Mean loss of A minus that of B at one size, with the pooled paired t interval (None: one seed)."""

    size: str
    params: int
    diff: float
    ci: Interval
    n_seeds: int
    verdict: str


@dataclass
class Comparison:
    """``a − b``: the difference of two asymptotes with its interval and verdict, and of losses at matched sizes."""

    a: str
    b: str
    refused: str | None = None
    diff: float | None = None
    ci: Interval | None = None
    method: str | None = None  # seeds, parametric, parametric-independent or independent
    noise: dict[str, float] | None = None  # sigma_a, sigma_b (one run's log loss), rho, dof
    n_boot: int | None = None
    n_skipped: int | None = None
    verdict: str = "not distinguishable"  # of a relative to b: lower, higher, not distinguishable
    sentence: str = ""
    at_sizes: list[SizeDifference] = field(default_factory=list)
    at_sizes_dof: int | None = None

    @property
    def decided_lower(self) -> bool:
        return self.refused is None and self.verdict == "lower"


def _sentence(c: Comparison, ci: float) -> str:
    if c.refused is not None:
        return f"{c.a} vs {c.b}: no paired comparison ({c.refused})"
    assert c.diff is not None and c.ci is not None
    lo, hi = c.ci
    head = f"{c.a} − {c.b} = {c.diff:+.4f} [{_num(lo)}, {_num(hi)}] ({ci:.0%} {c.method} interval)"
    if c.verdict == "lower":
        return f"{head}: {c.a} is lower than {c.b}, decided"
    if c.verdict == "higher":
        return f"{head}: {c.a} is higher than {c.b}, decided"
    return f"{head}: not distinguishable, the data do not decide whether {c.a} is lower than {c.b}"


def _num(v: float | None) -> str:
    return "unbounded" if v is None else f"{v:+.4f}"


def compare_recipes(a: str, b: str, sizes: list[str], params: list[int], runs_a: list[list[float]],
                    runs_b: list[list[float]], f: FitConfig, sigma_run: float | None) -> Comparison:
    """The paired comparison of recipes a and b over the sizes where both have finite losses (seeds in the same
    order); ``sigma_run`` is the fallback seed noise of one run when no point has several seeds."""
    c = Comparison(a=f"{a} asymptote", b=f"{b} asymptote")
    points, dof = paired.paired_at_sizes(runs_a, runs_b, ci=f.ci)
    c.at_sizes_dof = dof or None
    c.at_sizes = [SizeDifference(s, n, p.diff, (p.lo, p.hi), p.n_seeds, paired.verdict(p.lo, p.hi))
                  for s, n, p in zip(sizes, params, points, strict=True)]
    try:
        r = paired.paired_asymptotes([float(n) for n in params], runs_a, runs_b, n_boot=f.n_boot, seed=f.seed, ci=f.ci,
                                     method=f.paired_method, min_seed_resample=f.min_seed_resample, sigma=sigma_run)
    except DataeffError as e:
        c.refused = str(e)
    else:
        c.diff, c.ci, c.method, c.n_boot, c.n_skipped = r.diff, (r.lo, r.hi), r.method, r.n_boot, r.n_skipped
        if r.noise is not None:
            c.noise = {"sigma_a": r.noise.sigma_a, "sigma_b": r.noise.sigma_b, "rho": r.noise.rho, "dof": r.noise.dof}
        c.verdict = paired.verdict(r.lo, r.hi)
    c.sentence = _sentence(c, f.ci)
    return c


def compare_samples(a: str, b: str, diff: float, samples_a: np.ndarray, samples_b: np.ndarray, ci: float) -> Comparison:
    """``a − b`` from independent bootstrap replicates of each (fits that share no runs), paired by index."""
    n = min(len(samples_a), len(samples_b))
    d = np.asarray(samples_a[:n], dtype=float) - np.asarray(samples_b[:n], dtype=float)
    d = d[np.isfinite(d)]
    c = Comparison(a=a, b=b, diff=diff, method="independent", n_boot=n, n_skipped=n - len(d))
    if len(d) == 0:
        c.refused = "no replicate of both"
    else:
        lo, hi = np.quantile(d, [(1 - ci) / 2, (1 + ci) / 2], method="inverted_cdf")
        c.ci = (float(lo), float(hi))
        c.verdict = paired.verdict(*c.ci)
    c.sentence = _sentence(c, ci)
    return c


def method_text(method: str | None) -> str:
    return _METHOD_TEXT.get(method or "", method or "")


@dataclass
class SuggestionResult:
    what: str
    projected_lo: float
    bounds: bool


@dataclass
class ProfileResult:
    """The profile-likelihood interval of one law's E, and whether the data bound it from below."""

    refused: str | None = None
    E: float | None = None  # the least-squares optimum (the Huber fit's E may differ slightly)
    ci: Interval | None = None  # lower end: the floor when not bounded below; upper end: None when unbounded above
    bounded_below: bool = False
    floor: float = 0.0
    floor_is_entropy: bool = False  # the floor is a known entropy (fit.entropy_floor), not 0
    cut: float | None = None
    chi2_min: float | None = None
    n_points: int | None = None
    sigma: float | None = None  # the noise of one run's log loss
    sigma_dof: int | None = None
    statement: str = ""
    suggestions: list[SuggestionResult] = field(default_factory=list)


def profile_result(name: str, x: list[float], y: list[float], n_seeds: list[int], sigma_run: float | None,
                   sigma_dof: int | None, f: FitConfig, next_sizes: list[tuple[str, float]]) -> ProfileResult:
    """E's profile interval for the law of ``name`` (points ``x, y`` with ``n_seeds`` seeds each), in words."""
    floor = f.entropy_floor or 0.0
    out = ProfileResult(floor=floor, floor_is_entropy=f.entropy_floor is not None, n_points=len(x),
                        sigma=sigma_run, sigma_dof=sigma_dof)
    if sigma_run is None:
        out.refused = "one seed per point: the seed noise the χ² needs is unmeasured (add confirm_seeds or set fit.sigma)"
        out.statement = f"{name}: no profile-likelihood interval ({out.refused})"
        return out
    sigma = [sigma_run / math.sqrt(max(n, 1)) for n in n_seeds]
    try:
        p = profile.profile_E(x, y, sigma, ci=f.ci, floor=floor, sigma_dof=sigma_dof)
    except DataeffError as e:
        out.refused = str(e)
        out.statement = f"{name}: no profile-likelihood interval ({e})"
        return out
    out.E, out.ci = p.E, (p.lo, p.hi if p.bounded_above else None)
    out.bounded_below, out.cut, out.chi2_min = p.bounded_below, p.cut, p.chi2_min
    floor_text = f"the known entropy floor {floor:.4f}" if out.floor_is_entropy else f"{floor:g}"
    head = f"{name}: E = {p.E:.4f}, {f.ci:.0%} profile-likelihood interval [{p.lo:.4f}, " \
           f"{f'{p.hi:.4f}' if p.bounded_above else 'unbounded'}]"
    if p.bounded_below:
        out.statement = f"{head}; bounded from below by the data"
        return out
    typical = round(float(np.median(n_seeds))) if n_seeds else 1
    try:
        s = profile.suggest(x, y, sigma_run / math.sqrt(typical), typical, ci=f.ci, floor=floor, sigma_dof=sigma_dof,
                            next_sizes=next_sizes)
    except DataeffError:
        s = []
    out.suggestions = [SuggestionResult(v.what, v.projected_lo, v.bounds) for v in s]
    helps = [v for v in out.suggestions if v.bounds]
    advice = (f"{helps[0].what} is projected to bound it (lower end {helps[0].projected_lo:.4f})" if helps else
              "no single extra size or seed count tried (" + ", ".join(v.what for v in out.suggestions) +
              ") is projected to bound it")
    out.statement = (f"{head}; the data do NOT bound E from below: E = {floor_text} is within the χ² cut. "
                     f"{advice[0].upper()}{advice[1:]}")
    return out
