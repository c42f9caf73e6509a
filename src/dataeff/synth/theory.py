"""EntiGraph's random-graph model of knowledge acquisition (Yang et al., ICLR 2025, §6 and App. G).

The model (paper's). V entities; the source corpus holds the relations of a directed Erdős–Rényi graph G_0,
each ordered pair (x, y), x ≠ y, present independently with probability p = λ/V. The learner memorises
exactly what it reads, so its knowledge M_0 is the edge set of G_0. Each EntiGraph step samples an ordered
pair (x, y) of distinct entities uniformly; if y is reachable from x, it writes out a shortest path
x = z_1 → … → z_k = y (found by breadth-first search from x; a vertex's predecessor is the first vertex in
the BFS queue that reaches it) and the learner adds relations from that path to M_t. The paper's accuracy
is the link density of the learned graph, Acc(M_t) = E[|M_t| | M_0] / (V(V−1)): the expectation over
synthesis steps given the source graph. Which pairs a step adds is the ``rule``:

- ``source`` (the paper's): (x, z_i) for every z_i on the path, i.e. what x relates to. The paper's bounds
  (Theorem 1: growth per step at most ≈ log V / log λ pairs) count this rule; it is the default.
- ``path``: every pair (z_i, z_j), i < j, on the path (what an essay about all the path's entities states).

Simulation (ours). Within one graph a pair's path is fixed, so only the first time each ordered pair is
sampled matters. Those times have an exact joint law: the order in which distinct pairs first appear is a
uniform permutation, and the wait for the m-th new pair is Geometric((N − m + 1)/N), N = V(V−1). A pair
(u, v) then enters M_t at the first sampling time of any (x, y) whose path covers it: for ``source`` a
minimum of first-sampling times over v's subtree in x's BFS tree, propagated level by level; for ``path``
those subtree minima pushed to every ancestor of v. The whole curve Acc(t), for every t at once, costs one
BFS per source and O(V² · depth) vectorised work per replicate, independent of t (measured in
``bench/theory_speed.py``). :func:`covering_counts` and :func:`expected_accuracy` give the exact
conditional expectation E[Acc(M_t) | M_0] = (|M_0| + Σ_{(u,v) ∉ M_0} 1 − (1 − n(u,v)/N)^t) / N, where
n(u, v) counts the sampled pairs that cover (u, v): already a mixture of exponentials, one rate per pair.

Closed form. The paper's approximation is Acc(M_t) ≈ p + C (1 − Σ_k μ(k) (1 − a_k)^t), with C the
reachable fraction (→ C_λ = (1 − ρ)², ρ the extinction probability of a Poisson(λ) branching process),
μ(k) the share of reachable pairs at distance k and a_k their per-step covering probability. Taking a_k as
the mean covering probability of a distance-k pair (``paper_form``; exact for small t) overshoots the
simulation by 0.07–0.12 in the middle of the curve, because pairs at one distance are covered at rates
that differ by orders of magnitude (a leaf of the BFS tree only when itself sampled, a vertex near the
root by most samples through it). Our closed form (``source`` rule, λ > 1) keeps the paper's structure and
makes each ingredient explicit:

1. Profiles: a root's BFS level sizes are a branching process with depletion. Roots are typed by the
   generation-n size Z_n of the Poisson(λ) Galton–Watson process (λ^n ≥ 300), with the exact conditional
   means E[Z_j | type] from generating functions and an FFT (:func:`root_types`); each type's profile then
   follows f_0 = 1, f_{j+1} = (r_j/λ) u_j (1 − (1−p)^{f_j}), u_{j+1} = u_j − f_{j+1}, u_0 = V − 1, with
   r_j its conditional growth ratio (λ once past generation n). μ(k) ∝ E f_k.
2. Covering rates: a pair (x, v) is covered by the samples (x, y) with y in v's subtree, so its rate is
   S/N with S the subtree size. In FIFO BFS a level-j vertex at queue position s ∈ [0, 1) gets
   Poisson(u_j p (1−p)^{s f_j}) children, all at position (1 − (1−p)^{s f_j}) / (1 − (1−p)^{f_j}) of the
   next level, so the subtree-size pgf obeys H_j(s; z) = z exp(μ_j(s) (H_{j+1}(G_j(s); z) − 1)), and
   E (1 − S/N)^t ≈ H_j(s; (1 − 1/N)^t): a continuous mixture of exponentials whose mean rate is the
   paper's a_k.
3. Plateau: E|{y reachable from x}| equals the expected component size in the undirected G(V, p) (both
   explorations query each explored–unexplored pair once), computed exactly by the vertex-at-a-time
   exploration chain; C = reach − p, and the branching part is rescaled by κ to end exactly there
   (κ = 0.94 at V = 200, λ = 1.5; 1.00 at λ = 4). As V → ∞, C → C_λ.

``docs/theory.md`` has the derivation and the measured agreement: at V ∈ {200, 500}, λ ∈ {1.5, 2, 4} and
100 replicates every step lies inside the 95% Monte Carlo interval (largest gap 0.005, largest |z| 1.5),
while the paper's form with one rate per distance is 0.07–0.12 off. For the ``path`` rule only that
distance-grouped form is given (a_k = Σ_{j≥k} (j−k+1) m_j / (m_k N)); it is 0.08–0.14 off.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.figure import Figure
from scipy import stats
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import breadth_first_order
from scipy.special import lambertw
from tqdm import tqdm

from dataeff.config import option, to_dict
from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_path, atomic_write_text

Rule = Literal["source", "path"]
RULES: tuple[Rule, ...] = ("source", "path")
NEVER = np.iinfo(np.int64).max  # cover time of a pair no step ever adds
_MAX_V = 30000  # depths are int16, and V² matrices of int64 must fit in memory long before this
# 1, 2, 5, 10, ..., 1e8: past saturation (≈ V² log V² steps) for V up to ~2000.
DEFAULT_STEPS = [m * 10**e for e in range(8) for m in (1, 2, 5)] + [10**8]


# ---------------------------------------------------------------------------------------------------------
# Source graphs


@dataclass(frozen=True)
class SourceGraph:
    """A directed graph with every source's BFS tree: ``depth[x, v]`` (−1 unreachable, 0 on the diagonal)
    and ``pred[x, v]`` (v's parent in x's tree, −1 for none)."""

    n: int
    edges: np.ndarray  # (E, 2) int64, sorted, no self-loops or duplicates
    depth: np.ndarray  # (n, n) int16
    pred: np.ndarray  # (n, n) int32

    @property
    def density(self) -> float:
        """|M_0| / (V(V−1))."""
        return len(self.edges) / (self.n * (self.n - 1))

    @property
    def reach(self) -> float:
        """The fraction of ordered pairs (x, y), x ≠ y, with y reachable from x: the plateau of Acc."""
        return float(np.count_nonzero(self.depth > 0)) / (self.n * (self.n - 1))


def from_edges(n: int, edges: Any) -> SourceGraph:
    """The graph on ``n`` vertices with these directed edges, and its BFS trees (FIFO queue order)."""
    if n < 2 or n > _MAX_V:
        raise DataeffError(f"graph: V={n} must be between 2 and {_MAX_V}")
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if len(e) and (e.min() < 0 or e.max() >= n):
        raise DataeffError(f"graph: edge endpoints must lie in 0..{n - 1}")
    if np.any(e[:, 0] == e[:, 1]):
        raise DataeffError("graph: self-loops are not relations between two entities")
    e = np.unique(e, axis=0)
    adj = csr_matrix((np.ones(len(e), dtype=np.int8), (e[:, 0], e[:, 1])), shape=(n, n))
    depth = np.full((n, n), -1, dtype=np.int16)
    pred = np.full((n, n), -1, dtype=np.int32)
    for s in range(n):
        order, parents = breadth_first_order(adj, s, directed=True, return_predecessors=True)
        reached = order[1:]
        pred[s, reached] = parents[reached]
        depth[s, order] = _levels(order, parents, n)
    return SourceGraph(n=n, edges=e, depth=depth, pred=pred)


def _levels(order: np.ndarray, parents: np.ndarray, n: int) -> np.ndarray:
    """BFS depth of each vertex in ``order``. A FIFO queue appends children in their parents' order, so the
    parents' queue positions are nondecreasing and every level is the block whose parents are in the one
    before it: one searchsorted per level instead of a loop over vertices."""
    if len(order) == 1:
        return np.zeros(1, dtype=np.int16)
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(len(order))
    parent_pos = pos[parents[order[1:]]]
    bounds = [0, 1]
    while bounds[-1] < len(order):
        bounds.append(1 + int(np.searchsorted(parent_pos, bounds[-1], side="left")))
    return np.repeat(np.arange(len(bounds) - 1, dtype=np.int16), np.diff(bounds))


def random_graph(n: int, lam: float, rng: np.random.Generator) -> SourceGraph:
    """Directed G(n, p = λ/n): each of the n(n−1) ordered pairs an edge independently with probability p."""
    pairs = n * (n - 1)
    m = int(rng.binomial(pairs, min(lam / n, 1.0)))
    idx = rng.choice(pairs, size=m, replace=False)
    x = idx // (n - 1)
    r = idx % (n - 1)
    return from_edges(n, np.stack([x, r + (r >= x)], axis=1))


def shortest_path(graph: SourceGraph, x: int, y: int) -> list[int]:
    """The BFS-tree path x = z_1 → … → z_k = y ([] if y is unreachable from x)."""
    if graph.depth[x, y] < 0:
        return []
    path = [y]
    while path[-1] != x:
        path.append(int(graph.pred[x, path[-1]]))
    return path[::-1]


def step_pairs(graph: SourceGraph, x: int, y: int, rule: Rule = "source") -> list[tuple[int, int]]:
    """The pairs one synthesis step on (x, y) adds to M_t (some may already be there)."""
    if x == y:
        raise DataeffError(f"step ({x}, {y}): a step samples two distinct entities")
    path = shortest_path(graph, x, y)
    if rule == "source":
        return [(x, z) for z in path[1:]]
    return [(a, b) for i, a in enumerate(path) for b in path[i + 1 :]]


# ---------------------------------------------------------------------------------------------------------
# Exact simulation through first-sampling times


def first_sample_times(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, n) int64: the step at which each ordered pair is first sampled when steps sample uniformly with
    replacement (``NEVER`` on the diagonal). Exact in law: a uniform order of first appearances and
    coupon-collector waits."""
    pairs = n * (n - 1)
    order = rng.permutation(pairs)
    waits = rng.geometric((pairs - np.arange(pairs)) / pairs)
    times = np.empty(pairs, dtype=np.int64)
    times[order] = np.cumsum(waits)
    out = np.full((n, n), NEVER, dtype=np.int64)
    out[~np.eye(n, dtype=bool)] = times
    return out


