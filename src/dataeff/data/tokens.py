"""The token store: a corpus tokenized once into flat memory-mapped arrays, in a content-addressed directory.

``<cache_dir>/<corpus>-<hash>/`` holds ``tokenizer.json``, ``<split>.bin`` (token ids, every document followed
by EOS), ``<split>.docs.npy`` (document start offsets plus the end) and ``meta.json``. The hash covers the
corpus content, the data config and the tokenizer config, so a changed input never reuses a stale store, and
the directory appears by one rename only once complete, so a crash never leaves one that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dataeff.config import non_default, to_dict
from dataeff.data.config import DataConfig, Format, TokenizerConfig
from dataeff.data.corpora import (
    Conditional,
    Document,
    corpus_fingerprint,
    corpus_name,
    default_tokenizer_kind,
    file_sha256,
    load_documents,
    read_path,
    texts,
)
from dataeff.data.tokenizer import Tokenizer, build_tokenizer, resolve_kind
from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_write_json, exclusive_lock, make_dir_like_open

# Bumped whenever the store layout, its tokenization rules, or a default of DataConfig or TokenizerConfig
# changes (store identities leave defaults out), so old stores are not reused.
STORE_VERSION = 2
COMPLETE_MARKER = ".complete"
LOCKS = ".locks"  # one lock file per store name, held while that store is built
_BATCH_DOCS = 1024
# Fields that change where things are kept, not what they contain.
_NOT_IDENTITY = ("cache_dir",)
# Fields that pick the training budget or add synthetic text: the tokenizer is trained on the whole real
# training split regardless, so a student trained on a teacher's samples shares the teacher's tokenizer.
_BUDGET_FIELDS = ("train_tokens", "budget_seed", "synthetic", "synthetic_field", "synthetic_share", "synthetic_schedule",
                  "replay", "replay_rate", "replay_tokens")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


@dataclass(frozen=True)
class TokenSplit:
    """One split's token stream; document ``i`` is ``tokens[doc_offsets[i]:doc_offsets[i+1]]`` (EOS included)."""

    name: str
    tokens: np.ndarray
    doc_offsets: np.ndarray
    n_bytes: int  # UTF-8 bytes of the text the tokens encode (of conditional documents, the text's, not the prompt's)
    n_words: int  # whitespace words of that text, plus one per document for its EOS
    # 1 where a token is a target the loss counts (None: every token is); 0 on conditional documents' prompts.
    mask: np.ndarray | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1


class PreparedData:
    """A complete token store on disk."""

    def __init__(self, path: Path, meta: dict[str, Any], tokenizer: Tokenizer):
        self.path = path
        self.meta = meta
        self.tokenizer = tokenizer

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def split(self, name: str) -> TokenSplit:
        info = self.meta["splits"].get(name)
        if info is None:
            raise DataeffError(f"{self.path}: no split {name!r} (has {', '.join(self.splits)})")
        tokens = np.memmap(self.path / f"{name}.bin", dtype=self.meta["dtype"], mode="r")
        offsets = np.load(self.path / f"{name}.docs.npy")
        if len(tokens) != info["n_tokens"] or offsets[-1] != info["n_tokens"]:
            raise DataeffError(f"{self.path}/{name}.bin: holds {len(tokens)} tokens, meta.json says {info['n_tokens']}; delete the store")
        mask = np.memmap(self.path / f"{name}.mask.bin", dtype=np.uint8, mode="r") if info.get("masked") else None
        return TokenSplit(name, tokens, offsets, info["n_bytes"], info["n_words"], mask)


