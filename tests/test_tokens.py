from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

import dataeff.tokens
from dataeff.data import DataConfig
from dataeff.errors import DataeffError
from dataeff.tokenizer import Tokenizer, TokenizerConfig
from dataeff.tokens import COMPLETE_MARKER, LOCKS, load_prepared, prepare, token_dtype, tokenize_file

BPE = TokenizerConfig(kind="bpe", vocab_size=300)
WORD = TokenizerConfig(kind="word", vocab_size=1000, min_frequency=1)


def _data(corpus: Path, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(corpus=str(corpus), cache_dir=str(tmp_path / "cache"), **kw)


def _docs_of(split) -> list[np.ndarray]:
    o = split.doc_offsets
    return [np.asarray(split.tokens[o[i] : o[i + 1]]) for i in range(len(o) - 1)]


# ---------------------------------------------------------------------------------------------------------
# layout


def test_store_layout_and_counts(small_corpus, tmp_path):
    data = _data(small_corpus, tmp_path, val_docs=20)
    prepared = prepare(data, BPE, progress=False)
    assert prepared.path.parent == tmp_path / "cache" and prepared.path.name.startswith("small-")
    for name in ("tokenizer.json", "meta.json", "train.bin", "train.docs.npy", "val.bin", "val.docs.npy", COMPLETE_MARKER):
        assert (prepared.path / name).exists()
    meta, tok = prepared.meta, prepared.tokenizer
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size == 300
    assert meta["eos_id"] == tok.eos_id and meta["tokenizer_sha256"] == tok.sha256 and meta["kind"] == "bpe"
    assert meta["data"]["corpus"] == str(small_corpus) and meta["tokenizer"]["vocab_size"] == 300
    assert 0 < meta["unigram_entropy"] < np.log(300)
    assert prepared.splits == ["train", "val"]

    from dataeff.data import load_documents

    texts = load_documents(data)
    for name in prepared.splits:
        split = prepared.split(name)
        assert split.name == name and split.tokens.dtype == np.uint16 and not split.tokens.flags.writeable
        assert (prepared.path / f"{name}.bin").stat().st_size == 2 * split.n_tokens
        offsets = split.doc_offsets
        assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == split.n_tokens
        assert split.n_docs == len(texts[name]) == meta["splits"][name]["n_docs"]
        # Every document is its own tokens followed by EOS, in order.
        for doc_tokens, text in zip(_docs_of(split), texts[name], strict=True):
            assert doc_tokens[-1] == tok.eos_id
            assert tok.decode(doc_tokens[:-1].tolist()) == text
        assert split.n_bytes == sum(len(t.encode()) for t in texts[name]) == meta["splits"][name]["n_bytes"]
        assert split.n_words == sum(len(t.split()) + 1 for t in texts[name])


def test_unigram_entropy_matches_the_train_tokens(small_corpus, tmp_path):
    prepared = prepare(_data(small_corpus, tmp_path), BPE, progress=False)
    tokens = np.asarray(prepared.split("train").tokens)
    p = np.bincount(tokens) / len(tokens)
    p = p[p > 0]
    assert prepared.meta["unigram_entropy"] == pytest.approx(float(-(p * np.log(p)).sum()))


def test_tokenizer_is_trained_on_the_training_split_only(small_corpus, tmp_path):
    val = tmp_path / "val.txt"
    val.write_text("\n\n".join(["zyzzyva zyzzyva zyzzyva"] * 50), encoding="utf-8")
    prepared = prepare(_data(small_corpus, tmp_path, val_split=str(val)), BPE, progress=False)
    vocab = prepared.tokenizer.hf.get_vocab()
    assert not any("zz" in token for token in vocab)
    assert prepared.split("val").n_docs == 50


def test_word_level_store_has_one_token_per_word(small_corpus, tmp_path):
    prepared = prepare(_data(small_corpus, tmp_path), WORD, progress=False)
    for name in prepared.splits:
        split = prepared.split(name)
        assert split.n_words == split.n_tokens


def test_unknown_split_and_incomplete_store_are_refused(small_corpus, tmp_path):
    prepared = prepare(_data(small_corpus, tmp_path), BPE, progress=False)
    with pytest.raises(DataeffError, match="no split 'test'"):
        prepared.split("test")
    (prepared.path / COMPLETE_MARKER).unlink()
    with pytest.raises(DataeffError, match="not a complete token store"):
        load_prepared(prepared.path)


# ---------------------------------------------------------------------------------------------------------
# token budget


def test_budget_is_exact_nested_and_seeded(small_corpus, tmp_path):
    full = prepare(_data(small_corpus, tmp_path), BPE, progress=False).split("train")
    worlds = {d: prepare(_data(small_corpus, tmp_path, train_tokens=d), BPE, progress=False) for d in (500, 1234, 3000)}
    for d, prepared in worlds.items():
        split = prepared.split("train")
        assert split.n_tokens == d and split.doc_offsets[-1] == d
        assert prepared.tokenizer.sha256 == worlds[500].tokenizer.sha256  # one tokenizer for every world
        assert 0 < split.n_bytes < full.n_bytes and 0 < split.n_words < full.n_words
        # The val split does not depend on the budget.
        assert np.array_equal(prepared.split("val").tokens, worlds[500].split("val").tokens)
    small, mid, big = (np.asarray(worlds[d].split("train").tokens) for d in (500, 1234, 3000))
    assert np.array_equal(big[:1234], mid) and np.array_equal(mid[:500], small)

    # Whole documents (shuffled), then one cut: every document but the last ends with EOS.
    eos = worlds[1234].tokenizer.eos_id
    docs = _docs_of(worlds[1234].split("train"))
    assert all(d[-1] == eos for d in docs[:-1])
    assert len(docs[-1]) <= max(len(d) for d in _docs_of(full))

    again = prepare(_data(small_corpus, tmp_path / "elsewhere", train_tokens=1234), BPE, progress=False)
    assert np.array_equal(again.split("train").tokens, mid)
    other_seed = prepare(_data(small_corpus, tmp_path, train_tokens=1234, budget_seed=1), BPE, progress=False)
    assert not np.array_equal(other_seed.split("train").tokens, mid)
    assert other_seed.path != worlds[1234].path


def test_budget_counts_a_cut_document_in_proportion(small_corpus, tmp_path):
    # With a word-level tokenizer every token is a word, so the cut document's share is exact.
    for d in (7, 777, 1001):
        split = prepare(_data(small_corpus, tmp_path, train_tokens=d), WORD, progress=False).split("train")
        assert split.n_tokens == split.n_words == d


def test_budget_of_the_whole_split_keeps_every_token(small_corpus, tmp_path):
    full = prepare(_data(small_corpus, tmp_path), BPE, progress=False).split("train")
    exact = prepare(_data(small_corpus, tmp_path, train_tokens=full.n_tokens), BPE, progress=False).split("train")
    assert exact.n_tokens == full.n_tokens and exact.n_docs == full.n_docs
    assert (exact.n_bytes, exact.n_words) == (full.n_bytes, full.n_words)


def test_budget_beyond_the_corpus_is_refused_with_its_size(small_corpus, tmp_path):
    full = prepare(_data(small_corpus, tmp_path), BPE, progress=False).split("train")
    with pytest.raises(DataeffError) as e:
        prepare(_data(small_corpus, tmp_path, train_tokens=full.n_tokens + 1), BPE, progress=False)
    assert "\n" not in str(e.value) and f"{full.n_tokens} tokens" in str(e.value)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".") and p.name != LOCKS]  # no leftovers