def first_times_of(n: int, steps: Any) -> np.ndarray:
    """First-sampling times of an explicit sequence of sampled pairs (step 1 is the first)."""
    out = np.full((n, n), NEVER, dtype=np.int64)
    for t, (x, y) in enumerate(steps, start=1):
        if x == y:
            raise DataeffError(f"step {t} ({x}, {y}): a step samples two distinct entities")
        if out[x, y] == NEVER:
            out[x, y] = t
    return out


def _by_depth(depth: np.ndarray) -> list[np.ndarray]:
    """Flat indices of the (root, vertex) pairs at each depth (index d holds depth d)."""
    flat = depth.ravel()
    order = np.argsort(flat, kind="stable")  # radix sort on int16
    ranked = flat[order]
    counts = np.bincount(ranked[ranked >= 0], minlength=1)
    start = int(np.searchsorted(ranked, 0))
    edges = start + np.concatenate([[0], np.cumsum(counts)])
    return [order[edges[d] : edges[d + 1]] for d in range(len(counts))]


def _push_up(graph: SourceGraph, values: np.ndarray, groups: list[np.ndarray], ufunc: np.ufunc) -> None:
    """values[x, v] ← ufunc over v's subtree in x's BFS tree (in place), for every depth-≥2 vertex v."""
    n = graph.n
    for d in range(len(groups) - 1, 2, -1):
        idx = groups[d]
        x, v = np.divmod(idx, n)
        ufunc.at(values, (x, graph.pred[x, v]), values.ravel()[idx])