def load_prepared(path: str | Path) -> PreparedData:
    """Open an existing, complete token store."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).exists():
        raise DataeffError(f"{path}: not a complete token store (no {COMPLETE_MARKER} marker)")
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    return PreparedData(path, meta, Tokenizer.load(path / "tokenizer.json"))


# ---------------------------------------------------------------------------------------------------------
# tokenizing


@dataclass
class _Stream:
    offsets: list[int]
    n_bytes: float = 0.0
    n_words: float = 0.0

    @property
    def n_tokens(self) -> int:
        return self.offsets[-1]


def _tokenize(
    docs: Sequence[Document],
    tokenizer: Tokenizer,
    dtype: np.dtype,
    sink: Callable[[np.ndarray], None],
    *,
    budget: int | None = None,
    desc: str = "tokenizing",
    progress: bool = False,
    mask_sink: Callable[[np.ndarray], None] | None = None,
) -> _Stream:
    """Feed ``sink`` the documents' tokens, each followed by EOS, stopping after exactly ``budget`` tokens.

    A conditional document is its prompt, EOS, its text and EOS; ``mask_sink`` then gets a 0 for every token of
    the prompt and its EOS (targets the loss skips) and a 1 for the rest. A document cut by the budget counts its
    bytes and words in proportion to the share of its tokens kept.
    """
    stream = _Stream([0])
    with tqdm(total=len(docs), desc=desc, unit="doc", disable=not progress) as bar:
        for start in range(0, len(docs), _BATCH_DOCS):
            batch = docs[start : start + _BATCH_DOCS]
            flat: list[int] = []
            flat_mask: list[int] = []
            text_ids = tokenizer.encode_batch([d.text if isinstance(d, Conditional) else d for d in batch])
            prompt_ids = tokenizer.encode_batch([d.prompt for d in batch if isinstance(d, Conditional)])
            prompts = iter(prompt_ids)
            for doc, ids in zip(batch, text_ids, strict=True):
                ids.append(tokenizer.eos_id)
                text = doc.text if isinstance(doc, Conditional) else doc
                skipped = [*next(prompts), tokenizer.eos_id] if isinstance(doc, Conditional) else []
                doc_ids = skipped + ids
                keep = len(doc_ids) if budget is None else min(len(doc_ids), budget - stream.n_tokens)
                share = max(0, keep - len(skipped)) / len(ids)
                flat.extend(doc_ids[:keep])
                flat_mask.extend(([0] * len(skipped) + [1] * len(ids))[:keep])
                stream.offsets.append(stream.n_tokens + keep)
                stream.n_bytes += len(text.encode("utf-8")) * share
                stream.n_words += (len(text.split()) + 1) * share
                if stream.n_tokens == budget:
                    break
            sink(np.asarray(flat, dtype=dtype))
            if mask_sink is not None:
                mask_sink(np.asarray(flat_mask, dtype=np.uint8))
            bar.update(len(batch))
            if stream.n_tokens == budget:
                break
    return stream


def _split_meta(stream: _Stream) -> dict[str, int]:
    return {
        "n_tokens": stream.n_tokens,
        "n_docs": len(stream.offsets) - 1,
        "n_bytes": round(stream.n_bytes),
        "n_words": round(stream.n_words),
    }


def _write_split(
    directory: Path, name: str, docs: Sequence[Document], tokenizer: Tokenizer, dtype: np.dtype,
    budget: int | None, progress: bool,
) -> dict[str, Any]:
    """Write ``<name>.bin``, ``<name>.docs.npy`` and, for conditional documents, ``<name>.mask.bin``; the split's
    meta entry."""
    masked = any(isinstance(d, Conditional) for d in docs)
    with open(directory / f"{name}.bin", "wb") as f, \
            (open(directory / f"{name}.mask.bin", "wb") if masked else contextlib.nullcontext()) as m:
        stream = _tokenize(docs, tokenizer, dtype, lambda a: a.tofile(f), budget=budget, desc=name, progress=progress,
                           mask_sink=(lambda a: a.tofile(m)) if m is not None else None)
        for handle in (f, m):
            if handle is not None:
                handle.flush()
                os.fsync(handle.fileno())
    with open(directory / f"{name}.docs.npy", "wb") as f:
        np.save(f, np.asarray(stream.offsets, dtype=np.int64))
        f.flush()
        os.fsync(f.fileno())
    return {**_split_meta(stream), **({"masked": True} if masked else {})}


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy of the token frequency distribution, in nats/token: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------------------------------------
# the store


def _hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tokenizer_identity(tok: TokenizerConfig, kind: str) -> dict[str, Any]:
    identity = {**non_default(tok), "kind": kind}
    if kind == "file":
        if tok.path is None:
            raise DataeffError("tokenizer.kind=file needs tokenizer.path, the tokenizer.json to load")
        path = Path(tok.path)
        if not path.is_file():
            raise DataeffError(f"tokenizer.path={tok.path}: no such file")
        identity["file_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return identity


def _cached_tokenizer(
    cache: Path, key: str, tok: TokenizerConfig, train_docs: Sequence[str], default_kind: str, progress: bool
) -> Tokenizer:
    # Kept apart from the stores so that budgets of one corpus share one tokenizer and their losses compare.
    path = cache / "tokenizers" / f"{key}.json"
    if path.exists():
        return Tokenizer.load(path)
    tokenizer = build_tokenizer(tok, train_docs, default_kind, progress)
    tokenizer.save(path)
    return tokenizer


def _store_keys(data: DataConfig, tok: TokenizerConfig) -> tuple[Path, str, str]:
    """(store directory, tokenizer cache key, resolved tokenizer kind)."""
    kind = resolve_kind(tok, default_tokenizer_kind(data))
    fields = {k: v for k, v in non_default(data).items() if k not in _NOT_IDENTITY}
    unbudgeted = {k: v for k, v in fields.items() if k not in _BUDGET_FIELDS}
    common = {"version": STORE_VERSION, "corpus": corpus_fingerprint(data), "tokenizer": _tokenizer_identity(tok, kind)}
    name = corpus_name(data)
    synthetic = {}
    if data.synthetic is not None:
        path = Path(data.synthetic)
        if not path.is_file():
            raise DataeffError(f"data.synthetic={data.synthetic}: no such file")
        synthetic = {"synthetic_sha256": file_sha256(path)}
    if data.replay is not None:
        synthetic["replay"] = corpus_fingerprint(_replay_config(data))
    store = Path(data.cache_dir) / f"{name}-{_hash({**common, 'data': fields, **synthetic})}"
    return store, f"{name}-{_hash({**common, 'data': unbudgeted})}", kind


def store_identity(data: DataConfig, tok: TokenizerConfig) -> str:
    """The name of the store these configs make: a hash of the corpus's content, the data settings and the
    tokenizer's. A run's identity includes it, so new data means a new run."""
    return _store_keys(data, tok)[0].name


def prepare(data: DataConfig, tok: TokenizerConfig, *, progress: bool = True) -> PreparedData:
    """Tokenize the corpus into its store, or open the store if an identical one is already complete."""
    store, tokenizer_key, kind = _store_keys(data, tok)
    if (store / COMPLETE_MARKER).exists():
        return load_prepared(store)
    # One process builds a store; the others wait for it and find it complete.
    with exclusive_lock(store.parent / LOCKS / f"{store.name}.lock", str(store)):
        if (store / COMPLETE_MARKER).exists():
            return load_prepared(store)
        for stale in store.parent.glob(f".{store.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build: the lock says none is running
        return _build(store, tokenizer_key, kind, data, tok, progress)


def _build(store: Path, tokenizer_key: str, kind: str, data: DataConfig, tok: TokenizerConfig,
           progress: bool) -> PreparedData:
    docs = load_documents(data)
    cache = Path(data.cache_dir)
    tokenizer = _cached_tokenizer(cache, tokenizer_key, tok, texts(docs["train"]), default_tokenizer_kind(data), progress)
    dtype = token_dtype(tokenizer.vocab_size)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{store.name}.", suffix=".tmp", dir=cache))
    make_dir_like_open(tmp)
    try:
        tokenizer.save(tmp / "tokenizer.json")
        splits: dict[str, dict[str, int]] = {}
        for name, split_docs in docs.items():
            budget = data.train_tokens if name == "train" else None
            if budget is not None:
                # A seeded shuffle, so budgets of one seed are prefixes of each other (nested worlds).
                order = np.random.default_rng(data.budget_seed).permutation(len(split_docs))
                split_docs = [split_docs[i] for i in order]
            splits[name] = _write_split(tmp, name, split_docs, tokenizer, dtype, budget, progress)
            if budget is not None and splits[name]["n_tokens"] < budget:
                raise DataeffError(
                    f"data.train_tokens={budget} is more than the training split of {corpus_name(data)!r} holds: "
                    f"{splits[name]['n_tokens']} tokens with this tokenizer"
                )
        if data.synthetic is not None:
            splits["synthetic"] = _write_synthetic(tmp, data, splits["train"]["n_tokens"], tokenizer, dtype, progress)
        if data.replay is not None:
            replay = load_documents(_replay_config(data))["train"]
            splits["replay"] = _write_split(tmp, "replay", replay, tokenizer, dtype, data.replay_tokens, progress)
        train_tokens = np.fromfile(tmp / "train.bin", dtype=dtype)
        meta = {
            "store_version": STORE_VERSION,
            "corpus": corpus_name(data),
            "tokenizer_sha256": tokenizer.sha256,
            "kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "dtype": dtype.name,
            "unigram_entropy": unigram_entropy(train_tokens, tokenizer.vocab_size),
            "splits": splits,
            "data": to_dict(data),
            "tokenizer": {**to_dict(tok), "kind": kind},
        }
        atomic_write_json(tmp / "meta.json", meta)
        (tmp / COMPLETE_MARKER).touch()
        if store.exists() and not (store / COMPLETE_MARKER).exists():
            shutil.rmtree(store)  # left by something other than prepare, which only renames complete stores
        try:
            os.rename(tmp, store)
        except OSError:
            # Another process finished the same store first; its content is identical by construction.
            if not (store / COMPLETE_MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(store)


def training_stream(prepared: PreparedData) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a run trains on and their document offsets: the training split, then (for sequence-level
    distillation or any synthetic corpus) the synthetic split's documents after the real ones."""
    train = prepared.split("train")
    if "synthetic" not in prepared.splits or prepared.meta["data"].get("synthetic_schedule") == "once":
        return train.tokens, train.doc_offsets
    syn = prepared.split("synthetic")
    return (np.concatenate([train.tokens, syn.tokens]),
            np.concatenate([train.doc_offsets, syn.doc_offsets[1:] + train.n_tokens]))


