from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataeff.config import from_dict
from dataeff.data import (
    DataConfig,
    corpus_fingerprint,
    default_tokenizer_kind,
    holdout,
    load_documents,
    named_corpus_default_tokenizer,
    split_text,
)
from dataeff.errors import DataeffError


def _docs(path: Path, **kw) -> list[str]:
    """Train + val documents of a file corpus, val held out as one document."""
    cfg = DataConfig(corpus=str(path), val_docs=1, cache_dir=str(path.parent / "cache"), **kw)
    splits = load_documents(cfg)
    assert len(splits["val"]) == 1
    return sorted(splits["train"] + splits["val"])


def _error(excinfo: pytest.ExceptionInfo[DataeffError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------
# txt separators


def test_blank_line_separator_splits_paragraphs_and_drops_whitespace_only_ones(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first doc\nstill first\n\n\nsecond\n \t \n\n   \n\nthird  \n", encoding="utf-8")
    assert _docs(path) == sorted(["first doc\nstill first", "second", "third"])


def test_line_separator_makes_one_document_per_nonempty_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(" a b \n \n\nc\r\nd e f\n", encoding="utf-8")
    assert _docs(path, separator="line") == sorted(["a b", "c", "d e f"])


def test_literal_separator(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("one\n<|endoftext|>\ntwo\nlines\n<|endoftext|>\n  \n<|endoftext|>three", encoding="utf-8")
    assert _docs(path, separator="<|endoftext|>") == sorted(["one", "two\nlines", "three"])


def test_literal_separator_can_drop_a_truncated_tail():
    text = "a<|endoftext|>b<|endoftext|>cut mid-sen"
    assert split_text(text, "<|endoftext|>", drop_tail=True) == ["a", "b"]
    assert split_text(text, "<|endoftext|>") == ["a", "b", "cut mid-sen"]


# ---------------------------------------------------------------------------------------------------------
# jsonl, parquet, Hugging Face builders, directories


def test_jsonl_reads_the_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"body": "alpha beta", "id": 1}, {"body": "  "}, {"body": "gamma"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert _docs(path, text_field="body") == ["alpha beta", "gamma"]


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataeffError) as e:
        _docs(path)
    assert f"{path}:3:" in _error(e) and "malformed JSON" in str(e.value)


def test_jsonl_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataeffError) as e:
        _docs(path)
    message = _error(e)
    assert f"{path}:2:" in message and "'text'" in message and "content" in message


def test_parquet_reads_the_text_column_and_refuses_a_missing_one(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["doc one", None, "doc two", " "], "n": [1, 2, 3, 4]}), path)
    assert _docs(path) == ["doc one", "doc two"]
    with pytest.raises(DataeffError) as e:
        _docs(path, text_field="body")
    assert str(path) in _error(e) and "'body'" in str(e.value)


