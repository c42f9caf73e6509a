"""Corpora: named corpora under ``DATAEFF_DATA_DIR``, local .txt/.jsonl/.parquet files or directories, and
Hugging Face datasets, all read into lists of documents per split.

Every document is stripped of surrounding whitespace and whitespace-only documents are dropped, whatever the
format, so the same text gives the same documents however it is stored.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dataeff.data.config import DataConfig, Format
from dataeff.errors import DataeffError

DATA_DIR_ENV = "DATAEFF_DATA_DIR"



# ---------------------------------------------------------------------------------------------------------
# named corpora


@dataclass(frozen=True)
class NamedSource:
    path: str  # relative to DATAEFF_DATA_DIR
    separator: str
    drop_tail: bool = False  # the file was cut mid-document: text after the last separator is a fragment


@dataclass(frozen=True)
class NamedCorpus:
    splits: dict[str, NamedSource]
    tokenizer: str


NAMED_CORPORA: dict[str, NamedCorpus] = {
    "tinystories": NamedCorpus(
        splits={
            "train": NamedSource("tinystories/train_sample_2MiB.txt", "<|endoftext|>", drop_tail=True),
            "val": NamedSource("tinystories/validation_head.txt", "blank_line"),
        },
        tokenizer="bpe",
    ),
    # The tokenized WikiText-2 of pytorch/examples: one document per line (each followed by EOS, as there).
    # Unlike there, empty lines are dropped rather than counted as an EOS each.
    "wikitext2": NamedCorpus(
        splits={
            "train": NamedSource("wikitext-2/train.txt", "line"),
            "val": NamedSource("wikitext-2/valid.txt", "line"),
            "test": NamedSource("wikitext-2/test.txt", "line"),
        },
        tokenizer="word",
    ),
    # No validation split: a seeded document-level hold-out of blank-line paragraphs, not nanoGPT's contiguous
    # 90/10 cut, so validation paragraphs come from the whole play collection.
    "tinyshakespeare": NamedCorpus(
        splits={"train": NamedSource("tinyshakespeare/input.txt", "blank_line")},
        tokenizer="bpe",
    ),
}


def named_corpus_default_tokenizer(name: str) -> str:
    """The tokenizer kind a named corpus is meant to be used with ("bpe" or "word")."""
    if name not in NAMED_CORPORA:
        raise DataeffError(f"unknown named corpus {name!r}; known: {', '.join(NAMED_CORPORA)}")
    return NAMED_CORPORA[name].tokenizer


def default_tokenizer_kind(cfg: DataConfig) -> str:
    """The tokenizer kind ``tokenizer.kind=auto`` means for this corpus."""
    return named_corpus_default_tokenizer(cfg.corpus) if _is_named(cfg) else "bpe"


def data_root() -> Path:
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        raise DataeffError(f"named corpora are read from ${DATA_DIR_ENV}, which is not set; point it at the data directory")
    root = Path(value)
    if not root.is_dir():
        raise DataeffError(f"{DATA_DIR_ENV}={value}: no such directory")
    return root


# ---------------------------------------------------------------------------------------------------------
# sources: where each split comes from


@dataclass(frozen=True)
class Source:
    """One split's origin: a local file or directory, or a split of a Hugging Face dataset."""

    location: str  # a path, or an HF dataset name
    format: Format
    separator: str = "blank_line"
    drop_tail: bool = False
    hf_config: str | None = None
    hf_split: str = "train"
    hf_data_files: str | None = None


def _is_hf(cfg: DataConfig) -> bool:
    return cfg.format == "hf" or cfg.corpus.startswith("hf:")


def _is_named(cfg: DataConfig) -> bool:
    return not _is_hf(cfg) and cfg.corpus in NAMED_CORPORA


def _separator(cfg: DataConfig, default: str) -> str:
    return default if cfg.separator == "auto" else cfg.separator


