"""Hyperparameter tuning per model size by coordinate descent on a grid, with a local-optimality certificate.

As in "Pre-training under infinite compute": from a start point, train the point and its ±1-step neighbours
on every tuned axis, move to the best, repeat; a configuration is *certified* when all of its ±1-step grid
neighbours have been trained and none is better. The tuner never trains anything itself: it says which
points it needs, so many tuners (sizes × recipes × budgets) can share one executor batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from dataeff.config import option
from dataeff.errors import DataeffError

Point = tuple[int, ...]


@dataclass
class RecipeConfig:
    name: str = option("recipe", "recipe name (used in run names and the report)")
    grid: dict[str, list[Any]] = option({}, "tuned knobs: dotted config key -> ordered candidate values")
    fixed: dict[str, Any] = option({}, "knobs held fixed: dotted config key -> value")
    start: dict[str, Any] = option({}, "starting value per tuned knob (default: the middle of its grid)")


# The paper's ladders (Appendix C): LR on a ×3 / ×√10 ladder, WD doublings from 0, epoch doublings.
PAPER_LR = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
PAPER_WD = [0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4]
PAPER_EPOCHS = [1, 2, 4, 8, 16, 32, 64]


def builtin_recipes() -> list[RecipeConfig]:
    """``standard`` (weight decay fixed at 0.1; tune LR and epochs) and ``regularized`` (tune all three)."""
    return [
        RecipeConfig(name="standard", grid={"optim.lr": PAPER_LR, "train.epochs": PAPER_EPOCHS},
                     fixed={"optim.weight_decay": 0.1}, start={"optim.lr": 3e-3, "train.epochs": 4}),
        RecipeConfig(name="regularized",
                     grid={"optim.lr": PAPER_LR, "optim.weight_decay": PAPER_WD, "train.epochs": PAPER_EPOCHS},
                     start={"optim.lr": 3e-3, "optim.weight_decay": 0.8, "train.epochs": 8}),
    ]


@dataclass
class Evaluation:
    values: dict[str, Any]
    loss: float  # inf for a failed (e.g. diverged) run; the mean over seeds
    run_dir: str | None = None
    error: str | None = None
    seed_losses: list[float] = field(default_factory=list)


@dataclass
class TuneResult:
    recipe: str
    best: dict[str, Any]
    best_loss: float
    certified: bool
    reason: str  # why the certificate holds or fails
    evaluations: list[Evaluation] = field(default_factory=list)
    best_run_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "best": self.best, "best_loss": self.best_loss, "certified": self.certified,
            "reason": self.reason, "best_run_dir": self.best_run_dir,
            "evaluations": [e.__dict__ for e in self.evaluations],
        }


def _extend(values: list[Any], upward: bool) -> Any | None:
    """The next rung of a geometric ladder beyond its end, or None where the ladder has no such rung."""
    if len(values) < 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return None
    a, b = (values[-2], values[-1]) if upward else (values[1], values[0])
    if a <= 0 or b <= 0:
        return None
    nxt = b * (b / a)
    return round(nxt) if all(isinstance(v, int) for v in values) else nxt


class Tuner:
    """Coordinate descent over a grid. Drive it with :meth:`run`: a generator that yields the value dicts it
    needs trained and receives their losses; it returns a :class:`TuneResult`."""

    def __init__(self, recipe: RecipeConfig, *, max_extensions: int = 2):
        if not recipe.grid:
            raise DataeffError(f"recipe {recipe.name!r}: grid is empty; give at least one tuned knob")
        for key, values in recipe.grid.items():
            if not isinstance(values, list) or len(values) < 2:
                raise DataeffError(
                    f"recipe {recipe.name!r}: grid.{key} has {values!r}; the certificate needs at least two values "
                    f"(move a single value to 'fixed')"
                )
            if len(set(map(repr, values))) != len(values):
                raise DataeffError(f"recipe {recipe.name!r}: grid.{key} repeats a value: {values!r}")
        overlap = set(recipe.grid) & set(recipe.fixed)
        if overlap:
            raise DataeffError(f"recipe {recipe.name!r}: {sorted(overlap)[0]} is both tuned and fixed")
        self.recipe = recipe
        self.keys = list(recipe.grid)
        self.axes = [list(v) for v in recipe.grid.values()]
        self.max_extensions = max_extensions
        self.extensions = [0] * len(self.axes)
        self.losses: dict[tuple[Any, ...], Evaluation] = {}
        self.start = tuple(self._start_index(i) for i in range(len(self.axes)))

    def _start_index(self, i: int) -> int:
        key, axis = self.keys[i], self.axes[i]
        if key in self.recipe.start:
            want = self.recipe.start[key]
            for j, v in enumerate(axis):
                if v == want or (isinstance(v, float | int) and isinstance(want, float | int) and math.isclose(v, want)):
                    return j
            raise DataeffError(f"recipe {self.recipe.name!r}: start.{key}={want!r} is not in grid.{key} {axis!r}")
        return (len(axis) - 1) // 2

    def values(self, point: Point) -> dict[str, Any]:
        return {**self.recipe.fixed, **{k: self.axes[i][j] for i, (k, j) in enumerate(zip(self.keys, point, strict=True))}}

    def _key(self, point: Point) -> tuple[Any, ...]:
        return tuple(self.axes[i][j] for i, j in enumerate(point))

    def neighbours(self, point: Point) -> list[Point]:
        out = []
        for i in range(len(point)):
            for step in (-1, 1):
                j = point[i] + step
                if 0 <= j < len(self.axes[i]):
                    out.append((*point[:i], j, *point[i + 1:]))
        return out

    def _grow(self, point: Point) -> Point:
        """Extend an axis whose edge the current point sits on, so its outer neighbour can exist."""
        point = list(point)  # type: ignore[assignment]
        for i, j in enumerate(point):
            axis = self.axes[i]
            if self.extensions[i] >= self.max_extensions:
                continue
            if j == len(axis) - 1 and (nxt := _extend(axis, upward=True)) is not None:
                axis.append(nxt)
                self.extensions[i] += 1
            elif j == 0 and (nxt := _extend(axis, upward=False)) is not None:
                axis.insert(0, nxt)
                self.extensions[i] += 1
                point[i] += 1  # type: ignore[index]
                self.start = tuple(s + (1 if k == i else 0) for k, s in enumerate(self.start))
        return tuple(point)

    def loss(self, point: Point) -> float:
        return self.losses[self._key(point)].loss

    def run(self) -> Iterator[list[dict[str, Any]]]:  # type: ignore[return]
        """Yields batches of value dicts to train; ``send`` back a list of :class:`Evaluation` per batch."""
        current = self.start
        while True:
            current = self._grow(current)
            box = [current, *self.neighbours(current)]
            missing = [p for p in box if self._key(p) not in self.losses]
            if missing:
                evaluations: list[Evaluation] = yield [self.values(p) for p in missing]
                for p, ev in zip(missing, evaluations, strict=True):
                    self.losses[self._key(p)] = ev
            best = min(box, key=lambda p: (self.loss(p), p != current))
            if best == current:
                return self._result(current)
            current = best

    def _result(self, point: Point) -> TuneResult:
        loss = self.loss(point)
        ev = self.losses[self._key(point)]
        if not math.isfinite(loss):
            certified, reason = False, "every configuration tried failed"
        else:
            edges = [self.keys[i] for i, j in enumerate(point) if j in (0, len(self.axes[i]) - 1)]
            if edges:
                certified = False
                reason = f"optimum on the grid edge of {', '.join(edges)}: widen the grid to certify it"
            else:
                certified = True
                reason = f"all {2 * len(point)} ±1-step neighbours trained; none is better"
        return TuneResult(
            recipe=self.recipe.name, best=self.values(point), best_loss=loss, certified=certified, reason=reason,
            evaluations=list(self.losses.values()), best_run_dir=ev.run_dir,
        )
