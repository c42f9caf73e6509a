from __future__ import annotations

import math

import pytest

from dataeff.errors import DataeffError
from dataeff.tune import Evaluation, RecipeConfig, Tuner, builtin_recipes


def drive(tuner: Tuner, loss_fn, fail=lambda v: False):
    """Run a tuner against a synthetic loss surface; return the result and every point it asked for."""
    asked = []
    gen = tuner.run()
    batch = next(gen)
    try:
        while True:
            asked.extend(batch)
            evals = [Evaluation(v, math.inf if fail(v) else loss_fn(v)) for v in batch]
            batch = gen.send(evals)
    except StopIteration as stop:
        return stop.value, asked


def bowl(opt):
    """A convex surface in log-space with its minimum at the given knob values."""
    def f(v):
        return 3.0 + sum((math.log(v[k] + 1e-3) - math.log(opt[k] + 1e-3)) ** 2 for k in opt)
    return f


def test_descends_to_the_optimum_and_certifies_it():
    recipe = RecipeConfig(name="r", grid={"optim.lr": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], "optim.weight_decay": [0.1, 0.2, 0.4, 0.8, 1.6]},
                          fixed={"train.epochs": 4}, start={"optim.lr": 1e-3, "optim.weight_decay": 0.1})
    result, asked = drive(Tuner(recipe, max_extensions=0), bowl({"optim.lr": 3e-2, "optim.weight_decay": 0.8}))
    assert result.best == {"train.epochs": 4, "optim.lr": 3e-2, "optim.weight_decay": 0.8}
    assert result.certified and "none is better" in result.reason
    # The certificate is real: every ±1 neighbour of the optimum was trained, and no point twice.
    keys = [(v["optim.lr"], v["optim.weight_decay"]) for v in asked]
    assert len(keys) == len(set(keys))
    for nb in [(1e-2, 0.8), (1e-1, 0.8), (3e-2, 0.4), (3e-2, 1.6)]:
        assert nb in keys
    assert len(keys) < 25  # coordinate descent, not the full grid


def test_edge_optimum_extends_the_ladder_then_certifies():
    recipe = RecipeConfig(name="r", grid={"train.epochs": [1, 2, 4], "optim.lr": [1e-3, 3e-3, 1e-2]})
    result, asked = drive(Tuner(recipe), bowl({"train.epochs": 8, "optim.lr": 3e-3}))
    assert result.best["train.epochs"] == 8 and result.certified
    assert any(v["train.epochs"] == 16 for v in asked)  # the neighbour beyond the optimum was trained


def test_edge_optimum_without_room_is_not_certified():
    recipe = RecipeConfig(name="r", grid={"optim.weight_decay": [0.0, 0.1, 0.2], "optim.lr": [1e-3, 3e-3, 1e-2]})
    result, _ = drive(Tuner(recipe), bowl({"optim.weight_decay": 0.0, "optim.lr": 3e-3}))
    assert result.best["optim.weight_decay"] == 0.0
    assert not result.certified and "grid edge of optim.weight_decay" in result.reason


def test_failed_runs_count_as_infinitely_bad():
    recipe = RecipeConfig(name="r", grid={"optim.lr": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]})
    result, _ = drive(Tuner(recipe, max_extensions=0), bowl({"optim.lr": 1e-1}), fail=lambda v: v["optim.lr"] > 2e-2)
    assert result.best["optim.lr"] == 1e-2 and result.certified
    assert any(math.isinf(e.loss) for e in result.evaluations)


def test_single_value_grid_and_bad_start_are_refused():
    with pytest.raises(DataeffError, match=r"grid\.optim\.lr has \[0\.001\]; the certificate needs at least two values"):
        Tuner(RecipeConfig(name="r", grid={"optim.lr": [1e-3]}))
    with pytest.raises(DataeffError, match=r"start\.optim\.lr=0\.5 is not in grid"):
        Tuner(RecipeConfig(name="r", grid={"optim.lr": [1e-3, 1e-2]}, start={"optim.lr": 0.5}))
    with pytest.raises(DataeffError, match="both tuned and fixed"):
        Tuner(RecipeConfig(name="r", grid={"optim.lr": [1e-3, 1e-2]}, fixed={"optim.lr": 1e-3}))


def test_builtin_recipes_match_the_paper():
    std, reg = builtin_recipes()
    assert std.fixed == {"optim.weight_decay": 0.1} and set(std.grid) == {"optim.lr", "train.epochs"}
    assert set(reg.grid) == {"optim.lr", "optim.weight_decay", "train.epochs"}
    assert reg.grid["optim.weight_decay"] == [0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4]