def resolve_sources(cfg: DataConfig) -> dict[str, Source]:
    """The source of every split the corpus provides itself ("train", and "val"/"test" when it has them)."""
    if _is_hf(cfg):
        name = cfg.corpus.removeprefix("hf:")
        hf = {"hf_config": cfg.hf_config, "hf_data_files": cfg.hf_data_files}
        sources = {"train": Source(name, "hf", hf_split=cfg.hf_split, **hf)}
        if cfg.val_split is not None:
            sources["val"] = Source(name, "hf", hf_split=cfg.val_split, **hf)
        return sources
    if _is_named(cfg):
        root = data_root()
        sources = {
            split: Source(str(root / s.path), "auto", _separator(cfg, s.separator), s.drop_tail)
            for split, s in NAMED_CORPORA[cfg.corpus].splits.items()
        }
    else:
        if not Path(cfg.corpus).expanduser().exists():
            close = difflib.get_close_matches(cfg.corpus, list(NAMED_CORPORA), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; named corpora: {', '.join(NAMED_CORPORA)}"
            raise DataeffError(f"data.corpus={cfg.corpus!r}: no such file or directory, nor a named corpus{hint}")
        sources = {"train": Source(str(Path(cfg.corpus).expanduser()), cfg.format, _separator(cfg, "blank_line"))}
    if cfg.val_split is not None:
        if not Path(cfg.val_split).expanduser().exists():
            raise DataeffError(f"data.val_split={cfg.val_split!r}: no such file or directory")
        sources["val"] = Source(str(Path(cfg.val_split).expanduser()), cfg.format, _separator(cfg, "blank_line"))
    return sources


def corpus_name(cfg: DataConfig) -> str:
    """A short file-name-safe name of the corpus, for store directories."""
    if _is_hf(cfg):
        name = "hf-" + cfg.corpus.removeprefix("hf:")
    elif _is_named(cfg):
        name = cfg.corpus
    else:
        name = Path(cfg.corpus).expanduser().resolve().stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "corpus"


# ---------------------------------------------------------------------------------------------------------
# reading

_EXTENSIONS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
_BLANK_LINE = re.compile(r"\n\s*\n")


def _files(source: Source) -> list[Path]:
    path = Path(source.location)
    if not path.exists():
        raise DataeffError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    wanted = set(_EXTENSIONS) if source.format == "auto" else {f".{source.format}"}
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in wanted and not p.name.startswith(".")
    )
    if not files:
        raise DataeffError(f"{path}: directory holds no {'/'.join(sorted(wanted))} files")
    return files


def _file_format(path: Path, fmt: Format) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix not in _EXTENSIONS:
        raise DataeffError(f"{path}: cannot tell the format from the extension; set data.format to txt, jsonl or parquet")
    return _EXTENSIONS[path.suffix]


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataeffError(f"{path}: no such file") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataeffError(f"{path}:{line}: not valid UTF-8 (byte offset {e.start}: {e.reason})") from None


@dataclass(frozen=True)
class Conditional:
    """A document whose ``prompt`` conditions its ``text``: a model learns p(text | prompt), the loss on the text only."""

    prompt: str
    text: str


Document = str | Conditional


def texts(docs: Sequence[Document]) -> list[str]:
    """Every string of the documents (a conditional one gives its prompt and its text), e.g. to train a tokenizer."""
    return [s for d in docs for s in ((d.prompt, d.text) if isinstance(d, Conditional) else (d,))]


def _clean(parts: list[str]) -> list[str]:
    return [doc for doc in (p.strip() for p in parts) if doc]


def _clean_conditional(pairs: list[tuple[str, str]]) -> list[Conditional]:
    return [Conditional(prompt.strip(), text.strip()) for prompt, text in pairs if text.strip()]


def _field(record: Any, field: str, path: Path, number: int, setting: str) -> str:
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(record) if isinstance(record, dict) else f"a {type(record).__name__}, not an object"
        raise DataeffError(f"{path}:{number}: no field '{field}' (set {setting}; found: {keys})")
    value = record[field]
    if not isinstance(value, str):
        raise DataeffError(f"{path}:{number}: field '{field}' is {type(value).__name__}, expected a string")
    return value


def split_text(text: str, separator: str, drop_tail: bool = False) -> list[str]:
    """Split text into documents: ``blank_line``, ``line`` or a literal separator string."""
    if separator == "blank_line":
        parts = _BLANK_LINE.split(text)
    elif separator == "line":
        parts = text.split("\n")
    else:
        parts = text.split(separator)
        if drop_tail and len(parts) > 1:
            parts = parts[:-1]
    return _clean(parts)


def _read_jsonl(path: Path, text_field: str, prompt_field: str | None = None) -> list[Document]:
    texts_, prompts = [], []
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataeffError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None
        texts_.append(_field(record, text_field, path, number, "data.text_field"))
        if prompt_field is not None:
            prompts.append(_field(record, prompt_field, path, number, "data.prompt_field"))
    if prompt_field is not None:
        return list(_clean_conditional(list(zip(prompts, texts_, strict=True))))
    return list(_clean(texts_))


