"""Tokenizers: byte-level BPE and word-level, trained on the training split only, or loaded from a tokenizer.json.

Both are Hugging Face ``tokenizers`` objects underneath, so a saved ``tokenizer.json`` loads anywhere. The
end-of-document token (``<|endoftext|>`` for BPE, ``<eos>`` for word-level) is appended by the token store,
never by the tokenizer, so encoding a text gives exactly its own tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dataeff.data.config import TokenizerConfig
from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_write_text

BPE_EOS = "<|endoftext|>"
WORD_EOS = "<eos>"
WORD_UNK = "<unk>"
# Looked for, in this order, to find the end-of-document token of a tokenizer loaded from a file.
EOS_CANDIDATES = (BPE_EOS, WORD_EOS, "</s>", "<|eos|>", "<|end_of_text|>")  # the last is Llama 3's

_KINDS = {"BPE": "bpe", "WordLevel": "word"}


class Tokenizer:
    """A Hugging Face tokenizer with a known end-of-document token."""

    def __init__(self, hf: tokenizers.Tokenizer, source: str = "<tokenizer>"):
        self.hf = hf
        canonical = json.loads(hf.to_str())
        model_type = canonical.get("model", {}).get("type", "unknown")
        self.kind: str = _KINDS.get(model_type, str(model_type).lower())
        eos = next((t for t in EOS_CANDIDATES if hf.token_to_id(t) is not None), None)
        if eos is None:
            raise DataeffError(f"{source}: tokenizer has no end-of-document token (one of {', '.join(EOS_CANDIDATES)})")
        self.eos_token: str = eos
        self.eos_id: int = hf.token_to_id(eos)
        # Ids may have gaps in a hand-made tokenizer.json; the embedding must cover the largest one.
        self.vocab_size: int = max(hf.get_vocab(with_added_tokens=True).values()) + 1
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        self.sha256: str = hashlib.sha256(blob.encode()).hexdigest()
        # What token ids mean, and how text becomes them: equal for the same tokenizer however it was saved
        # (a Hugging Face export adds post-processing and padding settings that change no id).
        vocab = json.dumps(sorted(hf.get_vocab(with_added_tokens=True).items()), separators=(",", ":"), ensure_ascii=False)
        model = json.dumps(canonical.get("model"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        self.ids_sha256: str = hashlib.sha256(f"{vocab}\n{model}".encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.hf.to_str())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataeffError(f"{path}: no such tokenizer file")
        try:
            hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side reports every parse problem as a bare Exception
            raise DataeffError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        return cls(hf, str(path))


def resolve_kind(cfg: TokenizerConfig, default: str) -> str:
    """The concrete kind ("bpe", "word" or "file"): ``auto`` becomes the corpus's default."""
    return default if cfg.kind == "auto" else cfg.kind


def train_bpe(docs: Sequence[str], vocab_size: int, min_frequency: int = 2, progress: bool = False) -> Tokenizer:
    """A GPT-2 style byte-level BPE: every byte is a token, so nothing is ever out of vocabulary."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    floor = len(alphabet) + 1
    if vocab_size < floor:
        raise DataeffError(
            f"tokenizer.vocab_size={vocab_size} is below {floor}, the 256 bytes plus {BPE_EOS} a byte-level BPE needs"
        )
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BPE_EOS],
        initial_alphabet=alphabet,
        show_progress=progress,
    )
    hf.train_from_iterator(docs, trainer, length=len(docs))
    got = hf.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        raise DataeffError(
            f"tokenizer.vocab_size={vocab_size} is more than the training data supports: BPE runs out of merges "
            f"(min_frequency={min_frequency}) at {got} tokens; set tokenizer.vocab_size <= {got}"
        )
    return Tokenizer(hf)


def train_word(docs: Sequence[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Whitespace-split words, the most frequent first (ties alphabetical); the rest map to ``<unk>``."""
    counts: Counter[str] = Counter()
    for doc in docs:
        counts.update(doc.split())
    for special in (WORD_UNK, WORD_EOS):
        counts.pop(special, None)
    words = sorted((w for w, c in counts.items() if c >= min_frequency), key=lambda w: (-counts[w], w))
    vocab = {WORD_UNK: 0, WORD_EOS: 1}
    vocab.update({w: i for i, w in enumerate(words[: max(vocab_size - len(vocab), 0)], start=len(vocab))})
    hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=WORD_UNK))
    # Not registered as added tokens: those would also match inside words ("a<unk>b"), and every
    # whitespace-separated word must stay exactly one token.
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: decoding joins the words with single spaces.
    return Tokenizer(hf)


def build_tokenizer(cfg: TokenizerConfig, train_docs: Sequence[str], default_kind: str = "bpe", progress: bool = False) -> Tokenizer:
    """The tokenizer ``cfg`` asks for, trained on ``train_docs`` (the training split) unless loaded from a file."""
    kind = resolve_kind(cfg, default_kind)
    if kind == "file":
        if cfg.path is None:
            raise DataeffError("tokenizer.kind=file needs tokenizer.path, the tokenizer.json to load")
        return Tokenizer.load(cfg.path)
    if kind == "word":
        return train_word(train_docs, cfg.vocab_size, cfg.min_frequency)
    return train_bpe(train_docs, cfg.vocab_size, cfg.min_frequency, progress)