def test_hf_builder_on_local_files(tmp_path):
    path = tmp_path / "c.jsonl"
    texts = [f"hf document number {i}" for i in range(10)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    cfg = DataConfig(corpus="hf:json", hf_data_files=str(path), val_docs=2, cache_dir=str(tmp_path / "cache"))
    splits = load_documents(cfg)
    assert sorted(splits["train"] + splits["val"]) == sorted(texts) and len(splits["val"]) == 2
    assert (tmp_path / "cache" / "hf").is_dir()  # the HF cache stays inside cache_dir
    with pytest.raises(DataeffError) as e:
        load_documents(DataConfig(corpus="hf:json", hf_data_files=str(path), text_field="body", cache_dir=str(tmp_path / "cache")))
    assert "'body'" in _error(e)


def test_directory_concatenates_supported_files_in_name_order(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("from b", encoding="utf-8")
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "from a"}\n', encoding="utf-8")
    (tmp_path / "d" / "sub" / "c.txt").write_text("from c", encoding="utf-8")
    (tmp_path / "d" / "notes.md").write_text("ignored", encoding="utf-8")
    cfg = DataConfig(corpus=str(tmp_path / "d"), val_docs=1)
    splits = load_documents(cfg)
    assert sorted(splits["train"] + splits["val"]) == ["from a", "from b", "from c"]


def test_separate_val_split_file_is_used_instead_of_a_holdout(tmp_path):
    (tmp_path / "train.txt").write_text("t1\n\nt2\n\nt3", encoding="utf-8")
    (tmp_path / "val.txt").write_text("v1\n\nv2", encoding="utf-8")
    splits = load_documents(DataConfig(corpus=str(tmp_path / "train.txt"), val_split=str(tmp_path / "val.txt")))
    assert splits == {"train": ["t1", "t2", "t3"], "val": ["v1", "v2"]}


# ---------------------------------------------------------------------------------------------------------
# errors


def test_non_utf8_names_file_line_and_byte_offset(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"good\n\nbad \xff here\n")
    with pytest.raises(DataeffError) as e:
        _docs(path)
    message = _error(e)
    assert f"{path}:3:" in message and "byte offset 10" in message


@pytest.mark.parametrize("content", ["", "  \n\n\t\n"])
def test_empty_or_whitespace_only_corpus_is_refused_naming_the_file(tmp_path, content):
    path = tmp_path / "c.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataeffError) as e:
        _docs(path)
    assert str(path) in _error(e) and "no documents" in str(e.value)


def test_missing_corpus_is_refused_with_a_suggestion(tmp_path):
    with pytest.raises(DataeffError) as e:
        load_documents(DataConfig(corpus="tinystorie"))
    assert "tinystorie" in _error(e) and "did you mean 'tinystories'" in str(e.value)
    (tmp_path / "c.txt").write_text("a\n\nb", encoding="utf-8")
    with pytest.raises(DataeffError) as e:
        load_documents(DataConfig(corpus=str(tmp_path / "c.txt"), val_split=str(tmp_path / "nope.txt")))
    assert "nope.txt" in _error(e)


def test_unknown_extension_asks_for_the_format(tmp_path):
    path = tmp_path / "wiki.train.raw"
    path.write_text("a\n\nb\n\nc", encoding="utf-8")
    with pytest.raises(DataeffError) as e:
        _docs(path)
    assert "data.format" in _error(e)
    assert _docs(path, format="txt") == ["a", "b", "c"]


def test_named_corpus_without_data_dir_names_the_variable(monkeypatch):
    monkeypatch.delenv("DATAEFF_DATA_DIR", raising=False)
    with pytest.raises(DataeffError) as e:
        load_documents(DataConfig(corpus="tinystories"))
    assert "DATAEFF_DATA_DIR" in _error(e)
    monkeypatch.setenv("DATAEFF_DATA_DIR", "/nonexistent/dataeff-data")
    with pytest.raises(DataeffError) as e:
        load_documents(DataConfig(corpus="tinystories"))
    assert "DATAEFF_DATA_DIR" in _error(e) and "/nonexistent/dataeff-data" in str(e.value)


def test_bad_fractions_are_refused_through_the_config_loader():
    with pytest.raises(DataeffError) as e:
        from_dict(DataConfig, {"val_fraction": 1.5}, source="run.yaml")
    assert "val_fraction" in _error(e) and "run.yaml" in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# held-out split


def test_holdout_is_seeded_disjoint_and_sized():
    docs = [f"doc {i}" for i in range(101)]
    train, val = holdout(docs, DataConfig(val_fraction=0.05, split_seed=3))
    assert len(val) == math.ceil(0.05 * 101) == 6
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert holdout(docs, DataConfig(val_fraction=0.05, split_seed=3)) == (train, val)
    assert holdout(docs, DataConfig(val_fraction=0.05, split_seed=4))[1] != val
    assert train == [d for d in docs if d in set(train)]  # original order kept
    assert len(holdout(docs, DataConfig(val_docs=10))[1]) == 10
    assert len(holdout(docs[:3], DataConfig(val_fraction=0.01))[1]) == 1  # at least one


def test_holdout_refuses_to_leave_no_training_documents():
    with pytest.raises(DataeffError) as e:
        holdout(["a", "b"], DataConfig(val_docs=2))
    assert "2 of its 2" in _error(e)


def test_fingerprint_follows_file_content(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("a\n\nb", encoding="utf-8")
    cfg = DataConfig(corpus=str(path))
    before = corpus_fingerprint(cfg)
    assert corpus_fingerprint(cfg) == before
    path.write_text("a\n\nc", encoding="utf-8")
    assert corpus_fingerprint(cfg) != before


# ---------------------------------------------------------------------------------------------------------
# named corpora (real data)


def test_named_corpus_default_tokenizers():
    assert named_corpus_default_tokenizer("wikitext2") == "word"
    assert named_corpus_default_tokenizer("tinystories") == "bpe"
    assert named_corpus_default_tokenizer("tinyshakespeare") == "bpe"
    assert default_tokenizer_kind(DataConfig(corpus="wikitext2")) == "word"
    assert default_tokenizer_kind(DataConfig(corpus="some/file.txt")) == "bpe"
    with pytest.raises(DataeffError):
        named_corpus_default_tokenizer("nope")


@pytest.mark.data
def test_tinystories_has_2316_whole_training_stories_and_its_own_validation(data_dir):
    splits = load_documents(DataConfig(corpus="tinystories"))
    assert set(splits) == {"train", "val"}
    assert len(splits["train"]) == 2316
    assert splits["train"][0].startswith("One day, a little girl named Lily found a needle")
    assert not any("<|endoftext|>" in d for d in splits["train"])
    tail = (data_dir / "tinystories/train_sample_2MiB.txt").read_text(encoding="utf-8").rsplit("<|endoftext|>", 1)[1]
    assert splits["train"][-1] not in tail  # the story cut at 2 MiB is dropped
    assert splits["val"][0].startswith("Spot. Spot saw the shiny car")


@pytest.mark.data
def test_wikitext2_is_one_document_per_nonempty_line(data_dir):
    splits = load_documents(DataConfig(corpus="wikitext2"))
    assert set(splits) == {"train", "val", "test"}
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        lines = (data_dir / f"wikitext-2/{name}.txt").read_text(encoding="utf-8").split("\n")
        assert splits[split] == [line.strip() for line in lines if line.strip()]


@pytest.mark.data
def test_tinyshakespeare_is_held_out_by_document(data_dir):
    splits = load_documents(DataConfig(corpus="tinyshakespeare", split_seed=1))
    n = len(splits["train"]) + len(splits["val"])
    assert len(splits["val"]) == math.ceil(0.05 * n)
    assert "First Citizen:\nBefore we proceed any further, hear me speak." in splits["train"] + splits["val"]
