"""dataeff embed: vectors equal sentence-transformers' own, shards resume, foreign caches are refused."""

from __future__ import annotations

import json
import multiprocessing
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from dataeff.cli import main
from dataeff.config import to_dict
from dataeff.data.config import DataConfig, TokenizerConfig
from dataeff.data.tokens import PreparedData, load_prepared, prepare
from dataeff.errors import DataeffError
from dataeff.model.config import ModelConfig
from dataeff.model.transformer import Transformer
from dataeff.synth import embed as embed_mod
from dataeff.synth.embed import (
    EmbedConfig,
    EmbedWarning,
    document_text,
    embed,
    embed_shard,
    load_embeddings,
    load_encoder,
    plan_shards,
    resolve_model,
)
from dataeff.train.checkpoint import save_weights

_WORDS = ["the", "cat", "dog", "sat", "ran", "on", "under", "big", "small", "red", "blue", "house", "tree", "river", "stone", "happy", "sad", "girl", "boy", "found", "played", "with", "her", "his", "friend", "garden", "morning", "night", "little", "very"]


def _corpus(path: Path, n: int, seed: int) -> Path:
    """Short and long documents (some past any small window), one too short to pair, and one long unbroken
    string that has no whitespace to cut at."""
    rng = np.random.default_rng(seed)
    docs = [" ".join(rng.choice(_WORDS, size=int(rng.integers(10, 120)))) + "." for _ in range(n)]
    docs[3] = "tiny one"
    docs[5] = "x" * 600
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def _store(tmp: Path, n: int = 60, seed: int = 0) -> PreparedData:
    tmp.mkdir(parents=True, exist_ok=True)
    corpus = _corpus(tmp / f"corpus{seed}.txt", n, seed)
    data = DataConfig(corpus=str(corpus), val_docs=4, cache_dir=str(tmp / "cache"))
    return prepare(data, TokenizerConfig(vocab_size=300), progress=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    return _store(tmp_path_factory.mktemp("store"))


def _cfg(store: PreparedData, tmp: Path, **kw: object) -> EmbedConfig:
    base = {"store": str(store.path), "max_tokens": 24, "shard_size": 16, "batch_size": 8, "cache_dir": str(tmp / "emb"),
            "progress": False, "device": "cpu"}
    return EmbedConfig(**{**base, **kw})  # type: ignore[arg-type]


def _texts(store: PreparedData, split: str = "train") -> list[str]:
    s = store.split(split)
    return [document_text(s, store.tokenizer, i) for i in range(s.n_docs)]


def _run_dir(path: Path, store: PreparedData, seed: int = 0) -> Path:
    """A tiny dataeff run (random weights) over the store's tokenizer: a cheap second embedding model."""
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=64, vocab_size=store.tokenizer.vocab_size).resolved()
    torch.manual_seed(seed)
    model = Transformer(cfg, init_seed=seed)
    path.mkdir(parents=True)
    store.tokenizer.save(path / "tokenizer.json")
    (path / "manifest.json").write_text(json.dumps({"model": to_dict(cfg)}))
    save_weights(path / "model.safetensors", model, {"model": to_dict(cfg)})
    return path


def test_packaged_model_vectors_are_unit_and_equal_sentence_transformers(tmp_path: Path) -> None:
    store = _store(tmp_path / "small", n=24)
    cfg = _cfg(store, tmp_path)
    with pytest.warns(EmbedWarning) as caught:
        e = embed(cfg)
    x = np.asarray(e, dtype=np.float32)
    texts = _texts(store)
    assert x.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)

    # The reference: sentence-transformers on the whole texts, truncating them itself.
    st = load_encoder(resolve_model(cfg.model), "cpu").model  # type: ignore[attr-defined]
    st.max_seq_length = 24
    reference = st.encode(texts, batch_size=8, normalize_embeddings=True)
    assert np.abs(x - reference).max() < 1e-3
    # Indexing by document agrees with the whole matrix.
    np.testing.assert_array_equal(e[[7, 2]], np.asarray(e)[[7, 2]])

    lengths = [len(ids) for ids in st.tokenizer(texts)["input_ids"]]
    np.testing.assert_array_equal(e.truncated, np.asarray(lengths) > 24)
    assert 0 < e.truncated.sum() < len(texts)
    np.testing.assert_array_equal(e.n_words, [len(t.split()) for t in texts])
    message = str(caught[0].message)
    assert f"{int(e.truncated.sum())} are longer than the 24-token window" in message
    assert f"{int((e.n_words < 8).sum())} have fewer than min_words=8" in message
    assert len([w for w in caught if w.category is EmbedWarning]) == 1


def test_rows_are_sorted_longest_first_and_any_split_embeds(store: PreparedData, tmp_path: Path) -> None:
    with pytest.warns(EmbedWarning, match="of 4 documents, 4 are longer than the 24-token window"):
        e = embed(_cfg(store, tmp_path, split="val", model=f"run:{_run_dir(tmp_path / 'run', store)}"))
    lengths = np.diff(store.split("val").doc_offsets)
    assert len(e) == store.split("val").n_docs
    assert list(lengths[e.order]) == sorted(lengths, reverse=True)
    with pytest.raises(DataeffError, match="'nope' is not in the token store"):
        plan_shards(_cfg(store, tmp_path, split="nope"))