def _replay_config(data: DataConfig) -> DataConfig:
    """The replay corpus as a corpus of its own (its training split is what is replayed)."""
    assert data.replay is not None
    return DataConfig(corpus=data.replay, cache_dir=data.cache_dir, val_docs=1)


def synthetic_tokens(real_tokens: int, share: float) -> int:
    """Synthetic tokens that make ``share`` of an epoch over ``real_tokens`` real ones: D·s/(1-s)."""
    return round(real_tokens * share / (1.0 - share))


def _write_synthetic(directory: Path, data: DataConfig, real_tokens: int, tokenizer: Tokenizer, dtype: np.dtype,
                     progress: bool) -> dict[str, int]:
    """The synthetic split: the first D·s/(1-s) tokens of the synthetic corpus, so that s of a mixed epoch is
    synthetic while the real tokens are each seen once."""
    assert data.synthetic is not None
    docs = read_path(data.synthetic, "auto", "blank_line", data.synthetic_field)
    if data.synthetic_schedule == "once":
        # How much is seen depends on the run's epochs: the store keeps it all, the run takes what it needs.
        return _write_split(directory, "synthetic", docs, tokenizer, dtype, None, progress)
    need = synthetic_tokens(real_tokens, data.synthetic_share)
    meta = _write_split(directory, "synthetic", docs, tokenizer, dtype, need, progress)
    if meta["n_tokens"] < need:
        raise DataeffError(
            f"data.synthetic={data.synthetic}: holds {meta['n_tokens']} tokens; data.synthetic_share="
            f"{data.synthetic_share} of an epoch over {real_tokens} real tokens needs {need}"
        )
    return meta


