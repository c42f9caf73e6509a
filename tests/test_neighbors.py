"""dataeff pairs: faiss search against brute force, the alpha and near-duplicate filters, the output files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
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
from dataeff.synth.embed import EmbedConfig, EmbedWarning, embed
from dataeff.synth.neighbors import (
    PairsConfig,
    TextDuplicates,
    choose_index,
    find_pairs,
    knn_faiss,
    knn_numpy,
    pairs,
    read_pairs,
)
from dataeff.train.checkpoint import save_weights


def _clustered(n: int, d: int, clusters: int, noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)) * noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _recall(truth: np.ndarray, found: np.ndarray) -> float:
    return sum(len(np.intersect1d(t, f)) for t, f in zip(truth, found, strict=True)) / truth.size


def test_numpy_reference_is_the_exact_top_k_without_self() -> None:
    x = _clustered(60, 8, 4, 0.3)
    x[10] = x[11]  # an exact duplicate: each is the other's nearest, and neither is its own neighbour
    sims, ids = knn_numpy(x, 5, block=7)
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    for q in range(len(x)):
        best = np.argsort(-full[q], kind="stable")[:5]
        np.testing.assert_allclose(sims[q], full[q, best], rtol=1e-6)
        assert set(ids[q]) == set(best) and q not in ids[q]
    assert ids[10, 0] == 11 and ids[11, 0] == 10
    assert np.all(np.diff(sims, axis=1) <= 0)


def test_faiss_exact_index_equals_numpy_brute_force() -> None:
    x = _clustered(800, 32, 20, 0.2)
    sims, ids, info = knn_faiss(x, PairsConfig(k=7, index="flat"))
    ref_sims, ref_ids = knn_numpy(x, 7)
    assert info["type"] == "flat"
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_recall_on_clustered_data(kind: str) -> None:
    x = _clustered(4000, 32, 50, 0.15, seed=1)
    _, truth = knn_numpy(x, 10)
    _, found, info = knn_faiss(x, PairsConfig(k=10, index=kind, threads=1))  # type: ignore[arg-type]
    assert info["type"] == kind
    assert _recall(truth, found) >= 0.95
    assert not (found == np.arange(len(x))[:, None]).any()


def test_auto_index_is_exact_up_to_the_threshold() -> None:
    cfg = PairsConfig(exact_below=1000)
    assert (choose_index(1000, cfg), choose_index(1001, cfg)) == ("flat", "ivf")
    assert choose_index(10, PairsConfig(index="hnsw")) == "hnsw"


def _unit(*parts: tuple[int, float], d: int = 16) -> np.ndarray:
    v = np.zeros(d, dtype=np.float32)
    for axis, weight in parts:
        v[axis] = weight
    return v / np.linalg.norm(v)


_TEXT = [f"w{i}" for i in range(400)]


def _words(start: int, n: int = 60) -> str:
    return " ".join(_TEXT[start : start + n])


def test_alpha_self_pairs_and_near_duplicates_are_filtered() -> None:
    c = np.sqrt(1 - 0.9**2)
    x = np.stack([
        _unit((0, 1)), _unit((0, 0.9), (1, c)),                        # 0-1: similar, different texts: kept
        _unit((2, 1)), _unit((2, 0.99), (3, np.sqrt(1 - 0.99**2))),    # 2-3: similarity 0.99 > 0.97
        _unit((4, 1)), _unit((4, 0.9), (5, c)),                        # 4-5: similar and the same text
        _unit((6, 1)),                                                 # 6: nothing near it
        _unit((0, 1)),                                                 # 7: a copy of 0, but too short to pair
    ])
    texts = [_words(0), _words(100), _words(200), _words(300), _words(40), _words(40) + " w399", _words(340), "w1 w2"]
    pairable = np.array([True] * 7 + [False])
    columns, stats = find_pairs(x, pairable, PairsConfig(k=2, alpha=0.5, progress=False), texts.__getitem__)
    assert list(zip(columns["i"], columns["j"], strict=True)) == [(0, 1), (1, 0)]
    np.testing.assert_allclose(columns["similarity"], 0.9, atol=1e-6)
    assert columns["rank"].tolist() == [1, 1]
    assert stats["near_duplicates"] == {"similarity": 2, "text": 2}
    assert (stats["n_pairable"], stats["n_docs_with_pair"], stats["n_pairs"], stats["n_mutual_pairs"]) == (7, 2, 2, 2)
    assert sum(stats["neighbour_similarity"]["histogram"]["counts"]) == 7 * 2
    assert stats["index"]["type"] == "flat"


def test_text_duplicates_agree_with_near_dup() -> None:
    rng = np.random.default_rng(0)
    base = [" ".join(rng.choice(_TEXT[:80], size=120)) for _ in range(6)]
    texts = list(base)
    for b in base:  # variants from near copies to unrelated, so verdicts fall on both sides of τ
        for rate in (0.01, 0.03, 0.06, 0.3):
            words = b.split()
            for w in np.flatnonzero(rng.random(len(words)) < rate):
                words[w] = str(rng.choice(_TEXT[80:]))
            texts.append(" ".join(words))
    checker = TextDuplicates(texts.__getitem__, 0.8, 5, 128, 0)
    near_dup = NearDup(threshold=0.8, ngram=5, num_perm=128, seed=0)
    verdicts = [(checker(a, b), near_dup.pair_is_duplicate(texts[a], texts[b]))
                for a in range(len(texts)) for b in range(a + 1, len(texts))]
    assert all(mine == theirs for mine, theirs in verdicts)
    assert 0 < sum(v for v, _ in verdicts) < len(verdicts)


def test_an_alpha_leaving_no_pairs_says_where_the_similarities_are() -> None:
    x = _clustered(300, 16, 10, 0.5)
    best = knn_numpy(x, 1)[0][:, 0]
    with pytest.raises(DataeffError) as err:
        find_pairs(x, np.ones(len(x), dtype=bool), PairsConfig(k=3, alpha=0.99, dup_similarity=1.0, progress=False), str)
    message = str(err.value)
    assert "\n" not in message and "alpha=0.99" in message and "of 300 pairable documents" in message
    assert f"median {np.median(best):.3f}" in message and f"max {best.max():.3f}" in message
    a = float(np.round(np.quantile(best, 0.75), 2))
    assert f"alpha={a:.2f} keeps {int((best > a).sum())}" in message


def test_fewer_pairable_documents_than_k_is_refused() -> None:
    x = _clustered(12, 8, 2, 0.1)
    pairable = np.arange(12) < 4
    with pytest.raises(DataeffError, match=r"k=10 .* more than 10 pairable documents; there are 4 of 12 \(8 have fewer"):
        find_pairs(x, pairable, PairsConfig(k=10, progress=False), str)


# --- the command ---------------------------------------------------------------------------------------


def _run_dir(path: Path, store: PreparedData, seed: int) -> Path:
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=64, vocab_size=store.tokenizer.vocab_size).resolved()
    torch.manual_seed(seed)
    path.mkdir(parents=True)
    store.tokenizer.save(path / "tokenizer.json")
    (path / "manifest.json").write_text(json.dumps({"model": to_dict(cfg)}))
    save_weights(path / "model.safetensors", Transformer(cfg, init_seed=seed))
    return path


@pytest.fixture
def world(tmp_path: Path) -> tuple[PreparedData, EmbedConfig]:
    rng = np.random.default_rng(0)
    topics = [_TEXT[i * 40 : (i + 1) * 40] for i in range(5)]
    docs = [" ".join(rng.choice(topics[t % 5], size=int(rng.integers(20, 50)))) for t in range(40)]
    docs[7] = docs[2] + " w399"  # a near copy
    docs[9] = "too short"
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(docs) + "\n")
    store = prepare(DataConfig(corpus=str(corpus), val_docs=2, cache_dir=str(tmp_path / "cache")),
                    TokenizerConfig(vocab_size=400), progress=False)
    cfg = EmbedConfig(store=str(store.path), model=f"run:{_run_dir(tmp_path / 'run', store, 0)}", shard_size=16,
                      cache_dir=str(tmp_path / "emb"), progress=False, device="cpu")
    return store, cfg


def test_pairs_writes_parquet_stats_and_figure(world: tuple[PreparedData, EmbedConfig], tmp_path: Path) -> None:
    store, embed_cfg = world
    cfg = PairsConfig(embed=embed_cfg, k=4, alpha=0.0, dup_similarity=1.0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbedWarning)
        out = pairs(cfg)
        e = embed(embed_cfg)
    columns, stats = read_pairs(out)
    table = pq.read_table(out / "pairs.parquet")
    assert table.column_names == ["i", "j", "similarity", "rank"]
    assert [str(t) for t in table.schema.types] == ["int64", "int64", "float", "int16"]
    i, j, sim = columns["i"], columns["j"], columns["similarity"]
    assert len(i) == stats["n_pairs"] > 0 and (i != j).all() and (sim > 0.0).all()
    assert list(zip(i, columns["rank"], strict=True)) == sorted(zip(i, columns["rank"], strict=True))
    x = np.asarray(e, dtype=np.float32)
    np.testing.assert_allclose(sim, (x[i] * x[j]).sum(1), atol=1e-5)
    short = np.flatnonzero(e.n_words < embed_cfg.min_words)
    assert len(short) and not np.isin(short, np.concatenate([i, j])).any()
    edges = set(zip(i.tolist(), j.tolist(), strict=True))
    assert stats["n_mutual_pairs"] == sum((b, a) in edges for a, b in edges)
    assert stats["near_duplicates"]["text"] >= 1  # the near copy, if it was among the neighbours; 2 and 7 never pair
    assert (2, 7) not in edges and (7, 2) not in edges
    assert stats["embeddings"]["store"]["name"] == store.path.name
    assert (out / "pair_similarity.png").stat().st_size > 0
    stamp = (out / "pairs.parquet").stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbedWarning)
        again = pairs(cfg)
    assert again == out and (out / "pairs.parquet").stat().st_mtime_ns == stamp


def test_embeddings_of_another_model_are_refused(world: tuple[PreparedData, EmbedConfig], tmp_path: Path) -> None:
    store, embed_cfg = world
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbedWarning)
        made = embed(embed_cfg).directory
    other = f"run:{_run_dir(tmp_path / 'other', store, 1)}"
    cfg = PairsConfig(embed=EmbedConfig(store=embed_cfg.store, model=other), embeddings=str(made), progress=False)
    with pytest.raises(DataeffError) as err:
        pairs(cfg)
    assert embed_cfg.model.removeprefix("run:") in str(err.value) and other.removeprefix("run:") in str(err.value)


def test_pairs_cli(world: tuple[PreparedData, EmbedConfig], capsys: pytest.CaptureFixture[str]) -> None:
    _, embed_cfg = world
    args = [f"embed.{k}={v}" for k, v in (("store", embed_cfg.store), ("model", embed_cfg.model),
                                          ("cache_dir", embed_cfg.cache_dir), ("progress", "false"))]
    assert main(["pairs", *args, "k=100", "progress=false"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("dataeff: error: pairs: k=100 neighbours per document needs more than")
    assert err.count("dataeff: error") == 1 and not [p for p in Path(embed_cfg.cache_dir).rglob("*") if "pairs-" in p.name]
    assert main(["pairs", *args, "k=3", "alpha=0.0", "dup_similarity=1.0", "progress=false"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n_pairs"] > 0
    assert "dataeff: warning: embed: of" in captured.err
