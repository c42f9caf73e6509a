"""The data layer's configs: which corpus, which token budget, which tokenizer. Imports nothing but configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dataeff.config import option

Format = Literal["auto", "txt", "jsonl", "parquet", "hf"]


@dataclass
class DataConfig:
    corpus: str = option(
        "tinystories",
        "a named corpus (tinystories, wikitext2, tinyshakespeare), a .txt/.jsonl/.parquet file or a directory of "
        "them, or hf:<name> for a Hugging Face dataset",
    )
    format: Format = option("auto", "file format; auto = from the file extension (hf for hf:<name>)")
    separator: str = option(
        "auto",
        "how .txt files split into documents: blank_line, line (one document per line) or a literal string such "
        "as <|endoftext|>; auto = the named corpus's own, else blank_line",
    )
    text_field: str = option("text", "the text field of .jsonl records, .parquet columns and HF datasets")
    prompt_field: str | None = option(
        None, "a field of .jsonl/.parquet records holding a prompt: each document is the prompt, an end-of-document "
        "token, then the text, and the loss is on the text only (for conditional models such as SBP's synthesizer)")
    hf_config: str | None = option(None, "Hugging Face dataset configuration name")
    hf_split: str = option("train", "Hugging Face split used for training")
    hf_data_files: str | None = option(
        None, "data_files for a Hugging Face builder such as json, parquet or text (a path or glob)"
    )
    val_split: str | None = option(
        None,
        "a separate validation source: a file or directory (an HF split name for hf:<name>); named corpora fill "
        "it; when none, documents are held out of the training split",
    )
    val_fraction: float = option(0.05, "fraction of training documents held out for validation when there is no val_split", above=0.0, below=1.0)
    val_docs: int | None = option(None, "number of documents held out for validation (overrides val_fraction)", min=1)
    split_seed: int = option(0, "seed of the document-level validation hold-out", min=0)
    train_tokens: int | None = option(
        None, "token budget D of the training split (EOS tokens count); null = the whole training split",
        min=1)
    budget_seed: int = option(0, "seed of the document shuffle that picks the token budget; same seed = nested budgets", min=0)
    synthetic: str | None = option(
        None,
        "a synthetic corpus (.jsonl, .txt or .parquet, e.g. samples of a teacher) mixed into the training split; it "
        "is tokenized with the real data's tokenizer",
    )
    synthetic_field: str = option("text", "the text field of the synthetic corpus's records")
    synthetic_share: float = option(
        0.0,
        "share of every epoch's training tokens that are synthetic: the first D·s/(1-s) synthetic tokens join the "
        "D real ones, so the real data is still seen once per epoch (the paper used 0.75-0.9)",
        min=0.0, below=1.0)
    synthetic_schedule: Literal["every_epoch", "once"] = option(
        "every_epoch", "every_epoch: the synthetic tokens join every epoch (D·s/(1-s) of them); once: the synthetic "
        "tokens are seen at most once over the run, spread evenly through it, and the real data repeats for "
        "train.epochs (s/(1-s)·epochs·D synthetic tokens: s is their share of all training tokens)")
    replay: str | None = option(
        None, "a general corpus replayed during training (continued pretraining): a named corpus or a file, "
        "tokenized with the run's tokenizer")
    replay_rate: float = option(0.0, "share of training sequences replaced by a random replay sequence: a seeded "
                                     "coin per sequence, as in EntiGraph's code", min=0.0, below=1.0)
    replay_tokens: int | None = option(None, "tokens read from the replay corpus at most (default: all)", min=1)
    cache_dir: str = option("cache", "directory for prepared token stores (relative to the working directory)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.synthetic_share < 1.0:
            raise ValueError(f"synthetic_share must be in [0, 1), got {self.synthetic_share}")
        if (self.synthetic is None) != (self.synthetic_share == 0.0):
            raise ValueError("synthetic and synthetic_share are set together: a synthetic corpus and its share above 0")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.val_docs is not None and self.val_docs < 1:
            raise ValueError(f"val_docs must be at least 1, got {self.val_docs}")
        if self.train_tokens is not None and self.train_tokens < 1:
            raise ValueError(f"train_tokens must be at least 1, got {self.train_tokens}")
        if (self.replay is None) != (self.replay_rate == 0.0):
            raise ValueError("replay and replay_rate are set together: a replay corpus and its rate above 0")


@dataclass
class TokenizerConfig:
    kind: Literal["auto", "bpe", "word", "file"] = option(
        "auto", "byte-level BPE, word-level, or an existing tokenizer.json (file); auto = the corpus's default"
    )
    vocab_size: int = option(
        4096, "vocabulary size; for word-level a cap (all training words up to it, by frequency; the rest <unk>)",
        min=2, max=2**24)
    path: str | None = option(None, "an existing tokenizer.json, for kind=file")
    min_frequency: int = option(2, "minimum count of a BPE merge or of a word to enter the vocabulary", min=1, max=2**31)

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be at least 1, got {self.min_frequency}")
