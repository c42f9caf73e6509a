from __future__ import annotations

import copy
import html
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dataeff.errors import DataeffError
from dataeff.report import _band, write_report

WORLD = 2_000_000
PARAMS = {"micro": 1_000_000, "mini": 4_000_000, "small": 16_000_000}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VERDICT = [
    "regularized: asymptote E = 3.4321 [3.3987, 3.4655] (95% CI) lies below the standard recipe's best loss 3.7512",
    "standard: no asymptote (power-law fit needs at least 3 distinct x values, got 2)",
]
DIVERGED = "training diverged: loss is nan at step 40; last good checkpoint 20"
OOM = "worker killed: out of memory"


def law(e: float, a: float, alpha: float, x: float) -> float:
    return e + a * x**-alpha


def replicates(e: float, a: float, alpha: float, rng: np.random.Generator, n: int = 200) -> dict[str, list[float]]:
    """Bootstrap-like refits scattered around a known law."""
    return {"E": (e + rng.normal(0, 0.015, n)).tolist(), "A": (a * np.exp(rng.normal(0, 0.05, n))).tolist(),
            "alpha": (alpha + rng.normal(0, 0.01, n)).tolist()}


def evaluation(run_dir: Path, loss: float, error: str | None = None, **values: Any) -> dict[str, Any]:
    return {"values": values, "loss": loss, "run_dir": str(run_dir), "error": error}


