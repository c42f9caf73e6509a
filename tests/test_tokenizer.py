from __future__ import annotations

import json

import pytest
import tokenizers
from tokenizers import models

from dataeff.errors import DataeffError
from dataeff.tokenizer import Tokenizer, TokenizerConfig, build_tokenizer, train_bpe, train_word


@pytest.fixture
def docs(small_corpus) -> list[str]:
    return small_corpus.read_text(encoding="utf-8").strip().split("\n\n")


@pytest.fixture
def bpe(docs) -> Tokenizer:
    return train_bpe(docs, vocab_size=320)


@pytest.mark.parametrize(
    "text",
    [
        "the cat sat on the big red house.",
        "  leading and trailing spaces  ",
        "unseen words: zyzzyva, Quixotic! 12345",
        "tabs\tand\nnewlines\n\n\nand\r\ncarriage returns",
        "ünïcödé — “quotes”, 中文, emoji 🙂👍🏽",
        "<|endoftext|> in the middle <|endoftext|>",
        "",
    ],
)
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_has_the_asked_vocab_and_an_eos(bpe):
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 320
    assert bpe.encode("<|endoftext|>") == [bpe.eos_id]
    assert bpe.decode([bpe.eos_id]) == "<|endoftext|>"
    # Merges were learned: common words are single tokens, so text is shorter than its bytes.
    assert len(bpe.encode(" the cat")) < len(" the cat")


def test_encode_batch_matches_encode(bpe, docs):
    assert bpe.encode_batch(docs[:20]) == [bpe.encode(d) for d in docs[:20]]


def test_bpe_vocab_larger_than_data_supports_says_how_many(docs):
    with pytest.raises(DataeffError) as e:
        train_bpe(docs, vocab_size=5000)
    message = str(e.value)
    assert "\n" not in message and "5000" in message
    supported = int(message.rsplit("<= ", 1)[1])
    assert 257 < supported < 5000
    assert train_bpe(docs, vocab_size=supported).vocab_size == supported


def test_bpe_vocab_below_the_byte_alphabet_is_refused(docs):
    with pytest.raises(DataeffError, match="257"):
        train_bpe(docs, vocab_size=100)


def test_training_is_deterministic_and_sha_tracks_content(docs, bpe):
    assert train_bpe(docs, vocab_size=320).sha256 == bpe.sha256
    assert train_bpe(docs, vocab_size=300).sha256 != bpe.sha256


def test_save_and_load_round_trip(tmp_path, bpe):
    path = tmp_path / "tok" / "tokenizer.json"
    bpe.save(path)
    loaded = Tokenizer.load(path)
    assert (loaded.sha256, loaded.kind, loaded.vocab_size, loaded.eos_id) == (bpe.sha256, "bpe", 320, bpe.eos_id)
    text = "the dog ran under the blue tree 🙂"
    assert loaded.encode(text) == bpe.encode(text)


def test_load_refuses_bad_files(tmp_path):
    with pytest.raises(DataeffError, match="no such tokenizer file"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataeffError, match=r"not a valid tokenizer\.json"):
        Tokenizer.load(bad)
    no_eos = tmp_path / "no_eos.json"
    no_eos.write_text(tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str())
    with pytest.raises(DataeffError) as e:
        Tokenizer.load(no_eos)
    assert str(no_eos) in str(e.value) and "end-of-document" in str(e.value)


def test_word_level_keeps_the_most_frequent_words_and_maps_the_rest_to_unk():
    docs = ["b a a c", "a b <unk> d d d", "e"]  # counts: a 3, d 3, b 2, c 1, e 1
    tok = train_word(docs, vocab_size=5, min_frequency=1)
    assert tok.kind == "word" and tok.vocab_size == 5
    unk = tok.hf.token_to_id("<unk>")
    ids = tok.encode("a d b c <unk> zzz")
    assert ids[:3] == [2, 3, 4]  # frequency order, ties alphabetical
    assert ids[3:] == [unk, unk, unk]
    assert tok.decode(tok.encode("a  b\n d")) == "a b d"
    assert tok.decode([tok.eos_id]) == "<eos>"


def test_word_level_is_one_token_per_whitespace_word_and_drops_rare_words():
    docs = ["x y", "x y", "z", "glued<unk>word <eos>"]
    tok = train_word(docs, vocab_size=100, min_frequency=2)
    assert tok.vocab_size == 4  # <unk>, <eos>, x, y: z and glued<unk>word occur once
    text = "x z  glued<unk>word\ty <eos>"
    assert len(tok.encode(text)) == len(text.split())
    assert tok.encode("<eos>") == [tok.eos_id]


def test_word_level_vocab_is_capped_by_the_data_not_refused():
    tok = train_word(["one two three"], vocab_size=1000, min_frequency=1)
    assert tok.vocab_size == 5


def test_build_tokenizer_dispatches_on_kind(tmp_path, docs, bpe):
    assert build_tokenizer(TokenizerConfig(kind="auto", vocab_size=320), docs).sha256 == bpe.sha256
    assert build_tokenizer(TokenizerConfig(kind="auto", vocab_size=320), docs, default_kind="word").kind == "word"
    with pytest.raises(DataeffError, match=r"tokenizer\.path"):
        build_tokenizer(TokenizerConfig(kind="file"), docs)
    bpe.save(tmp_path / "t.json")
    loaded = build_tokenizer(TokenizerConfig(kind="file", path=str(tmp_path / "t.json"), vocab_size=9999), docs)
    assert loaded.sha256 == bpe.sha256


def test_sha256_ignores_json_formatting(tmp_path, bpe):
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(json.loads(bpe.hf.to_str()), indent=4), encoding="utf-8")
    assert Tokenizer.load(pretty).sha256 == bpe.sha256
