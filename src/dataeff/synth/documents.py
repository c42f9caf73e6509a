"""The source documents of the LLM-driven producers, each with a stable id, and the word-bounded chunks that
long documents are cut into.

An input is ``quality`` (the QuALITY articles under ``$DATAEFF_DATA_DIR/quality_leval_subset``, one document
per article), another named corpus (``tinystories``, ``wikitext2``, ``tinyshakespeare``: its train split), or a
.txt/.jsonl/.parquet file or directory (read as ``data.corpus`` reads it). A document's id is
``NAME:INDEX``, the index counting the input's non-empty documents in order, and ``NAME:INDEX#K`` for the
K-th section when ``split_words`` cuts long documents into sections.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from dataeff.data.config import DataConfig, Format
from dataeff.data.corpora import NAMED_CORPORA, Conditional, data_root, read_source, resolve_sources
from dataeff.errors import DataeffError

QUALITY = "quality"
QUALITY_FILE = "quality_leval_subset/quality.jsonl"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class SourceDocument:
    id: str
    text: str


def _quality_articles() -> list[str]:
    path = data_root() / QUALITY_FILE
    if not path.is_file():
        raise DataeffError(f"input=quality: {path} not found (the QuALITY subset of the shared data directory)")
    articles = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["input"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataeffError(f"{path}:{number}: expected a JSON object with the article in 'input'") from None
        # The L-Eval copy pads words with runs of spaces; single spaces, paragraphs kept.
        lines = [" ".join(row.split()) for row in text.split("\n")]
        articles.append(re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip())
    return articles


def read_documents(spec: str, *, text_field: str = "text", format: Format = "auto", separator: str = "auto",
                   split_words: int = 0, limit: int | None = None, setting: str = "input") -> list[SourceDocument]:
    """The documents of ``spec`` (see the module docstring): the first ``limit`` of them (all if None), each
    cut into sections of at most ``split_words`` words when that is above 0."""
    if not spec:
        raise DataeffError(f"{setting}: set the source documents: quality, a named corpus, or a .txt/.jsonl file")
    if spec == QUALITY:
        name, texts = QUALITY, _quality_articles()
    else:
        data = DataConfig(corpus=spec, format=format, separator=separator, text_field=text_field)
        docs = read_source(resolve_sources(data)["train"], text_field)
        texts = [d.text if isinstance(d, Conditional) else d for d in docs]
        name = spec if spec in NAMED_CORPORA else Path(spec).stem
    texts = texts[:limit] if limit is not None else texts
    out = []
    for i, text in enumerate(texts):
        if split_words and len(text.split()) > split_words:
            out.extend(SourceDocument(f"{name}:{i}#{k}", part) for k, part in enumerate(chunk_text(text, split_words)))
        else:
            out.append(SourceDocument(f"{name}:{i}", text))
    return out


def chunk_text(text: str, max_words: int) -> list[str]:
    """``text`` cut into consecutive chunks of at most ``max_words`` words, at sentence ends where it can be
    (a sentence longer than a chunk is cut between words). Joining the chunks with spaces gives the text's
    words in order."""
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, got {max_words}")
    chunks: list[str] = []
    current: list[str] = []
    count = 0
    for sentence in _SENTENCE_END.split(text.strip()):
        n = len(sentence.split())
        if n > max_words:
            if current:
                chunks.append(" ".join(current))
                current, count = [], 0
            words = sentence.split()
            chunks.extend(" ".join(words[i : i + max_words]) for i in range(0, n, max_words))
            continue
        if count + n > max_words and current:
            chunks.append(" ".join(current))
            current, count = [], 0
        current.append(sentence)
        count += n
    if current:
        chunks.append(" ".join(current))
    return [c for c in chunks if c.strip()]