def make_results(root: Path) -> dict[str, Any]:
    """A results.json as analyse() writes it: 2 recipes x 3 sizes, the standard fit refused (its largest size
    failed outright), a diverged evaluation, 4 data-scaling budgets and an overfitting sweep."""
    rng = np.random.default_rng(0)
    runs = root / "runs"
    tuned = []
    for i, (size, n) in enumerate(PARAMS.items()):
        best_loss = round(law(3.4321, 10.0, 0.3, n), 4)
        best = {"train.epochs": 16 // 2**i, "optim.lr": 3e-3, "optim.weight_decay": 0.8 * 2**i}
        evals = [evaluation(runs / f"reg-{size}", best_loss, **best)]
        if size == "mini":
            # The optimum's epoch neighbours at its LR and WD (the fallback overfitting curve) and a divergence.
            evals += [evaluation(runs / "reg-mini-e4", best_loss + 0.03, **{**best, "train.epochs": 4}),
                      evaluation(runs / "reg-mini-e16", best_loss + 0.01, **{**best, "train.epochs": 16}),
                      evaluation(runs / "reg-mini-wd08", best_loss + 0.02, **{**best, "optim.weight_decay": 0.8}),
                      evaluation(runs / "reg-mini-lr3e-2", math.inf, DIVERGED, **{**best, "optim.lr": 3e-2})]
        tuned.append({"recipe": "regularized", "size": size, "params": n, "budget": WORLD, "best": best,
                      "best_loss": best_loss, "certified": size != "small",
                      "reason": "optimum on the grid edge of optim.weight_decay: widen the grid to certify it" if size == "small"
                      else "all 6 ±1-step neighbours trained; none is better",
                      "best_run_dir": str(runs / f"reg-{size}"), "evaluations": evals})
    for size, loss in (("micro", 3.8901), ("mini", 3.7512)):
        best = {"train.epochs": 4, "optim.lr": 1e-3, "optim.weight_decay": 0.1}
        tuned.append({"recipe": "standard", "size": size, "params": PARAMS[size], "budget": WORLD, "best": best,
                      "best_loss": loss, "certified": True, "reason": "all 4 ±1-step neighbours trained; none is better",
                      "best_run_dir": str(runs / f"std-{size}"), "evaluations": [evaluation(runs / f"std-{size}", loss, **best)]})
    small_best = {"train.epochs": 4, "optim.lr": 3e-3, "optim.weight_decay": 0.1}
    tuned.append({"recipe": "standard", "size": "small", "params": PARAMS["small"], "budget": WORLD, "best": small_best,
                  "best_loss": math.inf, "certified": False, "reason": "every configuration tried failed",
                  "best_run_dir": str(runs / "std-small"),
                  "evaluations": [evaluation(runs / "std-small", math.inf, OOM, **small_best)]})
    budgets = [500_000, 1_000_000, WORLD, 4_000_000]
    d_law = (3.1, 104.0, 0.35)
    ds_loss = [round(law(*d_law, b), 4) for b in budgets]
    ds_loss[2] = 3.7512  # the world budget's point is the standard recipe's best there
    for b, loss in zip(budgets, ds_loss, strict=True):
        if b != WORLD:
            best = {"train.epochs": 4, "optim.lr": 1e-3, "optim.weight_decay": 0.1}
            tuned.append({"recipe": "standard", "size": "mini", "params": PARAMS["mini"], "budget": b, "best": best,
                          "best_loss": loss, "certified": True, "reason": "ok", "best_run_dir": str(runs / f"std-{b}"),
                          "evaluations": [evaluation(runs / f"std-{b}", loss, **best)]})
    reg_fit = {"x": list(map(float, PARAMS.values())), "y": [t["best_loss"] for t in tuned[:3]],
               "E": 3.4321, "A": 10.0, "alpha": 0.3, "x_scale": 4e6, "loss": 1e-9, "n_points": 3,
               "E_ci": [3.3987, 3.4655], "A_ci": [7.875, 13.06], "alpha_ci": [0.2812, 0.3187], "method": "residual",
               "n_boot": 200, "n_skipped": 0, "summary": "E = 3.4321 ...", "replicates": replicates(3.4321, 10.0, 0.3, rng)}
    ds = {"x": list(map(float, budgets)), "y": ds_loss, "E": d_law[0], "A": d_law[1], "alpha": d_law[2], "x_scale": 1.4e6,
          "loss": 1e-8, "n_points": 4, "E_ci": [3.02, 3.17], "A_ci": [81.0, 133.0], "alpha_ci": [0.33, 0.37],
          "method": "residual", "n_boot": 200, "n_skipped": 0, "summary": "...", "replicates": replicates(*d_law, rng),
          "leave_largest_out": {"predicted": 3.5962, "actual": 3.6085, "error": -0.0123}, "budgets": budgets,
          "best_loss": ds_loss}
    overfitting = [{"optim.lr": 3e-3, "optim.weight_decay": wd, "train.epochs": ep, "size": "mini",
                    "loss": 3.8 + (0.02 * (math.log2(ep) - 2) ** 2 if wd == 0.1 else -0.01 * math.log2(ep)),
                    "run_dir": str(runs / f"of-{wd}-{ep}"), "error": None}
                   for wd in (0.1, 0.8) for ep in (1, 2, 4, 8, 16)]
    overfitting[4].update(loss=math.inf, error="training diverged: loss is inf at step 300")
    # Power-law multipliers are the token law's inverse at each loss (over the world budget).
    multipliers = {
        "regularized asymptote": {"loss": 3.4321, "interpolated": None,
                                  "interpolated_note": "outside the measured budgets (not extrapolated)",
                                  "power_law": 6.7566, "power_law_ci": [4.9113, 9.8734]},
        "regularized best": {"loss": 3.5321, "interpolated": None,
                             "interpolated_note": "outside the measured budgets (not extrapolated)",
                             "power_law": 3.1850, "power_law_ci": [2.6021, 3.9043]},
        "standard best": {"loss": 3.7512, "interpolated": 1.0, "interpolated_note": "", "power_law": 0.9867,
                          "power_law_ci": [0.9512, 1.0313]},
    }
    return {
        "name": "tiny-world", "world_tokens": WORLD, "sizes": list(PARAMS), "params": PARAMS,
        "recipes": [{"name": "standard", "grid": {"optim.lr": [1e-3, 3e-3], "train.epochs": [2, 4, 8]},
                     "fixed": {"optim.weight_decay": 0.1}, "start": {}},
                    {"name": "regularized", "grid": {"optim.lr": [1e-3, 3e-3], "optim.weight_decay": [0.4, 0.8, 1.6],
                                                     "train.epochs": [4, 8, 16]}, "fixed": {}, "start": {}}],
        "config": {"fit": {"ci": 0.95, "n_boot": 200}, "seeds": [0]},
        "tuned": tuned,
        "fits": {"standard": {"refused": "power-law fit needs at least 3 distinct x values, got 2",
                              "x": [1e6, 4e6], "y": [3.8901, 3.7512]},
                 "regularized": reg_fit},
        "standard_best": 3.7512, "baseline_recipe": "standard", "data_scaling": ds, "multipliers": multipliers,
        "overfitting": overfitting, "verdict": VERDICT, "seconds": 4321.0,
    }


def write(root: Path, results: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    # Same serialisation as the pipeline: failed losses become Infinity.
    (root / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")


def make_root(root: Path) -> Path:
    write(root, make_results(root))
    best = root / "runs" / "reg-small"
    best.mkdir(parents=True)
    rows = [{"step": s, "train_loss": 5.0 - s / 100} for s in range(10, 101, 10)] + [{"step": 50, "val_loss": 4.7},
                                                                                  {"step": 100, "val_loss": 4.2}]
    (best / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """One full report shared by the read-only tests: drawing the figures is most of the time."""
    root = make_root(tmp_path_factory.mktemp("full"))
    return root, write_report(root)


def test_writes_valid_pngs_markdown_and_html(report: tuple[Path, dict[str, Path]]) -> None:
    root, paths = report
    assert set(paths) == {"overfitting", "loss_vs_params", "data_efficiency", "training_curves", "markdown", "html"}
    for name in ("overfitting", "loss_vs_params", "data_efficiency", "training_curves"):
        data = paths[name].read_bytes()
        assert paths[name].parent == root / "report"
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    md = paths["markdown"].read_text(encoding="utf-8")
    for name in ("overfitting", "loss_vs_params", "data_efficiency", "training_curves"):
        assert f"]({name}.png)" in md
    assert not list((root / "report").glob(".*.tmp"))
    assert paths["html"].stat().st_mode & 0o777 == 0o644


def test_markdown_has_the_numbers(report: tuple[Path, dict[str, Path]]) -> None:
    md = report[1]["markdown"].read_text(encoding="utf-8")
    for line in VERDICT:
        assert f"- {line}" in md
    # Asymptote with its interval, the A/alpha intervals, and the refused recipe with its reason.
    assert "| regularized | N | 3 | 3.4321 [3.3987, 3.4655] | 10 [7.875, 13.06] | 0.3 [0.2812, 0.3187] |" in md
    note = re.search(r"\| standard \| N \| 2 \| refused\[\^(\d+)\] \|", md)
    assert note and f"[^{note[1]}]: power-law fit needs at least 3 distinct x values, got 2" in md
    assert "| standard (data scaling) | D | 4 | 3.1000 [3.0200, 3.1700] |" in md
    assert "3.5962 predicted vs 3.6085 measured (error -0.0123)" in md
    # Multipliers: 2 decimals with x, the interval, and interpolated or its absence.
    assert "| regularized asymptote | 3.4321 | 6.76x [4.91x, 9.87x] | —[^" in md
    assert "| standard best | 3.7512 | 0.99x [0.95x, 1.03x] | 1.00x |" in md
    # One tuned row per size, knobs in the paper's order (epochs, LR in scientific notation, WD).
    assert "| size | params | epochs | LR | WD | loss | certified |" in md
    assert "| micro | 1M | 16 | 3e-3 | 0.8 | " in md
    mini_loss = f"{law(3.4321, 10.0, 0.3, PARAMS['mini']):.4f}"
    assert f"| mini | 4M | 8 | 3e-3 | 1.6 | {mini_loss} | ✓ |" in md
    assert re.search(r"\| small \| 16M \| 4 \| 3e-3 \| 3.2 \| \d\.\d{4} \| ✗\[\^(\d+)\] \|", md)
    assert "]: optimum on the grid edge of optim.weight_decay" in md
    # Standard is tuned at 4 budgets, so its table has a tokens column; its failed size says so.
    assert "| size | params | tokens | epochs | LR | WD | loss | certified |" in md
    assert "| small | 16M | 2M | 4 | 3e-3 | 0.1 | inf (failed) | ✗" in md
    for budget in ("500k", "1M", "4M"):
        assert f"| mini | 4M | {budget} | 4 | 1e-3 | 0.1 |" in md
    # Failed runs: every errored evaluation, with its knobs, run dir (relative to root) and reason.
    failed = md.split("## Failed runs")[1].split("##")[0]
    assert f"| regularized / mini / 2M tokens | epochs=8, LR=3e-2, WD=1.6 | runs/reg-mini-lr3e-2 | {DIVERGED} |" in failed
    assert OOM in failed and "training diverged: loss is inf at step 300" in failed
    assert failed.count("\n| ") == 4  # header + 3 failures
    assert "4321 s (1.20 h)" in md and "Failed: 3" in md


def test_html_is_self_contained_with_the_same_numbers(report: tuple[Path, dict[str, Path]]) -> None:
    page = report[1]["html"].read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "<script" not in page
    assert "3.4321 [3.3987, 3.4655]" in page and "6.76x [4.91x, 9.87x]" in page
    assert html.escape(VERDICT[0]) in page and DIVERGED in page
    assert 'title="outside the measured budgets (not extrapolated)"' in page
    mini_loss = f"{law(3.4321, 10.0, 0.3, PARAMS['mini']):.4f}"
    assert f"<td>mini</td><td>4M</td><td>8</td><td>3e-3</td><td>1.6</td><td>{mini_loss}</td><td>✓</td>" in page


def test_missing_sections_are_reported_as_skipped(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    assert "data_efficiency" in write_report(root)
    results = json.loads((root / "results.json").read_text())
    results.update(data_scaling={}, multipliers={}, overfitting=[])
    write(root, results)
    paths = write_report(root)
    # Without a sweep, the overfitting figure falls back to regularized's tuning runs at the smallest size
    # whose evaluations trace loss against epochs (mini: epochs 4, 8, 16 at WD 1.6).
    assert "overfitting" in paths and "data_efficiency" not in paths
    # The earlier report's figure is gone rather than left beside a report that says it was skipped.
    assert not (root / "report" / "data_efficiency.png").exists()
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "(size mini, LR 3e-3). No overfitting sweep was run: the points are regularized's tuning runs" in md
    assert "Data-efficiency figure skipped: no data-scaling baseline" in md
    assert "No multipliers" in md and "standard (data scaling)" not in md

    for t in results["tuned"]:
        t["evaluations"] = t["evaluations"][:1]
    write(root, results)
    paths = write_report(root)
    assert "overfitting" not in paths and not (root / "report" / "overfitting.png").exists()
    assert "Overfitting figure skipped" in paths["markdown"].read_text(encoding="utf-8")
    assert "Overfitting figure skipped" in paths["html"].read_text(encoding="utf-8")


def test_report_without_run_directories_or_fits(tmp_path: Path) -> None:
    """A minimal document (nothing on disk, every fit refused) still gives a report."""
    results = make_results(tmp_path)
    results["fits"]["regularized"] = {"refused": "too few points", "x": [], "y": []}
    results.update(data_scaling={}, multipliers={}, overfitting=[], seconds=None)
    write(tmp_path, results)
    paths = write_report(tmp_path)
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "training_curves" not in paths and "Training-curves figure skipped" in md
    assert "fit refused (too few points)" in md and "loss_vs_params" in paths


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "top level"),
        ('{"name": "x", "world_tokens": 1, "tuned": [{}], "fits": {}, "verdict": []}', "tuned[0].recipe"),
        ('{"name": "x", "world_tokens": 1, "tuned": [], "fits": {}, "verdict": [], "overfitting": [{"loss": 3}]}',
         "overfitting[0].optim.weight_decay"),
    ],
)
def test_malformed_results_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "results.json").write_text(text, encoding="utf-8")
    with pytest.raises(DataeffError) as err:
        write_report(tmp_path)
    assert str(tmp_path / "results.json") in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "report" / "report.md").exists()


