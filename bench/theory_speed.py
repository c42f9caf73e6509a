"""Simulating EntiGraph's random-graph model: stepping through synthesis steps one by one versus the
first-sampling-time method of ``dataeff.synth.theory`` (the whole Acc(t) curve at once).

Side by side on one graph (V=300, λ=2; --quick V=150) and the same step budget, T = N ln N steps with
N = V(V−1) (about where the curve saturates): the naive loop samples a pair, walks its BFS path through the
predecessor matrix and marks the pairs it adds, recording |M_t| on the grid; the fast method draws first
sampling times and propagates them through the BFS trees. Both get the graph's BFS trees ready-made (their
cost is reported apart, as ``bfs_s``). Then one full replicate of ``simulate`` (graph, BFS, first times,
cover times, curve) is timed at several V for both rules. Times are medians of the repeats; the machine is
shared, so the ratio of the paired runs is the number to read. The last line is one JSON object: naive_s,
fast_s, speedup, steps, and per_rep_s mapping "V/rule" to seconds.

    python bench/theory_speed.py            # V up to 3000: about two minutes
    python bench/theory_speed.py --quick    # V up to 1000: well under a minute
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np

from dataeff.synth import theory as th


def naive_curve(graph: th.SourceGraph, steps: np.ndarray, rule: th.Rule, rng: np.random.Generator) -> np.ndarray:
    """Acc at each grid step by applying the steps one at a time."""
    n = graph.n
    known = np.zeros((n, n), dtype=bool)
    known[graph.edges[:, 0], graph.edges[:, 1]] = True
    size = int(known.sum())
    out, nxt = [], 0
    xs = rng.integers(0, n, size=int(steps[-1]))
    ys = (xs + rng.integers(1, n, size=int(steps[-1]))) % n  # uniform over y ≠ x
    for t in range(1, int(steps[-1]) + 1):
        x, y = int(xs[t - 1]), int(ys[t - 1])
        if graph.depth[x, y] > 1:
            path = [y]
            while path[-1] != x:
                path.append(int(graph.pred[x, path[-1]]))
            path.reverse()
            pairs = [(x, z) for z in path[2:]] if rule == "source" else \
                [(a, b) for i, a in enumerate(path) for b in path[i + 2 :]]
            for a, b in pairs:
                if not known[a, b]:
                    known[a, b] = True
                    size += 1
        while nxt < len(steps) and steps[nxt] == t:
            out.append(size / (n * (n - 1)))
            nxt += 1
    return np.array(out)


def fast_curve(graph: th.SourceGraph, steps: np.ndarray, rule: th.Rule, rng: np.random.Generator) -> np.ndarray:
    return th.accuracy_curve(th.cover_times(graph, th.first_sample_times(graph.n, rng), rule), steps)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 150 if args.quick else 300
    pairs = n * (n - 1)
    total = int(pairs * math.log(pairs))
    steps = np.unique(np.geomspace(1, total, 30).astype(np.int64))
    start = time.perf_counter()
    graph = th.random_graph(n, 2.0, np.random.default_rng(0))
    bfs_s = time.perf_counter() - start
    naive_s = timed(lambda: naive_curve(graph, steps, "source", np.random.default_rng(1)), 1 if not args.quick else 2)
    fast_s = timed(lambda: fast_curve(graph, steps, "source", np.random.default_rng(1)), 5)
    a = naive_curve(graph, steps, "source", np.random.default_rng(2))
    b = fast_curve(graph, steps, "source", np.random.default_rng(3))
    print(f"V={n}, λ=2, {total} steps: naive {naive_s:.2f}s, fast {fast_s:.4f}s ({naive_s / fast_s:.0f}x); "
          f"BFS trees {bfs_s:.3f}s; final Acc naive {a[-1]:.4f}, fast {b[-1]:.4f}, reach {graph.reach:.4f}")
    per_rep: dict[str, float] = {}
    sizes = (500, 1000) if args.quick else (500, 1000, 2000, 3000)
    for v in sizes:
        for rule in th.RULES:
            sec = th.simulate(v, 2.0, th.DEFAULT_STEPS, 2, seed=0, rule=rule).seconds_per_rep
            per_rep[f"{v}/{rule}"] = sec
            print(f"simulate: V={v} rule={rule}: {sec:.2f}s per replicate")
    print(json.dumps({"naive_s": naive_s, "fast_s": fast_s, "speedup": naive_s / fast_s, "steps": total,
                      "bfs_s": bfs_s, "per_rep_s": per_rep}))


if __name__ == "__main__":
    main()
