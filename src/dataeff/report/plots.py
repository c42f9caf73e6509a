"""What the report's figures share: a pyplot-free figure, PNG bytes, fitted curves with their bootstrap bands,
y limits that follow the data, and a colour cycle."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dataeff.experiment.fitting import Fit
from dataeff.report.blocks import finite

DPI = 120


def new_figure(width: float = 7.5, height: float = 4.8) -> tuple[Figure, Axes]:
    # Figure without pyplot: no global state and no GUI backend, so the pipeline can call this anywhere.
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def curve(fit: Fit, x: np.ndarray) -> np.ndarray:
    assert fit.E is not None and fit.A is not None and fit.alpha is not None
    with np.errstate(over="ignore", divide="ignore"):
        return fit.E + np.exp(math.log(fit.A) - fit.alpha * np.log(x))


def band(fit: Fit, x: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Pointwise percentile interval of the bootstrap replicates' curves."""
    reps = fit.replicates
    if reps is None:
        return None
    e, a, alpha = (np.asarray(reps.get(k, []), dtype=float) for k in ("E", "A", "alpha"))
    n = min(len(e), len(a), len(alpha))
    ok = np.isfinite(e[:n]) & np.isfinite(alpha[:n]) & (a[:n] > 0)
    if not ok.any():
        return None
    with np.errstate(over="ignore", divide="ignore"):
        curves = e[:n][ok, None] + np.exp(np.log(a[:n][ok, None]) - alpha[:n][ok, None] * np.log(x)[None, :])
    lo, hi = np.nanpercentile(curves, [50 * (1 - ci), 50 * (1 + ci)], axis=0)
    return lo, hi


def set_ylim(ax: Axes, values: Iterable[float | None]) -> tuple[float, float]:
    """Limits from the data, not from bands that blow up at the small-x end."""
    v = [x for x in values if finite(x)]
    lo, hi = (min(v), max(v)) if v else (0.0, 1.0)  # type: ignore[type-var]
    pad = max(hi - lo, 1e-3) * 0.12
    ax.set_ylim(lo - pad, hi + pad)
    return lo - pad, hi + pad


def colors(n: int) -> list[Any]:
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def locate(root: Path, run_dir: str | None) -> Path | None:
    """A run directory as recorded (relative to the pipeline's working directory) or moved along with root."""
    if not run_dir:
        return None
    p = Path(run_dir)
    return next((c for c in (p, root / p, root / "runs" / p.name) if c.is_dir()), None)


def shown_path(root: Path, path: str) -> str:
    """A recorded path relative to the report's root when it lies under it (as the pipeline records them)."""
    return str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else path
