"""The known-truth world: its entropy rate is the true chain's mean log loss, and its corpus is that chain."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dataeff.errors import DataeffError
from dataeff.synth.markov import MarkovConfig, random_source, write_corpus


def test_entropy_rate_is_the_true_chains_mean_log_loss():
    source = random_source(symbols=20, successors=3, doc_length=10.0, seed=1)
    assert np.allclose(source.P.sum(axis=1), 1.0)
    assert np.allclose(source.stationary @ source.P, source.stationary)
    docs = source.sample(60_000, np.random.default_rng(0))
    index = {w: k + 1 for k, w in enumerate(source.words())}
    states = [0] + [s for d in docs for s in [*(index[w] for w in d.split()), 0]]
    nll = -np.log(source.P[states[:-1], states[1:]])
    assert np.isfinite(nll).all()
    # The per-token standard error of a 60k-token mean is below 0.01 nats here.
    assert nll.mean() == pytest.approx(source.entropy_rate, abs=0.03)
    assert source.entropy_rate < np.log(3)  # below the successor count's uniform entropy


def test_corpus_files_hold_whole_documents_and_the_exact_entropy(tmp_path):
    info = write_corpus(MarkovConfig(out=str(tmp_path), symbols=12, successors=2, train_tokens=3000, val_tokens=500))
    saved = json.loads((tmp_path / "source.json").read_text())
    assert saved["entropy_rate"] == info["entropy_rate"] < saved["unigram_entropy"] < saved["max_entropy"]
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert all(r["text"] for r in rows)
    assert sum(len(r["text"].split()) + 1 for r in rows) == saved["splits"]["train"]["tokens"] >= 3000
    with pytest.raises(DataeffError, match="successors"):
        random_source(symbols=3, successors=4, doc_length=5.0, seed=0)
