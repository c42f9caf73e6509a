"""Whether the pipeline's intervals can be trusted for a design: the coverage study on the known-truth world.

``coverage.json`` (written by ``bench/coverage.py``, tabled in ``docs/intervals.md``) holds, for 4-6 sizes and
2-4 seeds, the share of nominal 95% intervals that held the true value in simulations around the Markov world's
measured curves. The settings check looks the pipeline's design up there: a method the verdicts rest on that
covered below 90% makes the pipeline refuse the design before anything trains (or warn, with
``fit.coverage=warn``). A design outside the study (fewer than 4 sizes, one seed, another level) is only warned
about; more sizes or seeds than the study's are looked up at its largest, which they can only improve on.
"""

from __future__ import annotations

import json
import warnings
from functools import cache
from pathlib import Path
from typing import Any

from dataeff.errors import DataeffError, DataeffWarning

TABLE = Path(__file__).with_name("coverage.json")
REQUIRED = 0.90
# The intervals verdicts are drawn from: the marginal bootstrap, the profile likelihood, the paired difference.
METHODS = ("bootstrap", "profile", "paired")


@cache
def _rows() -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(TABLE.read_text(encoding="utf-8"))["rows"])


def lookup(n_sizes: int, n_seeds: int) -> dict[str, Any] | None:
    """The study's row for a design (clamped to its largest sizes and seeds), or None outside it."""
    rows = _rows()
    if n_sizes < min(r["sizes"] for r in rows) or n_seeds < min(r["seeds"] for r in rows):
        return None
    s = min(n_sizes, max(r["sizes"] for r in rows))
    k = min(n_seeds, max(r["seeds"] for r in rows))
    return next((r for r in rows if r["sizes"] == s and r["seeds"] == k), None)


def check(n_sizes: int, n_seeds: int, ci: float, policy: str) -> dict[str, Any] | None:
    """Refuse (or warn about) a design whose intervals under-covered in the study; returns its row."""
    if policy == "off":
        return None
    row = lookup(n_sizes, n_seeds)
    design = f"{n_sizes} sizes and {n_seeds} seeds"
    if row is None or abs(ci - 0.95) > 1e-9:
        warnings.warn(f"pipeline: the coverage study (docs/intervals.md) did not measure {design} at a {ci:.0%} "
                      "level; the intervals' coverage is unknown", DataeffWarning, stacklevel=2)
        return None
    low = {m: row[m] for m in METHODS if row[m] < REQUIRED}
    if low:
        what = ", ".join(f"{m} {v:.0%}" for m, v in low.items())
        message = (f"pipeline: with {design}, nominal 95% intervals covered the truth below {REQUIRED:.0%} in the "
                   f"coverage study ({what}; docs/intervals.md): add sizes or seeds (confirm_seeds), or set "
                   "fit.coverage=warn to run anyway")
        if policy == "refuse":
            raise DataeffError(message)
        warnings.warn(message, DataeffWarning, stacklevel=2)
    return row