# ---------------------------------------------------------------------------------------------------------
# content addressing and crash safety


def test_second_prepare_reuses_the_store_without_reading_the_corpus(small_corpus, tmp_path, monkeypatch):
    data = _data(small_corpus, tmp_path)
    first = prepare(data, BPE, progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr(dataeff.tokens, "load_documents", fail)
    second = prepare(data, BPE, progress=False)
    assert second.path == first.path and second.meta == first.meta
    assert load_prepared(first.path).meta == first.meta


def test_store_path_follows_what_changes_the_tokens(small_corpus, tmp_path):
    base = prepare(_data(small_corpus, tmp_path), BPE, progress=False).path
    assert prepare(_data(small_corpus, tmp_path), TokenizerConfig(kind="bpe", vocab_size=310), progress=False).path != base
    assert prepare(_data(small_corpus, tmp_path, split_seed=1), BPE, progress=False).path != base
    # The cache directory is where the store lives, not part of its name.
    assert prepare(_data(small_corpus, tmp_path / "other"), BPE, progress=False).path.name == base.name
    small_corpus.write_text(small_corpus.read_text(encoding="utf-8") + "\n\nan extra document.\n", encoding="utf-8")
    assert prepare(_data(small_corpus, tmp_path), BPE, progress=False).path != base


def test_a_crash_mid_build_leaves_nothing_that_looks_complete(small_corpus, tmp_path, monkeypatch):
    data = _data(small_corpus, tmp_path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataeff.tokens, "unigram_entropy", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(data, BPE, progress=False)
    stores = [p for p in (tmp_path / "cache").iterdir() if p.name not in ("tokenizers", LOCKS)]
    assert stores == []
    monkeypatch.undo()
    assert (prepare(data, BPE, progress=False).path / COMPLETE_MARKER).exists()


# ---------------------------------------------------------------------------------------------------------
# dtypes, file tokenizers, evaluation files


def test_token_dtype_boundary():
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32


def test_large_vocab_store_uses_uint32(tmp_path):
    words = [f"w{i}" for i in range(70_000)]
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_path = tmp_path / "big.json"
    Tokenizer(hf).save(tok_path)
    corpus = tmp_path / "c.txt"
    corpus.write_text("w69999 w1 w40000\n\nw65535 w65536\n\nw3", encoding="utf-8")
    prepared = prepare(_data(corpus, tmp_path, val_docs=1), TokenizerConfig(kind="file", path=str(tok_path)), progress=False)
    assert prepared.meta["dtype"] == "uint32" and prepared.meta["kind"] == "word"
    tokens = np.concatenate([prepared.split("train").tokens, prepared.split("val").tokens])
    assert tokens.dtype == np.uint32 and int(tokens.max()) == 70_001  # w69999: above uint16, not wrapped
    assert sorted(tokens.tolist()) == sorted([70_001, 3, 40_002, 1, 65_537, 65_538, 1, 5, 1])


def test_tokenize_file_uses_the_store_tokenizer(small_corpus, tmp_path):
    prepared = prepare(_data(small_corpus, tmp_path), BPE, progress=False)
    other = tmp_path / "eval.txt"
    texts = ["the girl found a red stone.", "a boy ran ünder the tree 🙂"]
    other.write_text("\n\n".join(texts), encoding="utf-8")
    split = tokenize_file(prepared, other)
    tok = prepared.tokenizer
    expected = [*tok.encode(texts[0]), tok.eos_id, *tok.encode(texts[1]), tok.eos_id]
    assert split.tokens.tolist() == expected and split.tokens.dtype == np.uint16
    assert split.doc_offsets.tolist() == [0, len(tok.encode(texts[0])) + 1, len(expected)]
    assert split.n_bytes == sum(len(t.encode()) for t in texts) and split.n_words == 6 + 7 + 2
    assert tokenize_file(prepared, other, separator="line").n_docs == 2


# ---------------------------------------------------------------------------------------------------------
# real corpora


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory) -> str:
    value = os.environ.get("DATAEFF_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("DATAEFF_DATA_DIR is not set to the shared data directory")
    return str(tmp_path_factory.mktemp("real-cache"))


@pytest.mark.data
def test_tinystories_store(real_cache):
    prepared = prepare(DataConfig(corpus="tinystories", cache_dir=real_cache), TokenizerConfig(), progress=False)
    assert prepared.meta["kind"] == "bpe" and prepared.tokenizer.vocab_size == 4096
    train = prepared.split("train")
    assert train.n_docs == 2316
    assert prepared.tokenizer.decode(_docs_of(train)[0][:-1].tolist()).startswith("One day, a little girl named Lily")
    world = prepare(DataConfig(corpus="tinystories", cache_dir=real_cache, train_tokens=100_000), TokenizerConfig(), progress=False)
    assert world.split("train").n_tokens == 100_000 and world.tokenizer.sha256 == prepared.tokenizer.sha256


@pytest.mark.data
def test_wikitext2_word_level_counts_and_no_oov(real_cache):
    data_dir = Path(os.environ["DATAEFF_DATA_DIR"]) / "wikitext-2"
    prepared = prepare(DataConfig(corpus="wikitext2", cache_dir=real_cache), TokenizerConfig(vocab_size=33278), progress=False)
    assert prepared.meta["kind"] == "word" and prepared.tokenizer.vocab_size == 33278
    unk = prepared.tokenizer.hf.token_to_id("<unk>")
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        lines = (data_dir / f"{name}.txt").read_text(encoding="utf-8").split("\n")
        words = sum(len(line.split()) for line in lines)
        docs = sum(1 for line in lines if line.strip())
        tokens = prepared.split(split)
        assert tokens.n_tokens == tokens.n_words == words + docs
        # Every word of the held-out text is in the vocabulary: the only <unk> are the corpus's own.
        assert int((np.asarray(tokens.tokens) == unk).sum()) == sum(line.split().count("<unk>") for line in lines)