def test_run_model_is_its_mean_pooled_final_hidden_state(store: PreparedData, tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run", store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbedWarning)
        e = embed(_cfg(store, tmp_path, model=f"run:{run}", max_tokens=16))
    from dataeff.train.rundir import load_model

    model = load_model(run)
    for doc in (0, 1, 4):
        ids = store.tokenizer.encode(_texts(store)[doc])[:16]
        with torch.no_grad():
            v = model.hidden(torch.tensor([ids]))[0].mean(0)
        v = (v / v.norm()).numpy()
        assert np.abs(e[doc].astype(np.float32) - v).max() < 1e-3


def test_resume_after_a_kill_recomputes_nothing_finished(store: PreparedData, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(store, tmp_path, model=f"run:{_run_dir(tmp_path / 'run', store)}", out=str(tmp_path / "killed"))
    plan = plan_shards(cfg)
    assert plan.n_shards >= 3
    real = embed_mod._compute_shard

    def killed_at_2(plan_: embed_mod.ShardPlan, i: int, *args: object, **kw: object) -> None:
        if i == 2:
            raise KeyboardInterrupt
        real(plan_, i, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(embed_mod, "_compute_shard", killed_at_2)
    with pytest.raises(KeyboardInterrupt):
        embed(cfg)
    assert [plan.finished(i) for i in range(plan.n_shards)][:3] == [True, True, False]
    with pytest.raises(DataeffError, match=rf"{plan.n_shards - 2} of {plan.n_shards} shards missing"):
        load_embeddings(plan.directory)
    stamps = {i: plan.shard_path(i).stat().st_mtime_ns for i in (0, 1)}

    computed: list[int] = []

    def counting(plan_: embed_mod.ShardPlan, i: int, *args: object, **kw: object) -> None:
        computed.append(i)
        real(plan_, i, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(embed_mod, "_compute_shard", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbedWarning)
        resumed = embed(cfg)
        fresh = embed(_cfg(store, tmp_path, model=cfg.model, out=str(tmp_path / "fresh")))
    assert computed[: plan.n_shards - 2] == list(range(2, plan.n_shards))
    assert {i: plan.shard_path(i).stat().st_mtime_ns for i in (0, 1)} == stamps
    np.testing.assert_array_equal(np.asarray(resumed), np.asarray(fresh))
    assert not list(plan.directory.glob(".*.tmp"))


def test_a_cache_of_another_model_or_store_is_refused_naming_both(store: PreparedData, tmp_path: Path) -> None:
    out = str(tmp_path / "emb")
    run = _run_dir(tmp_path / "run", store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbedWarning)
        embed(_cfg(store, tmp_path, model=f"run:{run}", out=out))
    sha = resolve_model(f"run:{run}").sha256[:12]
    with pytest.raises(DataeffError) as err:
        plan_shards(_cfg(store, tmp_path, out=out))
    assert f"run:{run.resolve()} (sha256 {sha})" in str(err.value)
    assert f"all-MiniLM-L6-v2 (sha256 {resolve_model('all-MiniLM-L6-v2').sha256[:12]})" in str(err.value)

    other = _store(tmp_path / "other", seed=1)
    with pytest.raises(DataeffError) as err:
        plan_shards(_cfg(other, tmp_path, model=f"run:{run}", out=out))
    assert f"{store.path.name}/train" in str(err.value) and f"{other.path.name}/train" in str(err.value)


def test_a_changed_model_file_changes_the_identity(store: PreparedData, tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run", store)
    before = resolve_model(f"run:{run}").sha256
    model = Transformer(ModelConfig(**json.loads((run / "manifest.json").read_text())["model"]), init_seed=1)
    save_weights(run / "model.safetensors", model)
    assert resolve_model(f"run:{run}").sha256 != before
    with pytest.raises(DataeffError, match="not a local directory, not in the Hugging Face cache"):
        resolve_model("no-such-org/no-such-model")


@pytest.mark.slow  # two spawned workers each import torch
def test_shards_computed_by_two_processes_equal_one_process(store: PreparedData, tmp_path: Path) -> None:
    cfg = _cfg(store, tmp_path, model=f"run:{_run_dir(tmp_path / 'run', store)}", out=str(tmp_path / "parallel"))
    plan = plan_shards(cfg)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        paths = list(pool.map(embed_shard, [cfg] * plan.n_shards, range(plan.n_shards)))
    assert paths == [plan.shard_path(i) for i in range(plan.n_shards)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbedWarning)
        one = embed(_cfg(store, tmp_path, model=cfg.model, out=str(tmp_path / "serial")))
    np.testing.assert_array_equal(np.asarray(load_embeddings(plan.directory)), np.asarray(one))


def test_window_beyond_the_model_and_cli(store: PreparedData, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_dir(tmp_path / "run", store)
    with pytest.raises(DataeffError, match="max_tokens=65 exceeds the 64 tokens"):
        plan_shards(_cfg(store, tmp_path, model=f"run:{run}", max_tokens=65))
    code = main(["embed", str(store.path), f"model=run:{run}", f"cache_dir={tmp_path / 'c'}", "progress=false"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_docs"] == store.split("train").n_docs and out["dim"] == 32
    assert load_embeddings(out["embeddings"]).manifest["store"]["name"] == load_prepared(store.path).path.name


def test_a_malformed_shard_is_refused(store: PreparedData, tmp_path: Path) -> None:
    cfg = _cfg(store, tmp_path, model=f"run:{_run_dir(tmp_path / 'run', store)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbedWarning)
        e = embed(cfg)
    np.save(e.directory / "shard_00001.npy", np.zeros((3, 32), dtype=np.float32))
    with pytest.raises(DataeffError, match=r"shard_00001.npy: holds float32 \(3, 32\), expected float16 with 16 rows"):
        load_embeddings(e.directory)