def _to_ancestors(graph: SourceGraph, values: np.ndarray, groups: list[np.ndarray], ufunc: np.ufunc,
                  fill: int) -> np.ndarray:
    """out[u, v] = ufunc of values[x, v] over the roots x whose BFS path to v passes u (u ≠ v): what the
    ``path`` rule needs, since a step on (x, y) covers (u, v) exactly when u is above v above y in x's tree."""
    n = graph.n
    out = np.full((n, n), fill, dtype=np.int64)
    idx = np.concatenate(groups[2:]) if len(groups) > 2 else np.empty(0, dtype=np.int64)
    x, v = np.divmod(idx, n)
    val = values.ravel()[idx]
    anc = graph.pred[x, v].astype(np.int64)
    while len(x):
        ufunc.at(out, (anc, v), val)
        more = anc != x
        x, v, val, anc = x[more], v[more], val[more], anc[more]
        anc = graph.pred[x, anc].astype(np.int64)
    return out


def cover_times(graph: SourceGraph, first: np.ndarray, rule: Rule = "source") -> np.ndarray:
    """(n, n) int64: the first step t with (u, v) ∈ M_t (0 for the source relations, ``NEVER`` if no step
    adds it), given the first-sampling times of every ordered pair."""
    groups = _by_depth(graph.depth)
    sub = np.where(graph.depth > 0, first, NEVER)
    _push_up(graph, sub, groups, np.minimum)
    cover = sub if rule == "source" else _to_ancestors(graph, sub, groups, np.minimum, NEVER)
    cover = np.where(graph.depth >= 2, cover, NEVER)
    cover[graph.depth == 1] = 0
    return cover


