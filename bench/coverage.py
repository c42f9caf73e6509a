"""Coverage of the interval methods on the known-truth world: how often a nominal 95% interval holds the truth.

Trained (once, by ``bench/known_world.py`` or ``dataeff run configs/known_world.yaml``): the loss-vs-size curves
of two recipes on the Markov world, which give each recipe's shape (A, α) and the seed noise of one run's log
loss in each recipe with its cross-recipe correlation ρ.
Simulated (every repetition): per-seed losses around true curves E + A·N^-α whose asymptotes are known, with
the regularized recipe's E the world's exact entropy rate H and the standard recipe's E = H + ΔE (ΔE the real
fits' difference, at least 0.01); each seed's log-loss deviation is drawn jointly for the two recipes
(σ_a, σ_b, ρ as measured). Sizes: the trained ones, extended geometrically to 5 and 6. Then the pipeline's own
analyses run on each repetition, and we count how often each interval covers its true value:

- bootstrap: the marginal parametric bootstrap of E (``fit_with_intervals``, σ pooled over every point);
- profile: the profile-likelihood interval of E with the F(1, ν) cut (floor 0);
- paired: the interval of ΔE = E_reg − E_std, parametric (measured σ_a, σ_b, ρ), the pipeline's default below
  5 seeds; and paired-seeds, resampling seeds jointly (the scheme the pipeline avoids with few seeds).

Writes ``src/dataeff/experiment/coverage.json`` (read by the pipeline's settings check) with ``--write`` and prints
one JSON line per configuration and the Markdown table of ``docs/intervals.md``.

    PYTHONPATH=src python bench/coverage.py --world runs/known_world/known_world.json --reps 150 --write
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from dataeff.experiment import paired, profile, scaling
from dataeff.experiment.fitting import FitConfig, fit_with_intervals, seed_noise
from dataeff.fsutil import atomic_write_json

OUT = Path(__file__).resolve().parents[1] / "src" / "dataeff" / "experiment" / "coverage.json"
METHODS = ("bootstrap", "profile", "paired", "paired-seeds")


def measured(path: Path) -> dict[str, object]:
    """Curve shapes and seed noise from the real runs (``bench/known_world.py``'s JSON)."""
    d = json.loads(path.read_text())
    sizes = sorted(d["params"], key=d["params"].get)
    x = np.array([d["params"][s] for s in sizes], dtype=float)
    runs = {r: [[v for v in d["losses"][r][s].values() if v is not None] for s in sizes] for r in d["losses"]}
    means = {r: np.array([np.mean(v) for v in runs[r]]) for r in runs}
    # The shape from the sizes where the loss still falls (a larger model that overfits is past the law).
    keep = {r: int(np.argmin(means[r])) + 1 for r in runs}
    fits = {r: scaling.fit_power_law(x[: keep[r]], means[r][: keep[r]]) for r in runs}
    noise = paired.pair_noise(runs["regularized"], runs["standard"])
    assert noise is not None
    return {"H": d["entropy_rate"], "x": x, "fits": fits, "noise": noise, "dE": fits["standard"].E - fits["regularized"].E}


def design(x: np.ndarray, n: int) -> np.ndarray:
    ratio = math.exp(np.diff(np.log(x)).mean())
    return np.array([*x[:n], *(x[-1] * ratio ** np.arange(1, n - len(x) + 1))])[:n]


def one(rng: np.random.Generator, x: np.ndarray, n_seeds: int, world: dict, n_boot: int) -> dict[str, bool]:
    fits, noise, H = world["fits"], world["noise"], world["H"]
    e_reg, e_std = H, H + max(world["dE"], 0.01)
    truth = {"regularized": e_reg + fits["regularized"].A * x ** -fits["regularized"].alpha,
             "standard": e_std + fits["standard"].A * x ** -fits["standard"].alpha}
    z1, z2 = rng.standard_normal((2, len(x), n_seeds))
    dev_a = noise.sigma_a * z1
    dev_b = noise.sigma_b * (noise.rho * z1 + math.sqrt(1 - noise.rho**2) * z2)
    runs_a = (truth["regularized"][:, None] * np.exp(dev_a)).tolist()
    runs_b = (truth["standard"][:, None] * np.exp(dev_b)).tolist()
    sig = seed_noise(runs_a + runs_b)
    assert sig is not None
    s_run, dof = sig
    mean_a = [float(np.mean(r)) for r in runs_a]
    f = FitConfig(n_boot=n_boot, seed=int(rng.integers(1 << 30)))
    boot = fit_with_intervals(list(map(float, x)), mean_a, f, s_run / math.sqrt(n_seeds))
    out = {"bootstrap": boot.E_ci is not None and boot.E_ci[0] <= e_reg <= boot.E_ci[1]}  # type: ignore[operator]
    p = profile.profile_E(x, mean_a, s_run / math.sqrt(n_seeds), sigma_dof=dof, n_grid=50)
    out["profile"] = p.lo <= e_reg <= p.hi
    out["profile_bounded"] = p.bounded_below
    d_true = e_reg - e_std
    r = paired.paired_asymptotes(x, runs_a, runs_b, n_boot=n_boot, seed=f.seed, method="parametric")
    out["paired"] = r.lo <= d_true <= r.hi
    out["paired_decided"] = r.hi < 0
    s = paired.paired_asymptotes(x, runs_a, runs_b, n_boot=n_boot, seed=f.seed, method="seeds")
    out["paired-seeds"] = s.lo <= d_true <= s.hi
    return out


def document(world: dict, args: argparse.Namespace, rows: list[dict]) -> dict:
    return {
        "what": "share of nominal 95% intervals holding the true value, simulated around the known-truth world",
        "world": {"entropy_rate": world["H"], "dE": max(world["dE"], 0.01),
                  "shapes": {r: {"A": f.A, "alpha": f.alpha} for r, f in world["fits"].items()},
                  "noise": vars(world["noise"]), "x": world["x"].tolist()},
        "reps": args.reps, "n_boot": args.n_boot, "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=150)
    ap.add_argument("--n-boot", type=int, default=300)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 5, 6])
    ap.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT, help="where --write puts the table")
    args = ap.parse_args()
    world = measured(args.world)
    rows = []
    for n_sizes in args.sizes:
        x = design(world["x"], n_sizes)
        for n_seeds in args.seeds:
            rng = np.random.default_rng([n_sizes, n_seeds])
            start = time.time()
            hits = [one(rng, x, n_seeds, world, args.n_boot) for _ in range(args.reps)]
            row = {"sizes": n_sizes, "seeds": n_seeds, "reps": args.reps,
                   **{k: float(np.mean([h[k] for h in hits])) for k in hits[0]}, "seconds": time.time() - start}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.write:  # after every row: a long study that is stopped keeps what it measured
                atomic_write_json(args.out, document(world, args, rows))
    print("| sizes | seeds | " + " | ".join(METHODS) + " | profile bounds E below | paired decides ΔE < 0 |")
    print("|---|---|" + "---|" * (len(METHODS) + 2))
    for r in rows:
        print(f"| {r['sizes']} | {r['seeds']} | " + " | ".join(f"{r[m]:.0%}" for m in METHODS)
              + f" | {r['profile_bounded']:.0%} | {r['paired_decided']:.0%} |")


if __name__ == "__main__":
    main()
