"""SBP's synthesizer corpus and training run, and `dataeff synthesize`: budgets, refusals, resumption, dedup."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dataeff.cli import main
from dataeff.config import to_dict
from dataeff.data.config import DataConfig, TokenizerConfig
from dataeff.data.tokens import PreparedData, prepare
from dataeff.errors import DataeffError
from dataeff.model.config import ModelConfig
from dataeff.model.transformer import Transformer
from dataeff.synth.dedup import NearDup
from dataeff.synth.embed import EmbedConfig, EmbedWarning
from dataeff.synth.neighbors import PairsConfig, pairs
from dataeff.synth.synthesize import OUTPUT, SynthesizeConfig, capacity, synthesize
from dataeff.synth.synthesizer import (
    SynthesizerConfig,
    pair_corpus,
    side_budgets,
    synthesizer_run,
    train_synthesizer,
    truncate,
)
from dataeff.train.checkpoint import save_weights
from dataeff.train.config import RunConfig, TrainConfig

_WORDS = [f"w{i}" for i in range(300)]
SEQ_LEN = 64


def _run_dir(path: Path, store: PreparedData, seed: int = 0) -> Path:
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=SEQ_LEN, vocab_size=store.tokenizer.vocab_size).resolved()
    torch.manual_seed(seed)
    path.mkdir(parents=True)
    store.tokenizer.save(path / "tokenizer.json")
    (path / "manifest.json").write_text(json.dumps({"model": to_dict(cfg)}))
    save_weights(path / "model.safetensors", Transformer(cfg, init_seed=seed))
    return path


def _store(tmp_path: Path, name: str, vocab: int) -> PreparedData:
    rng = np.random.default_rng(0)
    topics = [_WORDS[i * 60 : (i + 1) * 60] for i in range(5)]
    docs = [" ".join(rng.choice(topics[t % 5], size=int(rng.integers(20, 90)))) for t in range(30)]
    corpus = tmp_path / f"{name}.txt"
    corpus.write_text("\n\n".join(docs) + "\n")
    return prepare(DataConfig(corpus=str(corpus), val_docs=2, cache_dir=str(tmp_path / "cache")),
                   TokenizerConfig(vocab_size=vocab), progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreparedData, Path, Path]:
    """A 28-document world, a base run (untrained weights of its tokenizer) and its pairs."""
    tmp = tmp_path_factory.mktemp("sbp")
    store = _store(tmp, "world", 400)
    base = _run_dir(tmp / "base", store)
    cfg = PairsConfig(embed=EmbedConfig(store=str(store.path), model=f"run:{base}", cache_dir=str(tmp / "emb"),
                                        progress=False, device="cpu"), k=3, alpha=-1.0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbedWarning)
        out = pairs(cfg)
    return store, base, out


def test_side_budgets_fill_one_padded_window() -> None:
    for seq_len, share in ((256, 0.5), (256, 0.25), (1024, 0.75), (300, 0.33)):
        d1, d2 = side_budgets(seq_len, share)
        assert d1 + 1 + d2 + 1 == seq_len + 1 and d1 == int(share * seq_len) - 1
    with pytest.raises(DataeffError, match="at least 256 tokens"):
        side_budgets(4, 0.25)


def test_pair_corpus_cuts_each_side_and_uses_both_directions(world: tuple[PreparedData, Path, Path], tmp_path: Path) -> None:
    store, _, pairs_dir = world
    tok = store.tokenizer
    out = tmp_path / "c.jsonl"
    info = pair_corpus(pairs_dir, tok, SEQ_LEN, 0.5, out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    d1_max, d2_max = side_budgets(SEQ_LEN, 0.5)
    assert info["records"] == len(records) and info["prompt_tokens"] == d1_max
    assert all(len(tok.encode(r["d1"])) <= d1_max and len(tok.encode(r["d2"])) <= d2_max for r in records)
    directed = {(r["i"], r["j"]) for r in records}
    assert len(directed) == len(records) and all((j, i) in directed for i, j in directed)
    one_way = pair_corpus(pairs_dir, tok, SEQ_LEN, 0.5, tmp_path / "one.jsonl", both_directions=False, max_pairs=5)
    assert one_way["records"] == 5 and one_way["pairs"] == 5
    # Some documents are longer than a side: they are cut, at a token boundary, to a prefix of themselves.
    long = next(r for r in records if len(tok.encode(r["d2"])) == d2_max)
    assert long["d2"] and truncate(long["d2"] + " w1 w2 w3", tok, d2_max) == long["d2"]


def test_synthesizer_trains_on_d2_only_from_the_base(world: tuple[PreparedData, Path, Path], tmp_path: Path) -> None:
    _, base, pairs_dir = world
    run = RunConfig(run_dir=str(tmp_path / "synth"), train=TrainConfig(epochs=1, batch_tokens=4 * SEQ_LEN,
                                                                       progress=False, eval_tokens=256))
    cfg = SynthesizerConfig(base=str(base), pairs=str(pairs_dir), run=run, corpus=str(tmp_path / "c.jsonl"))
    rc = synthesizer_run(cfg, tmp_path / "c.jsonl")
    assert rc.train.init_from == str(base) and rc.train.shuffle == "padded" and rc.data.prompt_field == "d1"
    assert rc.tokenizer.path == str(base / "tokenizer.json") and rc.model.seq_len == SEQ_LEN
    result = train_synthesizer(cfg)
    assert Path(result["run_dir"]) == tmp_path / "synth" and np.isfinite(result["val_loss"])
    manifest = json.loads((tmp_path / "synth" / "manifest.json").read_text())
    assert manifest["init"]["from"] == str(base)
    split = prepare(rc.data, rc.tokenizer, progress=False).split("train")
    # The loss mask: every d1 and its separator is off; every d2 and its end token counts.
    assert split.mask is not None and 0 < split.mask.mean() < 1


def test_synthesize_samples_dedups_resumes_and_writes_the_corpus(world: tuple[PreparedData, Path, Path],
                                                                  tmp_path: Path) -> None:
    store, base, _ = world
    cfg = SynthesizeConfig(synthesizer=str(base), store=str(store.path), tokens=300, samples_per_seed=2,
                           shard_size=8, max_tokens=20, batch_size=8, out=str(tmp_path / "s"), progress=False,
                           device="cpu", dtype="fp32")
    summary = synthesize(cfg)
    records = [json.loads(line) for line in (tmp_path / "s" / OUTPUT).read_text().splitlines()]
    assert summary["tokens"] >= 300 and summary["documents"] == len(records)
    assert all(set(r) == {"text", "seed", "seed_text"} for r in records)
    # Fewer draws than documents: no seed is drawn twice before every document was drawn once.
    assert summary["sampled"] <= store.split("train").n_docs and len({r["seed"] for r in records}) == len(records)
    texts = [r["text"] for r in records]
    world_texts = [r["seed_text"] for r in records]
    found = NearDup(cfg.dedup).find(texts, against=world_texts, progress=False)
    assert not found.drop  # nothing left that dedup would drop
    # A killed job: the last shard and the corpus are gone; the rerun rebuilds exactly what was there.
    shards = sorted((tmp_path / "s").glob("shard_*.jsonl"))
    before = (tmp_path / "s" / OUTPUT).read_text()
    for p in (tmp_path / "s" / OUTPUT, tmp_path / "s" / "synthesize.json", shards[-1], shards[-1].with_suffix(".json")):
        p.unlink()
    assert synthesize(cfg)["tokens"] == summary["tokens"] and (tmp_path / "s" / OUTPUT).read_text() == before
    # The corpus is a synthetic corpus a run reads.
    data = DataConfig(corpus=str(store.meta["data"]["corpus"]), val_docs=2, cache_dir=str(tmp_path / "cache2"),
                      synthetic=str(tmp_path / "s" / OUTPUT), synthetic_share=0.2, synthetic_schedule="once")
    assert prepare(data, TokenizerConfig(vocab_size=400), progress=False).split("synthetic").n_docs == len(records)


def test_synthesize_refuses_a_target_beyond_the_seeds_and_another_tokenizer(
        world: tuple[PreparedData, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, base, _ = world
    n = store.split("train").n_docs
    most = capacity(n, 2, 20)
    args = ["synthesize", str(base), f"store={store.path}", "samples_per_seed=2", "max_tokens=20",
            f"out={tmp_path / 'x'}", "progress=false"]
    assert main([*args, f"tokens={most + 1}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"synthesize.tokens={most + 1} is more than the {n} seed documents" in err and f"= {most}" in err
    assert not (tmp_path / "x").exists()
    other = _run_dir(tmp_path / "other", _store(tmp_path, "other", 300))
    assert main(["synthesize", str(other), f"store={store.path}", "tokens=10", f"out={tmp_path / 'y'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "synthesize.synthesizer=" in err and "its tokenizer" in err and "differs from the world's" in err
    assert not (tmp_path / "y").exists()
    with pytest.raises(DataeffError, match="exceeds the synthesizer's context of 64; set slide=true"):
        synthesize(SynthesizeConfig(synthesizer=str(base), store=str(store.path), tokens=10, max_tokens=60,
                                    out=str(tmp_path / "z")))