def test_missing_results_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataeffError, match=re.escape(str(tmp_path / "results.json"))):
        write_report(tmp_path)


def test_missing_field_is_named(tmp_path: Path) -> None:
    results = make_results(tmp_path)
    del results["tuned"][2]["best_loss"]
    write(tmp_path, copy.deepcopy(results))
    with pytest.raises(DataeffError, match=r"tuned\[2\]\.best_loss"):
        write_report(tmp_path)


def test_band_is_the_pointwise_interval_of_the_replicate_curves() -> None:
    x = np.geomspace(1e6, 1e15, 7)
    truth = law(3.4, 40.0, 0.3, x)
    exact = {"E": 3.4, "A": 40.0, "alpha": 0.3, "replicates": {"E": [3.4] * 5, "A": [40.0] * 5, "alpha": [0.3] * 5}}
    lo, hi = _band(exact, x, 0.95)
    np.testing.assert_allclose(lo, truth)
    np.testing.assert_allclose(hi, truth)
    noisy = {"replicates": replicates(3.4, 40.0, 0.3, np.random.default_rng(1), n=400)}
    lo, hi = _band(noisy, x, 0.9)
    assert np.all(lo < truth) and np.all(truth < hi)
    # Far out the curve is E, so the band narrows to E's own spread (sd 0.015: a 90% width near 0.05).
    assert 0.03 < hi[-1] - lo[-1] < 0.07
    assert _band({"replicates": {"E": [], "A": [], "alpha": []}}, x, 0.95) is None