def covering_counts(graph: SourceGraph, rule: Rule = "source") -> np.ndarray:
    """(n, n) int64: n(u, v), how many of the V(V−1) sampled pairs add (u, v) (0 where it never is, and on
    the source relations, which are known from the start)."""
    groups = _by_depth(graph.depth)
    sizes = (graph.depth > 0).astype(np.int64)
    _push_up(graph, sizes, groups, np.add)
    counts = sizes if rule == "source" else _to_ancestors(graph, sizes, groups, np.add, 0)
    return np.where(graph.depth >= 2, counts, 0)


def accuracy_curve(cover: np.ndarray, steps: Any) -> np.ndarray:
    """Acc(M_t) = |M_t| / (V(V−1)) at each t in ``steps`` (nondecreasing), from :func:`cover_times`."""
    t = np.asarray(steps, dtype=np.int64)
    c = cover[cover != NEVER]
    below = np.bincount(np.searchsorted(t, c, side="left"), minlength=len(t) + 1)
    n = cover.shape[0]
    return np.cumsum(below)[: len(t)] / (n * (n - 1))


def expected_accuracy(graph: SourceGraph, steps: Any, rule: Rule = "source") -> np.ndarray:
    """E[Acc(M_t) | M_0] exactly: (|M_0| + Σ 1 − (1 − n(u,v)/N)^t) / N over the pairs not in M_0."""
    n = graph.n
    pairs = n * (n - 1)
    rates, mult = np.unique(covering_counts(graph, rule)[graph.depth >= 2], return_counts=True)
    t = np.asarray(steps, dtype=float)[:, None]
    missing = (mult[None, :] * np.exp(t * np.log1p(-rates[None, :] / pairs))).sum(axis=1)
    return (len(graph.edges) + mult.sum() - missing) / pairs


# ---------------------------------------------------------------------------------------------------------
# Monte Carlo over graphs and step sequences


@dataclass(frozen=True)
class Simulation:
    """Accuracy against steps over independent (graph, step sequence) replicates.

    ``low``/``high``: Student-t interval (level ``ci``) of the mean over replicates; ``spread_low``/
    ``spread_high``: the same-level percentile band of single replicates."""

    steps: np.ndarray
    curves: np.ndarray  # (reps, len(steps))
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    spread_low: np.ndarray
    spread_high: np.ndarray
    reach: np.ndarray  # per replicate: the plateau R/N of its graph
    density: np.ndarray  # per replicate: |M_0| / N
    ci: float
    seconds_per_rep: float

    @property
    def stderr(self) -> np.ndarray:
        return self.curves.std(axis=0, ddof=1) / math.sqrt(len(self.curves))


def simulate(n: int, lam: float, steps: Any, reps: int, seed: int = 0, rule: Rule = "source",
             ci: float = 0.95, progress: bool = False) -> Simulation:
    """Replicate i draws its graph and steps from child i of ``SeedSequence(seed)``: exactly reproducible,
    and the first replicates do not change when more are asked for."""
    t = np.asarray(sorted(set(int(s) for s in steps)), dtype=np.int64)
    curves, reach, density = [], [], []
    start = time.perf_counter()
    for child in tqdm(np.random.SeedSequence(seed).spawn(reps), desc="theory", unit="rep", disable=not progress):
        rng = np.random.default_rng(child)
        graph = random_graph(n, lam, rng)
        curves.append(accuracy_curve(cover_times(graph, first_sample_times(n, rng), rule), t))
        reach.append(graph.reach)
        density.append(graph.density)
    elapsed = time.perf_counter() - start
    c = np.array(curves)
    mean = c.mean(axis=0)
    half = stats.t.ppf(0.5 + ci / 2, reps - 1) * c.std(axis=0, ddof=1) / math.sqrt(reps)
    lo, hi = np.percentile(c, [50 * (1 - ci), 50 * (1 + ci)], axis=0)
    return Simulation(steps=t, curves=c, mean=mean, low=mean - half, high=mean + half, spread_low=lo,
                      spread_high=hi, reach=np.array(reach), density=np.array(density), ci=ci,
                      seconds_per_rep=elapsed / reps)


# ---------------------------------------------------------------------------------------------------------
# Closed form


def extinction_probability(lam: float) -> float:
    """ρ, the smallest root of ρ = exp(λ(ρ − 1)): 1 for λ ≤ 1."""
    if lam <= 1:
        return 1.0
    return float(-lambertw(-lam * math.exp(-lam)).real / lam)


