"""Paired comparisons, profile-likelihood intervals and decided multipliers, on synthetic curves (no training)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dataeff.errors import DataeffError
from dataeff.experiment import paired, profile
from dataeff.experiment.config import PipelineConfig, Results, read_results, write_results
from dataeff.experiment.stages.tuning import TuningProblem, analyse
from dataeff.experiment.tune import Evaluation, RecipeConfig, Tuner, TuneResult
from dataeff.report import write_report

X = np.array([1e4, 4e4, 1.6e5, 6.4e5, 2.56e6])


def law(e: float, a: float, alpha: float, x: np.ndarray) -> np.ndarray:
    return e + a * x**-alpha


def seeds(curve: np.ndarray, shared: np.ndarray, own: float, rng: np.random.Generator) -> list[list[float]]:
    """Per-seed losses: a shared seed effect (the same init and data order in both recipes) plus each run's own."""
    return (curve[:, None] * np.exp(shared + rng.normal(0.0, own, shared.shape))).tolist()


def test_paired_interval_decides_a_gap_the_marginals_cannot():
    rng = np.random.default_rng(3)
    shared = rng.normal(0.0, 0.01, (len(X), 3))
    a = seeds(law(3.0, 40.0, 0.4, X), shared, 0.002, rng)
    b = seeds(law(3.08, 40.0, 0.4, X), shared, 0.002, rng)
    r = paired.paired_asymptotes(X, a, b, n_boot=150, seed=0)
    assert r.method == "parametric" and r.noise is not None and r.noise.rho > 0.8
    assert r.lo < -0.08 + 0.05 and r.hi < 0, r
    assert paired.verdict(r.lo, r.hi) == "lower"
    points, dof = paired.paired_at_sizes(a, b)
    assert dof == len(X) * 2
    assert all(p.hi is not None and p.hi < 0 for p in points)


def test_paired_resamples_seeds_when_there_are_enough_and_says_so():
    rng = np.random.default_rng(4)
    shared = rng.normal(0.0, 0.01, (len(X), 6))
    a = seeds(law(3.0, 40.0, 0.4, X), shared, 0.003, rng)
    b = seeds(law(3.0, 40.0, 0.4, X), shared, 0.003, rng)
    r = paired.paired_asymptotes(X, a, b, n_boot=150, seed=0)
    assert r.method == "seeds"
    assert r.lo < 0 < r.hi
    assert paired.verdict(r.lo, r.hi) == "not distinguishable"


def test_paired_falls_back_to_a_given_sigma_and_refuses_without_one():
    one = [[float(v)] for v in law(3.0, 40.0, 0.4, X)]
    with pytest.raises(DataeffError, match="seed noise is unmeasured"):
        paired.paired_asymptotes(X, one, one, n_boot=50)
    r = paired.paired_asymptotes(X, one, one, n_boot=50, sigma=0.01)
    assert r.method == "parametric-independent" and r.noise is None


def test_profile_bounds_a_well_measured_asymptote_and_covers_it():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(12):
        y = law(3.0, 40.0, 0.4, X) * np.exp(rng.normal(0.0, 0.003, len(X)))
        p = profile.profile_E(X, y, 0.003)
        assert p.bounded_below and p.lo < p.E < p.hi
        hits += p.lo <= 3.0 <= p.hi
    assert hits >= 10


def test_profile_says_when_e_is_not_bounded_and_what_would_bound_it():
    x = X[:4]
    y = law(3.0, 40.0, 0.25, x) * np.exp(np.array([0.01, -0.01, 0.01, -0.005]))
    p = profile.profile_E(x, y, 0.03, sigma_dof=4)
    assert not p.bounded_below and p.lo == 0.0
    assert p.cut > profile.cut(0.95, None)  # F(1, 4) is wider than χ²₁
    floored = profile.profile_E(x, y, 0.03, floor=2.5)
    assert floored.lo >= 2.5
    s = profile.suggest(x, y, 0.03, 2, next_sizes=[("next", 1e8), ("after", 1e10)])
    assert [v.what for v in s][:2] == ["one more seed at every size (3)", "twice the seeds (4)"]
    assert s[-1].projected_lo >= s[0].projected_lo


def _problem(recipe: RecipeConfig, size: str, budget: int, losses: list[float]) -> TuningProblem:
    t = TuningProblem(recipe, size, budget, Tuner(recipe))
    best = {"optim.lr": 3e-3, "train.epochs": 4}
    t.result = TuneResult(recipe.name, best, float(np.mean(losses)), True, "ok",
                          [Evaluation(best, float(np.mean(losses)), f"runs/{recipe.name}-{size}-{budget}", None, losses)])
    return t


