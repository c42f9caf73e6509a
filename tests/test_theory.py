"""EntiGraph's random-graph model: exact additions on hand-built graphs, the fast simulation against a naive
one and against the exact conditional expectation, the closed form against the simulation, the fit, and
the ``dataeff theory`` command."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from dataeff.cli import main as cli_main
from dataeff.errors import DataeffError
from dataeff.synth import theory as th
from dataeff.synth.expfit import PAPER_ENDPOINTS, PAPER_LAW, ExpLaw, fit_exponentials

CHAIN = th.from_edges(4, [(0, 1), (1, 2), (2, 3)])
# Two shortest routes 0 → 3; BFS from 0 queues 1 before 2, so 3's predecessor is 1.
DIAMOND = th.from_edges(5, [(0, 1), (0, 2), (1, 3), (2, 3), (3, 4)])


def naive_m(graph: th.SourceGraph, steps: list[tuple[int, int]], rule: th.Rule) -> list[set[tuple[int, int]]]:
    """M_t after each step, by applying the steps one at a time."""
    m = {tuple(e) for e in graph.edges.tolist()}
    out = []
    for x, y in steps:
        m |= set(th.step_pairs(graph, x, y, rule))
        out.append(set(m))
    return out


def test_paths_follow_the_bfs_queue():
    assert th.shortest_path(CHAIN, 0, 3) == [0, 1, 2, 3]
    assert th.shortest_path(CHAIN, 3, 0) == []
    assert th.shortest_path(DIAMOND, 0, 4) == [0, 1, 3, 4]
    assert DIAMOND.depth[0].tolist() == [0, 1, 1, 2, 3]
    assert DIAMOND.depth[4].tolist() == [-1, -1, -1, -1, 0]


def test_bfs_trees_are_shortest_path_trees():
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import shortest_path

    rng = np.random.default_rng(4)
    for lam in (1.2, 3.0):
        g = th.random_graph(80, lam, rng)
        adj = csr_matrix((np.ones(len(g.edges)), (g.edges[:, 0], g.edges[:, 1])), shape=(80, 80))
        dist = shortest_path(adj, unweighted=True)
        assert np.array_equal(np.where(np.isfinite(dist), dist, -1), g.depth)
        x, v = np.nonzero(g.depth >= 1)
        parent = g.pred[x, v]
        assert np.array_equal(g.depth[x, parent], g.depth[x, v] - 1)
        assert np.all(np.asarray(adj[parent, v]).ravel() == 1)


def test_step_additions_on_hand_built_graphs():
    assert th.step_pairs(CHAIN, 0, 3, "source") == [(0, 1), (0, 2), (0, 3)]
    assert sorted(th.step_pairs(CHAIN, 0, 3, "path")) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert th.step_pairs(CHAIN, 3, 1, "path") == []
    assert th.step_pairs(DIAMOND, 0, 4, "path") == [(0, 1), (0, 3), (0, 4), (1, 3), (1, 4), (3, 4)]
    with pytest.raises(DataeffError, match="two distinct entities"):
        th.step_pairs(CHAIN, 2, 2)

    # One step on (0, 3), then one on (1, 3): the source rule learns (0,2), (0,3), then (1,3).
    edges = {(0, 1), (1, 2), (2, 3)}
    for rule, after in (("source", [{(0, 2), (0, 3)}, {(0, 2), (0, 3), (1, 3)}]),
                        ("path", [{(0, 2), (0, 3), (1, 3)}, {(0, 2), (0, 3), (1, 3)}])):
        cover = th.cover_times(CHAIN, th.first_times_of(4, [(0, 3), (1, 3)]), rule)
        for t, new in enumerate(after, start=1):
            learned = {(u, v) for u, v in zip(*np.nonzero(cover <= t), strict=True)}
            assert learned == edges | new
        assert th.accuracy_curve(cover, [1, 2]).tolist() == [len(edges | a) / 12 for a in after]


def test_covering_counts_are_the_number_of_covering_samples():
    # Source rule: (x, v) is covered by (x, y) for y in v's subtree; path rule: by every (x, y) through both.
    src = th.covering_counts(CHAIN, "source")
    path = th.covering_counts(CHAIN, "path")
    assert (src[0, 2], src[0, 3], src[1, 3]) == (2, 1, 1)
    assert (path[0, 2], path[0, 3], path[1, 3]) == (2, 1, 2)
    assert src[0, 1] == 0 and src[3, 0] == 0  # a source relation, an unreachable pair
    for rule in th.RULES:
        counts = th.covering_counts(DIAMOND, rule)
        for u, v in itertools.permutations(range(5), 2):
            if DIAMOND.depth[u, v] >= 2:
                brute = sum((u, v) in th.step_pairs(DIAMOND, x, y, rule)
                            for x, y in itertools.permutations(range(5), 2))
                assert counts[u, v] == brute


@pytest.mark.parametrize("rule", th.RULES)
def test_expected_accuracy_is_exact_by_enumeration(rule):
    # Every sequence of 2 steps over the 12 ordered pairs of the chain, equally likely.
    pairs = list(itertools.permutations(range(4), 2))
    sizes = [len(naive_m(CHAIN, list(seq), rule)[-1]) for seq in itertools.product(pairs, repeat=2)]
    assert th.expected_accuracy(CHAIN, [2], rule)[0] == pytest.approx(np.mean(sizes) / 12, abs=1e-12)


@pytest.mark.parametrize("rule", th.RULES)
def test_fast_cover_times_match_naive_stepping(rule):
    rng = np.random.default_rng(7)
    for _ in range(5):
        graph = th.random_graph(12, 1.8, rng)
        steps = [tuple(rng.choice(12, size=2, replace=False)) for _ in range(60)]
        cover = th.cover_times(graph, th.first_times_of(12, steps), rule)
        for t, m in enumerate(naive_m(graph, steps, rule), start=1):
            assert {(u, v) for u, v in zip(*np.nonzero(cover <= t), strict=True)} == m


def test_first_sample_times_have_the_uniform_sampling_law():
    rng = np.random.default_rng(0)
    n, pairs, draws = 4, 12, 4000
    times = np.array([th.first_sample_times(n, rng)[~np.eye(n, dtype=bool)] for _ in range(draws)])
    # Each pair's first sampling time is Geometric(1/N): mean N, and P(T > t) = (1 - 1/N)^t.
    assert times.mean() == pytest.approx(pairs, rel=0.03)
    assert (times > 20).mean() == pytest.approx((1 - 1 / pairs) ** 20, abs=0.01)
    # No two pairs first appear at the same step, and the very first step samples a uniform pair.
    assert all(len(set(row)) == pairs for row in times[:50])
    first = np.bincount(times.argmin(axis=1), minlength=pairs) / draws
    assert np.abs(first - 1 / pairs).max() < 0.03


@pytest.mark.parametrize("rule", th.RULES)
def test_simulation_averages_to_the_exact_conditional_expectation(rule):
    rng = np.random.default_rng(3)
    graph = th.random_graph(60, 2.0, rng)
    steps = [10, 100, 1000, 5000, 20000]
    curves = np.array([th.accuracy_curve(th.cover_times(graph, th.first_sample_times(60, rng), rule), steps)
                       for _ in range(300)])
    se = curves.std(axis=0, ddof=1) / math.sqrt(len(curves))
    exact = th.expected_accuracy(graph, steps, rule)
    assert np.all(np.abs(curves.mean(axis=0) - exact) <= 4 * se + 1e-12)
    assert exact[-1] == pytest.approx(graph.reach, abs=1e-3)


def test_simulation_is_reproducible():
    a = th.simulate(80, 2.0, [10, 1000, 10**6], reps=4, seed=5)
    b = th.simulate(80, 2.0, [10, 1000, 10**6], reps=4, seed=5)
    c = th.simulate(80, 2.0, [10, 1000, 10**6], reps=6, seed=5)
    d = th.simulate(80, 2.0, [10, 1000, 10**6], reps=4, seed=6)
    assert np.array_equal(a.curves, b.curves)
    assert np.array_equal(a.curves, c.curves[:4])  # more replicates leave the first ones alone
    assert not np.array_equal(a.curves, d.curves)


def test_extinction_probability_and_reach():
    rho = th.extinction_probability(2.0)
    assert rho == pytest.approx(math.exp(2.0 * (rho - 1)), abs=1e-12) and 0 < rho < 1
    assert th.extinction_probability(0.8) == 1.0
    # The exact finite-V reach against a Monte Carlo of reachable pairs, and its V → ∞ limit (1 − ρ)².
    rng = np.random.default_rng(1)
    reach = [th.random_graph(30, 1.5, rng).reach for _ in range(250)]
    assert th.exact_reach(30, 1.5) == pytest.approx(np.mean(reach), abs=4 * np.std(reach) / math.sqrt(250))
    limit = (1 - th.extinction_probability(1.5)) ** 2
    assert abs(th.exact_reach(600, 1.5) - limit) < abs(th.exact_reach(100, 1.5) - limit) < 0.05
    assert th.exact_reach(600, 4.0) == pytest.approx((1 - th.extinction_probability(4.0)) ** 2, abs=2e-3)


def _agrees(n: int, lam: float, reps: int = 30, seed: int = 0) -> tuple[th.Agreement, th.Agreement, th.Simulation,
                                                                      th.ClosedForm]:
    sim = th.simulate(n, lam, th.DEFAULT_STEPS, reps, seed=seed)
    closed = th.closed_form(n, lam, sim.steps)
    return th.agreement(sim, closed.accuracy), th.agreement(sim, closed.paper_form), sim, closed


def _check(n: int, lam: float) -> None:
    ours, paper, sim, closed = _agrees(n, lam)
    # Inside the simulation's 99.95% interval (3.5 standard errors) at every one of the 25 steps. The 95%
    # share is not asserted: past saturation the steps repeat one random number, the replicates' mean reach.
    assert ours.max_abs_z < 3.5, ours
    # One mean rate per distance (the paper's form) overshoots the middle of the curve.
    assert paper.max_abs_diff > 0.05 and paper.inside_fraction < 0.85, paper
    # Saturation: every pair has been sampled by the last step, so the curve sits at its graphs' reach,
    # which the closed form's plateau (the exact expected reach) matches within the interval.
    assert sim.mean[-1] == pytest.approx(sim.reach.mean(), abs=1e-12)
    assert closed.accuracy[-1] == pytest.approx(closed.p + closed.C, abs=1e-9)
    assert sim.low[-1] <= closed.reach <= sim.high[-1]
    assert np.all(np.diff(closed.accuracy) >= -1e-12) and np.all(np.diff(sim.mean) >= 0)


@pytest.mark.parametrize("lam", [1.5, 2.0, 4.0])
def test_closed_form_matches_simulation_v200(lam):
    _check(200, lam)


@pytest.mark.slow
@pytest.mark.parametrize("lam", [1.5, 2.0, 4.0])
def test_closed_form_matches_simulation_v500(lam):
    _check(500, lam)


def test_closed_form_pieces():
    closed = th.closed_form(400, 3.0, [1, 10**3, 10**9])
    assert closed.p == pytest.approx(3.0 / 400)
    assert closed.mu.sum() == pytest.approx(1.0)
    assert np.all(np.diff(closed.a_k[closed.mu > 1e-6]) < 0)  # nearer pairs are covered faster
    assert closed.accuracy[0] == pytest.approx(closed.p, abs=1e-4)
    assert closed.accuracy[-1] == pytest.approx(closed.reach)
    assert abs(closed.C + closed.p - closed.C_lambda) < 0.01
    sub = th.closed_form(400, 0.7, [1, 10**9])
    assert sub.accuracy is None and sub.paper_form is None and 0 < sub.reach < 0.05
    assert th.closed_form(200, 2.0, [10], rule="path").accuracy is None


# ---------------------------------------------------------------------------------------------------------
# The fit


def test_fit_recovers_known_laws():
    true = ExpLaw(a=60.0, b=(15.0, 8.0), r=(0.98, 0.7))
    x = np.linspace(0, 200, 15)
    fit = fit_exponentials(x, true(x), 2, bootstrap=0)
    assert fit.law.a == pytest.approx(60.0, rel=1e-6)
    assert fit.law.b == pytest.approx((15.0, 8.0), rel=1e-5) and fit.law.r == pytest.approx((0.98, 0.7), rel=1e-6)
    # The paper's published law, sampled where its fast term is visible, comes back term by term.
    x = np.array([0, 1, 2, 4, 8, 15, 30, 60, 120, 240, 455.0])
    paper = fit_exponentials(x, PAPER_LAW(x), 3, bootstrap=0).law
    assert paper.a == pytest.approx(PAPER_LAW.a, rel=1e-6) and paper.r == pytest.approx(PAPER_LAW.r, rel=1e-5)
    assert PAPER_LAW(455.0) == pytest.approx(PAPER_ENDPOINTS[1][1], abs=0.1)


def test_fit_intervals_cover_at_roughly_the_nominal_rate():
    true = ExpLaw(a=60.0, b=(20.0,), r=(0.9,))
    x = np.linspace(0, 40, 11)
    sigma, runs, level = 0.5, 16, 0.8
    rng = np.random.default_rng(0)
    fits = [fit_exponentials(x, true(x) + rng.normal(0, sigma, len(x)), 1, bootstrap=50, ci=level, seed=i)
            for i in range(runs)]
    coverage = np.mean([f.a_low <= true.a <= f.a_high for f in fits])
    assert 0.5 <= coverage <= 1.0  # nominal 0.8: 12.8 of 16 expected, sd 1.6
    # Not covering by being uselessly wide: widths near the linearised standard error's.
    k = -math.log(true.r[0])
    e = np.exp(-k * x)
    jac = np.stack([np.ones_like(x), -e, true.b[0] * x * e], axis=1)
    se_a = sigma * math.sqrt(np.linalg.inv(jac.T @ jac)[0, 0])
    width = np.median([f.a_high - f.a_low for f in fits])
    assert 0.4 < width / (2 * 1.2816 * se_a) < 2.5
    assert all(f.pred_low[i] <= f.pred[i] <= f.pred_high[i] for f in fits for i in range(len(x)))


def test_fit_refuses_too_few_points():
    with pytest.raises(DataeffError, match="needs at least 8") as e:
        fit_exponentials(np.arange(7.0), np.arange(7.0), 3)
    assert "\n" not in str(e.value)
    with pytest.raises(DataeffError, match="2 distinct x values"):
        fit_exponentials(*zip(*PAPER_ENDPOINTS, strict=True), m=1)
    with pytest.raises(DataeffError, match="distinct"):
        fit_exponentials([0, 0, 1, 1, 2, 2], [1, 1, 2, 2, 3, 3], 2)


# ---------------------------------------------------------------------------------------------------------
# The command


def test_cli_writes_strict_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "th"
    assert cli_main(["theory", "V=120", "lam=2.5", "reps=4", "steps=[1,100,10000,1000000]", f"out={out}",
                     "progress=false"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["json"] == str(out / "theory.json")

    def refuse(token: str) -> float:
        raise ValueError(token)

    data = json.loads((out / "theory.json").read_text(), parse_constant=refuse)
    assert data["steps"] == [1, 100, 10000, 1000000] and data["config"]["V"] == 120
    assert len(data["simulation"]["mean"]) == 4 and len(data["closed_form"]["accuracy"]) == 4
    assert data["closed_form"]["reach"] == pytest.approx(th.exact_reach(120, 2.5))
    assert (out / "theory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["theory.json", "theory.png"]  # no temporary files left


def test_cli_help_lists_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["theory", "--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(th.TheoryConfig):
        assert f"  {field.name} " in text, field.name


@pytest.mark.parametrize(("arg", "message"), [
    ("V=1", "theory.V: 1 must be between 2"),
    ("lam=0", "theory.lam: 0.0 must be a number > 0"),
    ("lam=-1.5", "theory.lam: -1.5 must be a number > 0"),
    ("steps=[]", "theory.steps: empty step grid"),
    ("steps=[10,0]", "theory.steps: 0 is not a step count"),
    ("reps=1", "theory.reps: 1 must be at least 2"),
])
def test_cli_bad_input_gets_one_line(arg: str, message: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["theory", arg, f"out={tmp_path / 'x'}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dataeff: error: ") and message in err
    assert not (tmp_path / "x").exists()
