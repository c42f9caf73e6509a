"""train.loggers: metrics.jsonl mirrored to TensorBoard (read back with its event reader) and W&B (offline)."""

from __future__ import annotations

import pytest

from dataeff.config import from_dict
from dataeff.fsutil import read_jsonl
from dataeff.train import RunConfig, run_hash, train


def _config(corpus, run_dir, **train_over) -> RunConfig:
    return from_dict(RunConfig, {
        "run_dir": str(run_dir),
        "data": {"corpus": str(corpus), "val_docs": 20, "cache_dir": str(run_dir.parent / "cache")},
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "model": {"preset": "nano", "seq_len": 32},
        "train": {"epochs": 1, "batch_tokens": 256, "progress": False, "threads": 1, "log_every": 2, **train_over},
    })


def test_loggers_are_not_part_of_a_runs_identity(small_corpus, tmp_path) -> None:
    plain = _config(small_corpus, tmp_path / "a")
    tracked = _config(small_corpus, tmp_path / "a", loggers=["tensorboard", "wandb"], log_group="sweep")
    assert run_hash(plain) == run_hash(tracked)


def test_tensorboard_gets_every_metrics_row(small_corpus, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(_config(small_corpus, run_dir, loggers=["tensorboard"]))
    rows = read_jsonl(run_dir / "metrics.jsonl")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for key in ("train_loss", "grad_norm", "val_loss"):
        logged = [(r["step"], r[key]) for r in rows if key in r]
        assert logged and [(e.step, pytest.approx(e.value)) for e in events.Scalars(key)] == logged


@pytest.mark.slow  # W&B starts its own service process: several seconds
def test_wandb_runs_offline_in_the_run_directory_grouped_by_pipeline(small_corpus, tmp_path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train(_config(small_corpus, run_dir, loggers=["wandb"], log_group="my-pipeline"))
    # finish() returns before wandb-core's writer has closed the record, so a busy machine can read only its
    # header; teardown waits for the service to exit, as the end of a process does before `wandb sync`.
    wandb.teardown()
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train_loss" in r]
    # No network here: the run was written offline, under the run's name, for `wandb sync` later.
    [offline] = (run_dir / "wandb").glob("offline-run-*-run")
    [record] = offline.glob("run-run.wandb")
    data = record.read_bytes()
    assert b"my-pipeline" in data and data.count(b"train_loss") >= len(rows) > 0
