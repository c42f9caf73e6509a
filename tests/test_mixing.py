"""What a run trains on besides its corpus: conditional documents with a loss mask, synthetic windows seen once
among the real ones, and replay of a general corpus; each a pure function of (seed, position), so exact on resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from test_train import tiny_config

from dataeff import averaging
from dataeff.data.order import EpochOrder, OnceMix, ReplayMix
from dataeff.data.tokens import prepare
from dataeff.errors import DataeffError
from dataeff.eval.loss import IGNORE, masked_batches
from dataeff.fsutil import read_jsonl
from dataeff.train import train


def _stream(n_docs: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.random.default_rng(seed).integers(5, 30, n_docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return np.arange(offsets[-1], dtype=np.int64) + 1000 * seed, offsets


def test_padded_windows_never_mix_documents_and_skip_prompts():
    tokens, offsets = _stream()
    mask = np.ones(len(tokens), dtype=np.uint8)
    for start in offsets[:-1]:
        mask[start : start + 3] = 0  # a three-token prompt at the start of every document
    order = EpochOrder(tokens, offsets, seq_len=8, seed=1, mode="padded", mask=mask)
    samples, masks = order.samples(0, order.n), order.target_masks(0, order.n)
    doc_of = np.searchsorted(offsets, tokens, side="right") - 1
    for window, keep in zip(samples, masks, strict=True):
        used = window[1:][keep]
        assert len(used) and len(set(doc_of[used - tokens[0]])) == 1  # one document per window
        assert all(mask[t - tokens[0]] for t in used)  # no prompt token is a counted target
    # Every counted target of the corpus is in exactly one window per epoch.
    counted = sorted(int(t) for window, keep in zip(samples, masks, strict=True) for t in window[1:][keep])
    assert counted == sorted(int(t) for t, m in zip(tokens, mask, strict=True) if m and t not in tokens[offsets[:-1]])
    x, y = next(masked_batches(tokens, offsets, mask, 8, batch_size=4))
    assert x.shape == y.shape == (4, 8) and (y == IGNORE).any()


def test_once_mix_shows_each_extra_window_once_spread_through_the_run():
    real, extra = EpochOrder(*_stream(), 8, seed=2), EpochOrder(*_stream(seed=1), 8, seed=2)
    mix = OnceMix(real, extra, n_extra=extra.n, main_epochs=3)
    total = int(mix.total_samples(3))
    samples = mix.samples(0, total)
    is_extra = samples[:, 0] >= 1000
    assert is_extra.sum() == extra.n and len({int(w[0]) for w in samples[is_extra]}) == extra.n
    # Spread evenly: every quarter of the run holds about a quarter of them.
    quarters = [is_extra[q * total // 4 : (q + 1) * total // 4].sum() for q in range(4)]
    assert max(quarters) - min(quarters) <= 1
    # The real windows repeat epoch after epoch around them, and the order reads the same in pieces.
    assert (~is_extra).sum() == 3 * real.n and mix.epochs_of(total) == pytest.approx(3.0)
    assert np.array_equal(np.concatenate([mix.samples(0, 17), mix.samples(17, total - 17)]), samples)
    with pytest.raises(DataeffError, match="are to be seen once, but the synthetic corpus holds"):
        OnceMix(real, extra, n_extra=extra.n + 1, main_epochs=3)


def test_replay_replaces_a_seeded_share_of_sequences():
    main, replay = EpochOrder(*_stream(n_docs=200), 8, seed=0), EpochOrder(*_stream(seed=9), 8, seed=0)
    mix = ReplayMix(main, replay, rate=0.25, seed=7)
    samples = mix.samples(0, 2000)
    replaced = samples[:, 0] >= 9000
    assert 0.21 < replaced.mean() < 0.29
    # The sequences not replaced are the main order's own, at their own positions.
    assert np.array_equal(samples[~replaced], main.samples(0, 2000)[~replaced])
    assert np.array_equal(ReplayMix(main, replay, 0.25, seed=7).samples(500, 40), samples[500:540])
    assert not np.array_equal(ReplayMix(main, replay, 0.25, seed=8).samples(0, 2000), samples)


def _conditional_corpus(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["red", "blue", "cat", "dog", "ran", "sat", "big", "small", "tree", "house"]
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": " ".join(rng.choice(words, 6)), "text": " ".join(rng.choice(words, 8))} for _ in range(120)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_conditional_corpus_trains_on_its_texts_only(tmp_path):
    corpus = _conditional_corpus(tmp_path)
    cfg = tiny_config(corpus, tmp_path / "run", epochs=2, shuffle="padded")
    cfg.data.prompt_field, cfg.tokenizer.kind = "prompt", "word"
    prepared = prepare(cfg.data, cfg.tokenizer, progress=False)
    val = prepared.split("val")
    assert val.mask is not None and 0 < val.mask.mean() < 1
    result = train(cfg)
    # Held-out loss counts the texts' targets (each text and its end token), never the prompts'.
    assert result["val_tokens"] == int(val.mask.sum())
    with pytest.raises(DataeffError, match=r"prompt_field \(conditional documents\) needs train\.shuffle=padded"):
        train(dataclasses.replace(cfg, run_dir=str(tmp_path / "run2"), train=dataclasses.replace(cfg.train, shuffle="sequence")))


def test_synthetic_seen_once_and_replay_train_and_resume_exactly(small_corpus, tmp_path, monkeypatch):
    synthetic = tmp_path / "synthetic.jsonl"
    synthetic.write_text("".join(json.dumps({"text": f"the cat number {i} sat on the mat"}) + "\n" for i in range(400)))
    replay = tmp_path / "replay.txt"
    replay.write_text("\n\n".join(f"a big dog {i} ran under the tree" for i in range(300)) + "\n")

    def config(run: Path):
        cfg = tiny_config(small_corpus, run, epochs=3, checkpoint_every=4, log_every=1)
        cfg.data.synthetic, cfg.data.synthetic_share, cfg.data.synthetic_schedule = str(synthetic), 0.1, "once"
        cfg.data.replay, cfg.data.replay_rate = str(replay), 0.2
        return cfg

    clean = train(config(tmp_path / "clean"))
    plan = json.loads((tmp_path / "clean" / "manifest.json").read_text())["plan"]
    assert clean["epochs"] == pytest.approx(3.0, abs=0.1) and clean["synthetic_tokens"] > 0
    assert clean["synthetic_tokens"] == pytest.approx(clean["train_tokens"] * 3 / 9, rel=0.05)  # s/(1-s)·E·D, s = 0.1
    assert plan["total_steps"] > round(3 * plan["windows_per_epoch"] / plan["batch_seqs"])  # the synthetic is extra
    real = averaging.RunAveraging.after_step

    def die(self, step):
        real(self, step)
        if step == 9:
            raise KeyboardInterrupt

    monkeypatch.setattr(averaging.RunAveraging, "after_step", die)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "killed"))
    monkeypatch.undo()
    resumed = train(config(tmp_path / "killed"))
    assert resumed["val_loss"] == pytest.approx(clean["val_loss"], abs=1e-6)
    losses = {r["step"]: r["train_loss"] for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl") if "train_loss" in r}
    assert losses == {r["step"]: r["train_loss"] for r in read_jsonl(tmp_path / "clean" / "metrics.jsonl") if "train_loss" in r}
