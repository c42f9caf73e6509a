"""train.compile=auto: eager for runs too short to pay for compilation, compiled for long ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataeff.config import from_dict
from dataeff.errors import DataeffError
from dataeff.train import RunConfig, train
from dataeff.train.compiling import SPEEDUP, decide, estimated_compile_seconds


def tiny_config(corpus: Path, run_dir: Path, **train_over: object) -> RunConfig:
    return from_dict(RunConfig, {
        "run_dir": str(run_dir),
        "data": {"corpus": str(corpus), "val_docs": 20, "cache_dir": str(run_dir.parent / "cache")},
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "model": {"preset": "nano", "seq_len": 32},
        "train": {"epochs": 2, "batch_tokens": 256, "progress": False, "threads": 1, **train_over},
    })


def test_decision_weighs_the_steps_left_against_the_compile_cost() -> None:
    cost = estimated_compile_seconds(8)
    per_step = 0.1
    # The break-even number of steps: each saves per_step * (1 - 1/SPEEDUP).
    even = cost / (per_step * (1 - 1 / SPEEDUP))
    assert not decide(int(even * 0.9), per_step, 8).compile
    long = decide(int(even * 1.1), per_step, 8)
    assert long.compile and "compiling" in long.reason
    assert estimated_compile_seconds(16) > cost


def test_config_takes_true_false_and_auto() -> None:
    for value, expected in (("auto", "auto"), ("true", True), (False, False)):
        assert from_dict(RunConfig, {"train": {"compile": value}}).train.compile == expected
    with pytest.raises(DataeffError, match="compile"):
        from_dict(RunConfig, {"train": {"compile": "sometimes"}})


def test_a_short_auto_run_stays_eager(small_corpus, tmp_path) -> None:
    result = train(tiny_config(small_corpus, tmp_path / "run", compile="auto"))
    assert result["compiled"] is False


@pytest.mark.slow
def test_an_auto_run_that_pays_for_it_compiles_and_learns_alike(small_corpus, tmp_path, monkeypatch) -> None:
    import dataeff.train.loop as loop

    monkeypatch.setattr(loop, "decide", lambda steps, seconds, layers: decide(10**9, seconds, layers))
    compiled = train(tiny_config(small_corpus, tmp_path / "auto", compile="auto"))
    eager = train(tiny_config(small_corpus, tmp_path / "eager"))
    assert compiled["compiled"] is True and eager["compiled"] is False
    assert compiled["steps"] == eager["steps"]
    assert abs(compiled["val_loss"] - eager["val_loss"]) < 0.02
