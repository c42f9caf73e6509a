"""Approximate nearest-neighbour search for ``dataeff pairs``: faiss (HNSW, IVF) vs NumPy brute force.

Vectors: n unit vectors in 384 dimensions (all-MiniLM-L6-v2's width) with cluster structure, seeded: 1,000
random unit centres, each point a centre plus Gaussian noise (so a point's cosine to its own centre is about
0.8 and to another member about 0.6, as for topical documents), normalised. Every vector is a query for its
10 nearest other vectors, as ``dataeff pairs`` does. Brute force is :func:`dataeff.synth.neighbors.knn_numpy`
over all queries, which is also the ground truth; each approximate index is timed build plus search of all
queries through :func:`dataeff.synth.neighbors.knn_faiss`, and scored by recall@10 against the truth.
Threads: both use all the cores they see (NumPy's BLAS, faiss's OpenMP). The machine may be shared: the load
average is printed with the figures. The last line is one JSON object; ``recall_at_10``, ``ann_s`` and
``speedup`` are those of the index ``dataeff pairs`` picks by default above its exact threshold (IVF).

    python bench/ann_pairs.py            # 100k vectors: a few minutes (brute force dominates)
    python bench/ann_pairs.py --quick    # 20k vectors: well under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from dataeff.synth.neighbors import PairsConfig, knn_faiss, knn_numpy


def clustered(n: int, d: int, clusters: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)).astype(np.float32) * noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall(truth: np.ndarray, found: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(t, f[f >= 0], assume_unique=True)) for t, f in zip(truth, found, strict=True))
    return hits / truth.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k vectors instead of 100k")
    parser.add_argument("--n", type=int, default=0, help="vectors (0: 100000, or 20000 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n = args.n or (20_000 if args.quick else 100_000)
    d, k = 384, 10
    x = clustered(n, d, clusters=1000, noise=0.035, seed=args.seed)

    start = time.perf_counter()
    truth_sims, truth = knn_numpy(x, k)
    brute_s = time.perf_counter() - start
    print(f"numpy brute force: {brute_s:.1f} s; median top-1 similarity {np.median(truth_sims[:, 0]):.3f}")

    results = {}
    for kind in ("hnsw", "ivf"):
        cfg = PairsConfig(k=k, index=kind)
        start = time.perf_counter()
        _, found, info = knn_faiss(x, cfg)
        total = time.perf_counter() - start
        results[kind] = {"recall_at_10": round(recall(truth, found), 4), "ann_s": round(total, 2),
                         "speedup": round(brute_s / total, 1), **info}
        print(f"{kind}: {results[kind]}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"load average (1 min): {load}; cores: {os.cpu_count()}")
    main_kind = "ivf"
    print(json.dumps({"n": n, "dim": d, "k": k, "index": main_kind, "recall_at_10": results[main_kind]["recall_at_10"],
                      "ann_s": results[main_kind]["ann_s"], "brute_s": round(brute_s, 2),
                      "speedup": results[main_kind]["speedup"], "indexes": results, "load_avg": load}))


if __name__ == "__main__":
    main()