def _read_parquet(path: Path, text_field: str, prompt_field: str | None = None) -> list[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise DataeffError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    fields = [text_field] + ([prompt_field] if prompt_field is not None else [])
    for field, setting in zip(fields, ("data.text_field", "data.prompt_field"), strict=False):
        if field not in schema.names:
            raise DataeffError(f"{path}: no column '{field}' (set {setting}; columns: {', '.join(schema.names)})")
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataeffError(f"{path}: column '{field}' holds {kind}, expected strings")
    table = pq.read_table(path, columns=fields)
    values = table.column(text_field).to_pylist()
    if prompt_field is None:
        return list(_clean([v for v in values if v is not None]))
    prompts = table.column(prompt_field).to_pylist()
    return list(_clean_conditional([(p or "", v) for p, v in zip(prompts, values, strict=True) if v is not None]))


def _read_hf(source: Source, text_field: str, cache_dir: str) -> list[str]:
    import datasets

    kwargs: dict[str, Any] = {"split": source.hf_split, "cache_dir": str(Path(cache_dir) / "hf")}
    if source.hf_data_files is not None:
        kwargs["data_files"] = source.hf_data_files
    label = f"hf:{source.location}" + (f" ({source.hf_config})" if source.hf_config else "") + f" split {source.hf_split!r}"
    try:
        dataset = datasets.load_dataset(source.location, source.hf_config, **kwargs)
    # datasets signals a missing, unreachable or misnamed dataset with many unrelated exception types.
    except Exception as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataeffError(f"{label}: cannot load ({message})") from None
    if text_field not in dataset.column_names:
        raise DataeffError(f"{label}: no column '{text_field}' (set data.text_field; columns: {', '.join(dataset.column_names)})")
    values = dataset[text_field]
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise DataeffError(f"{label}: column '{text_field}' holds {type(bad).__name__}, expected strings")
    return _clean([v for v in values if v is not None])


def read_source(source: Source, text_field: str = "text", cache_dir: str = "cache",
                prompt_field: str | None = None) -> list[Document]:
    """All documents of one source, in file order; refuses a source with none. With ``prompt_field``, records
    give conditional documents (only .jsonl and .parquet records have fields)."""
    if prompt_field is not None and source.format in ("hf", "txt"):
        raise DataeffError(f"data.prompt_field={prompt_field!r} needs .jsonl or .parquet records; {source.location} "
                           f"is {source.format}")
    if source.format == "hf":
        docs: list[Document] = list(_read_hf(source, text_field, cache_dir))
        if not docs:
            raise DataeffError(f"hf:{source.location} split {source.hf_split!r}: no documents (empty or whitespace-only)")
        return docs
    docs = []
    for path in _files(source):
        fmt = _file_format(path, source.format)
        if fmt == "txt":
            if prompt_field is not None:
                raise DataeffError(f"data.prompt_field={prompt_field!r} needs .jsonl or .parquet records; {path} is text")
            docs.extend(split_text(_read_text(path), source.separator, source.drop_tail))
        elif fmt == "jsonl":
            docs.extend(_read_jsonl(path, text_field, prompt_field))
        else:
            docs.extend(_read_parquet(path, text_field, prompt_field))
    if not docs:
        raise DataeffError(f"{source.location}: no documents (empty or whitespace-only)")
    return docs


def read_path(path: str | Path, format: Format = "auto", separator: str = "blank_line", text_field: str = "text") -> list[str]:
    """Documents of a local file or directory (for evaluating on text outside the corpus)."""
    return read_source(Source(str(Path(path).expanduser()), format, separator), text_field)


# ---------------------------------------------------------------------------------------------------------
# splits


def holdout(docs: list[Document], cfg: DataConfig) -> tuple[list[Document], list[Document]]:
    """A seeded document-level split into (train, val); both keep the documents' original order."""
    n = len(docs)
    k = cfg.val_docs if cfg.val_docs is not None else max(1, math.ceil(cfg.val_fraction * n))
    if k >= n:
        raise DataeffError(
            f"data.corpus={cfg.corpus!r}: holding out {k} of its {n} documents for validation leaves none to train "
            "on; lower data.val_docs or data.val_fraction, or set data.val_split"
        )
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(cfg.split_seed).permutation(n)[:k]] = True
    return [d for d, h in zip(docs, held, strict=True) if not h], [d for d, h in zip(docs, held, strict=True) if h]


def load_documents(cfg: DataConfig) -> dict[str, list[Document]]:
    """Documents of every split: "train", "val", and "test" when the corpus has one."""
    docs = {split: read_source(src, cfg.text_field, cfg.cache_dir, cfg.prompt_field)
            for split, src in resolve_sources(cfg).items()}
    if "val" not in docs:
        docs["train"], docs["val"] = holdout(docs["train"], cfg)
    return docs


# ---------------------------------------------------------------------------------------------------------
# identity


_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The file's sha256, cached while its size and modification time stay the same: identities of runs and
    stores hash their inputs on every call, and a process asks for the same corpus many times."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        with open(path, "rb") as f:
            _SHA256[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _SHA256[key]


def corpus_fingerprint(cfg: DataConfig) -> str:
    """A hash of what the corpus's documents are read from: file contents, or an HF dataset's name/config/split."""
    described: dict[str, Any] = {}
    for split, source in resolve_sources(cfg).items():
        entry: dict[str, Any] = dataclasses.asdict(source)
        if source.format == "hf":
            # Local builder files are hashed by content; a hub dataset can only be named.
            if source.hf_data_files is not None:
                entry["hf_data_files"] = {p: file_sha256(Path(p)) for p in sorted(glob.glob(source.hf_data_files))}
        else:
            root = Path(source.location)
            entry["location"] = {
                str(p.relative_to(root)) if p != root else p.name: file_sha256(p) for p in _files(source)
            }
        described[split] = entry
    blob = json.dumps(described, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