def test_analyse_records_paired_comparisons_profiles_and_decisions(tmp_path):
    recipes = [RecipeConfig("standard", {"optim.lr": [1e-3, 3e-3], "train.epochs": [2, 4]}),
               RecipeConfig("regularized", {"optim.lr": [1e-3, 3e-3], "train.epochs": [2, 4]})]
    cfg = PipelineConfig(name="synthetic", root=str(tmp_path), recipes=recipes, sizes=["pico", "nano", "micro", "mini"],
                         seeds=[0], confirm_seeds=[1, 2])
    cfg.base.data.train_tokens = world = 40_000
    cfg.fit.n_boot = 100
    cfg.data_scaling.budgets = [10_000, 20_000, 80_000]
    cfg.data_scaling.sizes = ["mini"]
    vocab = 256
    from dataeff.experiment.stages.tuning import _params

    n = np.array([_params(cfg, s, vocab) for s in cfg.sizes], dtype=float)
    rng = np.random.default_rng(1)
    shared = rng.normal(0.0, 0.004, (len(n), 3))
    curves = {"standard": law(3.2, 60.0, 0.45, n), "regularized": law(2.9, 60.0, 0.45, n)}
    tasks = [_problem(r, s, world, seeds(curves[r.name], shared, 0.001, rng)[i])
             for r in recipes for i, s in enumerate(cfg.sizes)]
    # The baseline's token law L(D) = 2.5 + c·D^-0.35 passes through the standard recipe's best loss at the world.
    c_d = (curves["standard"][-1] - 2.5) * world**0.35
    for b in cfg.data_scaling.budgets:
        d_loss = 2.5 + c_d * b**-0.35
        tasks.append(_problem(recipes[0], "mini", b, [d_loss * math.exp(rng.normal(0, 0.001)) for _ in range(3)]))
    t = analyse(cfg, tasks, vocab, world)

    (c,) = t.comparisons
    assert (c.a, c.b, c.method, c.verdict) == ("regularized asymptote", "standard asymptote", "parametric", "lower")
    assert c.ci is not None and c.ci[1] is not None and c.ci[1] < 0
    assert "regularized asymptote is lower than standard asymptote, decided" in c.sentence
    assert [d.verdict for d in c.at_sizes] == ["lower"] * 4
    assert set(t.profiles) == {"standard", "regularized"}
    assert t.seed_dof == (8 + 3) * 2  # every tuned optimum, data-scaling budgets included, on 3 seeds
    assert all(p.statement for p in t.profiles.values())
    m = t.multipliers["regularized asymptote"]
    assert m.decided and m.decision.startswith("decided")
    assert m.power_law_ci is not None and m.power_law_ci[0] is not None and m.power_law_ci[0] > 1
    # Below every measured baseline loss: the interpolation says only "more than the largest budget".
    assert m.interpolated_ci == (80_000 / world, None)
    assert t.multipliers["standard asymptote"].decision.startswith("not decided")
    assert any("paired" in line or "−" in line for line in t.verdict)

    path = tmp_path / "results.json"
    write_results(path, Results(name="synthetic", world_tokens=world, config=cfg, stages={"tuning": t}))
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    back = read_results(path)["tuning"]
    assert back.comparisons == t.comparisons and back.profiles == t.profiles
    report = write_report(tmp_path)["markdown"].read_text()
    assert "Paired comparisons" in report and "Profile-likelihood intervals of E" in report
    assert c.sentence in report


def test_designs_whose_intervals_under_covered_are_refused_before_training(monkeypatch):
    from dataeff.errors import DataeffWarning
    from dataeff.experiment import coverage

    rows = ({"sizes": 4, "seeds": 2, "bootstrap": 0.95, "profile": 0.85, "paired": 0.93},
            {"sizes": 5, "seeds": 2, "bootstrap": 0.95, "profile": 0.94, "paired": 0.95})
    monkeypatch.setattr(coverage, "_rows", lambda: rows)
    with pytest.raises(DataeffError, match="profile 85%"):
        coverage.check(4, 2, 0.95, "refuse")
    with pytest.warns(DataeffWarning, match="profile 85%"):
        assert coverage.check(4, 2, 0.95, "warn") is rows[0]
    assert coverage.check(9, 7, 0.95, "refuse") is rows[1]  # beyond the study: its largest design
    with pytest.warns(DataeffWarning, match="did not measure 3 sizes"):
        assert coverage.check(3, 2, 0.95, "refuse") is None
    assert coverage.check(4, 2, 0.95, "off") is None
