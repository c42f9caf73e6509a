"""train.init_from: a run starts from scratch, from a dataeff run's weights, or from a Hugging Face checkpoint."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_train import tiny_config

from dataeff.errors import DataeffError
from dataeff.model.hf import export_run
from dataeff.train import train


@pytest.fixture(scope="module")
def base(small_corpus_module, tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    cfg = tiny_config(small_corpus_module, root / "base", epochs=2)
    return cfg, train(cfg)


def frozen(cfg, run_dir, init_from):
    """A run that starts from ``init_from`` and cannot move (LR 0): it scores what it started with."""
    c = dataclasses.replace(cfg, run_dir=str(run_dir), train=dataclasses.replace(cfg.train, init_from=str(init_from), epochs=1))
    c.optim.lr = 0.0
    return c


def test_a_run_starts_from_another_runs_weights(base, tmp_path):
    cfg, result = base
    again = train(frozen(cfg, tmp_path / "from-run", cfg.run_dir))
    assert again["val_loss"] == pytest.approx(result["val_loss"], abs=1e-6)
    manifest = json.loads((tmp_path / "from-run" / "manifest.json").read_text())
    assert manifest["init"]["from"] == cfg.run_dir and len(manifest["init"]["sha256"]["model.safetensors"]) == 64
    # From scratch the same config scores far worse: the weights above were the trained ones.
    scratch = train(frozen(cfg, tmp_path / "scratch", "scratch"))
    assert scratch["val_loss"] > result["val_loss"] + 0.5


def test_a_run_starts_from_a_hugging_face_checkpoint(base, tmp_path):
    cfg, result = base
    hf_dir = export_run(cfg.run_dir, tmp_path / "hf")
    again = train(frozen(cfg, tmp_path / "from-hf", f"hf:{hf_dir}"))
    assert again["val_loss"] == pytest.approx(result["val_loss"], abs=2e-3)  # bf16 scoring of fp32-converted weights


def test_continued_runs_keep_the_sources_shape_and_refuse_another(base, tmp_path):
    cfg, _ = base
    longer = frozen(cfg, tmp_path / "longer", cfg.run_dir)
    longer.model.seq_len, longer.model.dropout = 64, 0.1  # context and dropout are the run's own
    train(longer)
    shape = json.loads((tmp_path / "longer" / "manifest.json").read_text())["model"]
    assert shape["seq_len"] == 64 and shape["dropout"] == 0.1 and shape["d_model"] == 32
    wider = frozen(cfg, tmp_path / "wider", cfg.run_dir)
    wider.model.preset = "micro"
    with pytest.raises(DataeffError, match=r"model\.d_model=64 differs from .*'s 32"):
        train(wider)


def test_another_tokenizer_or_no_source_is_refused(base, tmp_path):
    cfg, _ = base
    other = frozen(cfg, tmp_path / "other-tok", cfg.run_dir)
    other.tokenizer.vocab_size = 280
    with pytest.raises(DataeffError, match="its tokenizer differs from the data's; tokenize the data with it"):
        train(other)
    with pytest.raises(DataeffError, match="not 'scratch', a dataeff run directory"):
        train(frozen(cfg, tmp_path / "nothing", tmp_path / "missing"))