def fitness_split(prepared: PreparedData, data: DataConfig, n_tokens: int) -> TokenSplit:
    """Up to ``n_tokens`` of training-pool documents the token budget left out: held-out text disjoint from
    both the training and the validation split, for choosing ensemble weights without touching validation."""
    if data.train_tokens is None:
        raise DataeffError(
            "fitness split: data.train_tokens is unset, so the whole training split is trained on and no held-out "
            "training documents remain; set data.train_tokens below the corpus size"
        )
    docs = load_documents(data)["train"]
    order = np.random.default_rng(data.budget_seed).permutation(len(docs))
    left = [docs[i] for i in order[prepared.split("train").n_docs :]]
    if not left:
        raise DataeffError(f"fitness split: the token budget data.train_tokens={data.train_tokens} uses every "
                           "training document; lower it to leave documents for the fitness split")
    tokenizer = prepared.tokenizer
    chunks: list[np.ndarray] = []
    stream = _tokenize(left, tokenizer, token_dtype(tokenizer.vocab_size), chunks.append, budget=n_tokens)
    return TokenSplit("fitness", np.concatenate(chunks), np.asarray(stream.offsets, dtype=np.int64),
                      round(stream.n_bytes), round(stream.n_words))


def tokenize_file(
    prepared: PreparedData,
    path: str | Path,
    *,
    format: Format = "auto",
    separator: str = "blank_line",
    text_field: str = "text",
) -> TokenSplit:
    """Tokenize any local text file or directory with the store's tokenizer, in memory, for evaluation."""
    docs = read_path(path, format, separator, text_field)
    tokenizer = prepared.tokenizer
    chunks: list[np.ndarray] = []
    stream = _tokenize(docs, tokenizer, token_dtype(tokenizer.vocab_size), chunks.append)
    return TokenSplit(
        Path(path).name, np.concatenate(chunks), np.asarray(stream.offsets, dtype=np.int64),
        round(stream.n_bytes), round(stream.n_words),
    )