def root_types(lam: float, atoms: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Types of BFS roots for the Poisson(λ) Galton–Watson approximation of the exploration.

    Returns (prob, means): the root's generation-n size Z_n (n: the first generation with λ^n ≥ 300),
    quantile-binned into at most ``atoms`` atoms plus the atom Z_n = 0 (extinct), and for each atom the
    exact conditional mean generation sizes ``means[j] = E[Z_j | atom]``, j = 0..n. They come from
    E[Z_j s^{Z_n}] = λ^j Π_{i=n−j}^{n} g_i(s), g_i = G^{∘i}, G(s) = exp(λ(s − 1)) (the chain rule on
    G' = λG), evaluated on M roots of unity and read off by an FFT; M covers λ^n (40 + 28/(1 − ρ)), past
    where P(W > w) ≈ (1 − ρ) exp(−(1 − ρ) w) (the near-critical tail) is below 1e-12, so nothing aliases.
    Conditioning on the type gives every root its own growth history, with the right spread from the
    first generation on: a type's fluctuations are realised gradually, as in the real exploration."""
    n = max(1, math.ceil(math.log(300) / math.log(lam)))
    size = 1 << math.ceil(math.log2(lam**n * (40 + 28 / (1 - extinction_probability(lam))) + 64))
    g = [np.exp(2j * np.pi * np.arange(size) / size)]
    for _ in range(n):
        g.append(np.exp(lam * (g[-1] - 1)))
    pmf = np.clip(np.fft.fft(g[n]).real / size, 0, None)
    joint = [pmf]  # joint[j][b] = E[Z_j 1{Z_n = b}]
    prod = g[n]
    for j in range(1, n + 1):
        prod = prod * g[n - j]
        joint.append(np.clip(np.fft.fft(lam**j * prod).real / size, 0, None))
    keep = pmf > 1e-18
    keep[0] = False
    cum = np.cumsum(np.where(keep, pmf, 0.0))
    bins = np.minimum((cum[keep] / cum[-1] * atoms).astype(np.int64), atoms - 1)
    prob = np.bincount(bins, weights=pmf[keep], minlength=atoms)
    means = np.stack([np.bincount(bins, weights=row[keep], minlength=atoms) for row in joint])
    ok = prob > 0
    means = means[:, ok] / prob[ok]
    prob = prob[ok]
    if pmf[0] > 1e-18:  # the extinct type, unless extinction is negligible (large λ)
        prob = np.concatenate([pmf[:1], prob])
        means = np.concatenate([np.array(joint)[:, :1] / pmf[0], means], axis=1)
    return prob, means


def _profiles(n: int, lam: float, means: np.ndarray, max_levels: int = 5000) -> np.ndarray:
    """(levels, types): each root type's BFS level sizes with depletion, f_0 = 1, u_0 = V − 1,
    f_{j+1} = (r_j/λ) u_j (1 − (1−p)^{f_j}), u_{j+1} = u_j − f_{j+1}, where r_j = E[Z_{j+1}|type]/E[Z_j|type]
    while known and λ after (0 for the extinct type): without depletion f_j is exactly E[Z_j | type]."""
    p = min(lam / n, 1 - 1e-12)
    lq = math.log1p(-p)
    gens = len(means) - 1
    alive = means[gens] > 0
    f, u = np.ones(means.shape[1]), np.full(means.shape[1], n - 1.0)
    rows = [f]
    for j in range(max_levels):
        if j < gens:
            r = np.where(means[j] > 0, means[j + 1] / np.where(means[j] > 0, means[j], 1.0), 0.0)
        else:
            r = np.where(alive, lam, 0.0)
        # A fast-growing type's ratio exceeds λ; it still cannot reach more vertices than are left.
        f = np.minimum((r / lam) * u * -np.expm1(f * lq), u)
        u = u - f
        rows.append(f)
        if f.max() < 1e-9:
            break
    return np.array(rows)


def exact_reach(n: int, lam: float) -> float:
    """E[#{y ≠ x reachable from x}] / (V − 1) for directed G(V, λ/V), exactly.

    Exploring x's out-component queries each (explored, unexplored) ordered pair once, each an edge with
    probability p, exactly as exploring x's component in the undirected G(V, p); so the answer is
    (E|C(x)| − 1)/(V − 1) for the undirected component C(x). That comes from the vertex-at-a-time exploration
    chain: with t vertices explored and A active, exploring one more makes A − 1 + Bin(V − t − A, p) active,
    and |C(x)| is the first t with A = 0. Binomial tails below 1e-17 are dropped."""
    p = min(lam / n, 1.0)
    if p >= 1.0:
        return 1.0
    active = np.zeros(n + 1)
    active[1] = 1.0
    expected_size = 0.0
    k = np.arange(int(lam + 12 * math.sqrt(lam) + 20) + 1)
    for t in range(n):
        live = np.flatnonzero(active > 1e-17)
        if not len(live):
            break
        lo, hi = live[0], live[-1]
        u = (n - t - np.arange(lo, hi + 1)).astype(float)
        # Bin(u, p) pmf over k for every active count at once: pmf_k = pmf_{k-1} (u - k + 1)/k p/(1 - p).
        step = np.clip(u[:, None] - k[None, 1:] + 1, 0, None) / k[None, 1:] * (p / (1 - p))
        pmf = np.exp(u * math.log1p(-p))[:, None] * np.cumprod(np.hstack([np.ones((len(u), 1)), step]), axis=1)
        rows = np.arange(len(u))[:, None] + k[None, :]  # new active count - (lo - 1)
        moved = np.bincount(rows.ravel(), weights=(active[lo : hi + 1, None] * pmf).ravel())
        nxt = np.zeros(n + 1)
        top = min(len(moved), n + 2 - lo)
        nxt[lo - 1 : lo - 1 + top] = moved[:top]
        expected_size += nxt[0] * (t + 1)
        nxt[0] = 0.0
        active = nxt
    return (expected_size - 1) / (n - 1)


def _interp(values: np.ndarray, where: np.ndarray) -> np.ndarray:
    """values (T, atoms, g) sampled at s = (i + 1/2)/g, linearly interpolated at where (atoms, g)."""
    g = values.shape[-1]
    x = np.clip(where * g - 0.5, 0, g - 1)
    i0 = np.floor(x).astype(np.int64)
    i1 = np.minimum(i0 + 1, g - 1)
    frac = (x - i0)[None]
    a = np.take_along_axis(values, np.broadcast_to(i0[None], values.shape), axis=2)
    b = np.take_along_axis(values, np.broadcast_to(i1[None], values.shape), axis=2)
    return a * (1 - frac) + b * frac


def _branching_part(n: int, lam: float, t: np.ndarray, f: np.ndarray, grid: int = 32) -> np.ndarray:
    """(T, atoms): (1/(V−1)) Σ_{j≥2} f_j ∫ (1 − H_j(s; (1−1/N)^t)) ds, the queue-position subtree model."""
    pairs = n * (n - 1)
    lq = math.log1p(-min(lam / n, 1 - 1e-12))
    z = np.exp(t * math.log1p(-1 / pairs))[:, None, None]
    s = (np.arange(grid) + 0.5) / grid
    explored = 1 + np.cumsum(f[1:], axis=0)  # explored[j - 1] = 1 + f_1 + ... + f_j
    h = np.broadcast_to(z, (len(t), f.shape[1], grid)).copy()
    total = np.zeros((len(t), f.shape[1]))
    for j in range(len(f) - 2, 1, -1):
        fj, fnext = f[j], f[j + 1]
        ok = fj > 1e-12
        mu = (n - explored[j - 1])[:, None] * min(lam / n, 1.0) * np.exp(lq * s[None, :] * fj[:, None])
        # Normalised so a vertex's mean offspring is exactly the profile's f_{j+1}/f_j.
        target = np.where(ok, fnext / np.where(ok, fj, 1.0), 0.0)
        mu *= (target / np.maximum(mu.mean(axis=1), 1e-300))[:, None]
        spread = -np.expm1(lq * fj)
        pos = np.where(ok[:, None], -np.expm1(lq * s[None, :] * fj[:, None]) / np.where(ok, spread, 1.0)[:, None],
                       s[None, :])
        h = z * np.exp(mu[None] * (_interp(h, pos) - 1))
        total += fj[None, :] * (1 - h).mean(axis=2)
    return total / (n - 1)


@dataclass(frozen=True)
class ClosedForm:
    """Acc(t) ≈ p + C (1 − Σ_k μ(k) E(1 − a_k)^t) at ``steps``.

    ``accuracy``: ours (``source`` rule, λ > 1; else None). ``paper_form``: the distance-grouped form with the
    mean covering probability ``a_k`` per distance (λ > 1). ``mu`` and ``a_k`` are indexed by distance k ≥ 2."""

    steps: np.ndarray
    accuracy: np.ndarray | None
    paper_form: np.ndarray | None
    p: float
    C: float  # reach − p: pairs at distance ≥ 2, exact at this V
    reach: float
    rho: float
    C_lambda: float  # (1 − ρ)², the V → ∞ reachable fraction
    kappa: float | None
    mu: np.ndarray
    a_k: np.ndarray
    rule: Rule


def closed_form(n: int, lam: float, steps: Any, rule: Rule = "source", reach: float | None = None) -> ClosedForm:
    """``reach``: the exact plateau if already known (it is the costly part at large V·λ)."""
    t = np.asarray(steps, dtype=float)
    p = min(lam / n, 1.0)
    rho = extinction_probability(lam)
    reach = exact_reach(n, lam) if reach is None else reach
    base = dict(steps=np.asarray(steps), p=p, C=reach - p, reach=reach, rho=rho, C_lambda=(1 - rho) ** 2, rule=rule)
    if lam <= 1:
        return ClosedForm(accuracy=None, paper_form=None, kappa=None, mu=np.zeros(0), a_k=np.zeros(0), **base)
    pw, means = root_types(lam)
    f = _profiles(n, lam, means)
    m = f @ pw  # expected level sizes m_k
    pairs = n * (n - 1)
    tail = m[2:]
    mu = tail / tail.sum() if tail.sum() > 0 else np.zeros_like(tail)
    k = np.arange(2, len(m))
    weight = np.ones((len(k), len(k))) if rule == "source" else np.maximum(k[None, :] - k[:, None] + 1, 0)
    below = np.triu(np.ones((len(k), len(k))))  # [row k, column j]: j ≥ k
    with np.errstate(invalid="ignore", divide="ignore"):
        a_k = np.where(tail > 0, (below * weight * tail[None, :]).sum(axis=1) / (tail * pairs), 0.0)
    with np.errstate(divide="ignore"):  # a_k = 1 (p = 1): covered at the first step
        log_miss = np.log1p(-np.minimum(a_k, 1.0))
    paper = p + (reach - p) * (1 - (mu[None, :] * np.exp(t[:, None] * log_miss[None, :])).sum(axis=1))
    ours, kappa = None, None
    if rule == "source":
        part = _branching_part(n, lam, t, f) @ pw
        full = (f[2:].sum(axis=0) @ pw) / (n - 1)
        kappa = (reach - p) / full if full > 0 else 1.0
        ours = p + kappa * part
    return ClosedForm(accuracy=ours, paper_form=paper, kappa=kappa, mu=mu, a_k=a_k, **base)


# ---------------------------------------------------------------------------------------------------------
# Configuration, figure and the ``dataeff theory`` command


@dataclass
class TheoryConfig:
    V: int = option(500, "number of entities")
    lam: float = option(2.0, "mean out-degree λ of the source graph: each relation present with probability λ/V")
    steps: list[int] = option(DEFAULT_STEPS, "synthesis step counts t at which to report Acc(M_t)")
    reps: int = option(20, "independent (graph, step sequence) replicates")
    seed: int = option(0, "seed; the same seed and settings give the same numbers")
    ci: float = option(0.95, "level of the Monte Carlo intervals")
    rule: Rule = option("source", "pairs a step adds: source = (x, z) for z on the path (the paper's); "
                                  "path = every pair on the path")
    out: str = option("theory", "directory for theory.json and theory.png")
    progress: bool = option(True, "show a progress bar over replicates")

    def __post_init__(self) -> None:
        if not 2 <= self.V <= _MAX_V:
            raise DataeffError(f"theory.V: {self.V} must be between 2 (a relation needs two entities) and {_MAX_V}")
        if not (math.isfinite(self.lam) and self.lam > 0):
            raise DataeffError(f"theory.lam: {self.lam} must be a number > 0 (the mean out-degree λ = pV)")
        if self.lam > self.V:
            raise DataeffError(f"theory.lam: {self.lam} exceeds V={self.V}, but p = λ/V is a probability")
        if not self.steps:
            raise DataeffError("theory.steps: empty step grid; give step counts, e.g. steps=[10,1000,100000]")
        bad = [s for s in self.steps if s < 1]
        if bad:
            raise DataeffError(f"theory.steps: {bad[0]} is not a step count (each must be >= 1)")
        if self.reps < 2:
            raise DataeffError(f"theory.reps: {self.reps} must be at least 2 (an interval needs two replicates)")
        if not 0 < self.ci < 1:
            raise DataeffError(f"theory.ci: {self.ci} must lie strictly between 0 and 1")


@dataclass(frozen=True)
class Agreement:
    """The closed form against the simulation's mean at the simulated steps."""

    inside_fraction: float  # share of steps where the closed form lies inside the Monte Carlo interval
    max_abs_diff: float
    max_abs_diff_step: int
    max_abs_z: float  # largest |closed − mean| / standard error


@dataclass(frozen=True)
class TheoryResult:
    config: TheoryConfig
    simulation: Simulation
    closed: ClosedForm
    agreement: Agreement | None
    json_path: Path
    png_path: Path


def agreement(sim: Simulation, closed: np.ndarray) -> Agreement:
    diff = closed - sim.mean
    i = int(np.argmax(np.abs(diff)))
    se = sim.stderr
    z = np.abs(diff[se > 0] / se[se > 0]) if np.any(se > 0) else np.zeros(1)
    inside = (closed >= sim.low - 1e-12) & (closed <= sim.high + 1e-12)
    return Agreement(inside_fraction=float(inside.mean()), max_abs_diff=float(abs(diff[i])),
                     max_abs_diff_step=int(sim.steps[i]), max_abs_z=float(z.max()))


def theory_figure(sim: Simulation, closed: ClosedForm, fine: ClosedForm | None = None, title: str = "") -> Figure:
    """Simulated Acc(M_t) on a log step axis with its Monte Carlo band, the closed forms and the plateau."""
    fig = Figure(figsize=(7.5, 4.8), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.3)
    level = f"{100 * sim.ci:g}"
    ax.fill_between(sim.steps, sim.spread_low, sim.spread_high, color="tab:blue", alpha=0.12, linewidth=0,
                    label=f"single replicates ({level}% band)")
    ax.fill_between(sim.steps, sim.low, sim.high, color="tab:blue", alpha=0.35, linewidth=0,
                    label=f"simulation mean ({level}% interval)")
    ax.plot(sim.steps, sim.mean, "o-", color="tab:blue", markersize=3, linewidth=1, label="simulation mean")
    curve = fine or closed
    if curve.accuracy is not None:
        ax.plot(curve.steps, curve.accuracy, color="black", linewidth=1.5, label="closed form (ours)")
    if curve.paper_form is not None:
        ax.plot(curve.steps, curve.paper_form, "--", color="tab:red", linewidth=1.2,
                label="paper's form, one rate per distance")
    ax.axhline(closed.p + closed.C, color="tab:green", linestyle=":", linewidth=1.2,
               label=f"plateau: reachable fraction {closed.reach:.3f}")
    ax.axhline(closed.p, color="gray", linestyle=":", linewidth=1, label=f"M_0 density p = {closed.p:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel("synthesis steps t")
    ax.set_ylabel("Acc(M_t) = |M_t| / V(V−1)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _floats(a: np.ndarray | None) -> list[float] | None:
    return None if a is None else [float(v) for v in a]


def _result_json(cfg: TheoryConfig, sim: Simulation, closed: ClosedForm, agree: Agreement | None) -> dict[str, Any]:
    return {
        "config": to_dict(cfg),
        "steps": [int(s) for s in sim.steps],
        "simulation": {
            "mean": _floats(sim.mean), "ci_low": _floats(sim.low), "ci_high": _floats(sim.high),
            "spread_low": _floats(sim.spread_low), "spread_high": _floats(sim.spread_high),
            "interval": f"Student-t {sim.ci:g} interval of the mean over {len(sim.curves)} independent "
                        f"(graph, step sequence) replicates; spread = percentile band of single replicates",
            "reach_mean": float(sim.reach.mean()), "density_mean": float(sim.density.mean()),
            "seconds_per_rep": sim.seconds_per_rep,
        },
        "closed_form": {
            "accuracy": _floats(closed.accuracy), "paper_form": _floats(closed.paper_form),
            "p": closed.p, "C": closed.C, "reach": closed.reach, "rho": closed.rho, "C_lambda": closed.C_lambda,
            "kappa": closed.kappa,
            "distance": [k + 2 for k in range(len(closed.mu)) if closed.mu[k] > 1e-12],
            "mu": [float(v) for v in closed.mu if v > 1e-12],
            "a_k": [float(a) for a, v in zip(closed.a_k, closed.mu, strict=True) if v > 1e-12],
            "note": None if closed.accuracy is not None else
            ("our closed form is derived for rule=source only" if closed.rule != "source"
             else "no giant component for lam <= 1: only the plateau is given"),
        },
        "agreement": None if agree is None else asdict(agree),
    }


def run_theory(cfg: TheoryConfig) -> TheoryResult:
    """Simulate, evaluate the closed form, and write ``theory.json`` (strict JSON) and ``theory.png``."""
    sim = simulate(cfg.V, cfg.lam, cfg.steps, cfg.reps, cfg.seed, cfg.rule, cfg.ci, cfg.progress)
    closed = closed_form(cfg.V, cfg.lam, sim.steps, cfg.rule)
    fine_steps = np.unique(np.geomspace(sim.steps[0], sim.steps[-1], 80).round().astype(np.int64))
    fine = closed_form(cfg.V, cfg.lam, fine_steps, cfg.rule, reach=closed.reach)
    agree = agreement(sim, closed.accuracy) if closed.accuracy is not None else None
    out = Path(cfg.out)
    json_path, png_path = out / "theory.json", out / "theory.png"
    text = json.dumps(_result_json(cfg, sim, closed, agree), indent=2, sort_keys=True, allow_nan=False)
    fig = theory_figure(sim, closed, fine, f"EntiGraph random-graph model: V={cfg.V}, λ={cfg.lam:g}, "
                                            f"rule={cfg.rule}, {cfg.reps} replicates")
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    atomic_write_text(json_path, text + "\n")
    return TheoryResult(config=cfg, simulation=sim, closed=closed, agreement=agree, json_path=json_path,
                        png_path=png_path)
