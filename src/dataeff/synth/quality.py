"""Quality metrics of a synthetic corpus, beside real text as the reference row (SBP Table: real data 1.8%
repetition, 0.7% duplicates), written to ``quality.json`` and printed as a Markdown table.

Every metric is defined in ``docs/synthetic_quality.md``; in short, per document of a seeded sample:

- **repetition**: the document holds a sampling loop: a span made of at least ``min_copies`` back-to-back copies
  of one unit of 1..``max_period`` words, at least ``min(min_span, max(min_words, ⌈share·m⌉))`` words long, m
  the document's length in words (30 words, or half of a short document);
- **duplicates**: the document is dropped by :meth:`NearDup.find` (an exact or confirmed near duplicate of an
  earlier document of the sample);
- **reference copies** (a reference corpus): the document is an exact or near duplicate of a reference document
  (copying checked against the whole real corpus, not only the seed);
- **pair-copying** (pairs): the document and its seed share a common span of words at least
  ``min(span_words, max(min_words, ⌈share·m⌉))`` long, m the shorter document's length in words;
- **pair-irrelevance** (pairs and an ``encode`` function): cosine of the seed and document embeddings below α;
- **non-factual** (a ``judge`` function): the judge says the document states something false;
- **source overlap** (EntiGraph Table 4): of all word n-grams of the documents (n = 2, 4, 8, 16), the share
  that also occur in the source: each document's own seed when there are pairs, else the reference corpus.

Shares are counts of documents with a Wilson 95% interval. A metric that does not apply to a row (pair
metrics of real text) or was not measured (no judge, no encoder) is None with the reason in ``notes``, never 0.
Words are those of :func:`dataeff.synth.dedup.normalize`.

A synthetic corpus is JSONL: one object per line with a string ``text`` field (name set by ``text_field``), and
optionally the text of its seed document in ``seed_text`` (or ``seed``, when that is a string); other fields
(provenance) are ignored. A whitespace-only text is counted as empty and left out of every metric.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from dataeff.config import option, section, to_dict
from dataeff.data.config import DataConfig
from dataeff.data.corpora import read_source, resolve_sources
from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_write_text, json_records
from dataeff.synth.dedup import NearDup, NearDupConfig, ngram_hashes, word_hashes, words

Encode = Callable[[Sequence[str]], np.ndarray]
Judge = Callable[[str, str], "bool | None"]

_SEED_FIELDS = ("seed_text", "seed")


# ---------------------------------------------------------------------------------------------------------
# configs


@dataclass
class RepetitionConfig:
    min_copies: int = option(3, "back-to-back copies of one unit that make a loop")
    max_period: int = option(50, "longest unit, in words, a loop may repeat")
    min_span: int = option(30, "a loop covering this many words counts, whatever the document's length")
    share: float = option(0.5, "or a loop covering this share of the document's words ...")
    min_words: int = option(12, "... but never fewer words than this (so 'no, no, no!' does not count)")

    def __post_init__(self) -> None:
        if self.min_copies < 2:
            raise ValueError(f"min_copies must be at least 2, got {self.min_copies}")
        if self.max_period < 1 or self.min_span < 1 or self.min_words < 1:
            raise ValueError("max_period, min_span and min_words must be at least 1")
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {self.share}")


@dataclass
class CopyingConfig:
    span_words: int = option(50, "a common span of this many words is a copy, whatever the lengths")
    share: float = option(0.5, "or a common span of this share of the shorter document's words ...")
    min_words: int = option(8, "... but never fewer words than this")

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {self.share}")
        if self.span_words < 1 or self.min_words < 1:
            raise ValueError("span_words and min_words must be at least 1")


@dataclass
class QualityConfig:
    synthetic: list[str] = option([], "synthetic corpora (JSONL with a 'text' field, optional 'seed_text'); one row each")
    text_field: str = option("text", "the text field of the synthetic records")
    reference: str | None = option(
        None,
        "real text for the reference row: a named corpus (tinystories, wikitext2, tinyshakespeare), a "
        ".txt/.jsonl/.parquet file or directory, or hf:<name>; null = no reference row",
    )
    reference_split: str = option("train", "the split of the reference corpus (train, or val/test where it has them)")
    reference_format: Literal["auto", "txt", "jsonl", "parquet", "hf"] = option("auto", "the reference file's format")
    reference_separator: str = option("auto", "how a .txt reference splits into documents (as data.separator)")
    reference_field: str = option("text", "the text field of a .jsonl/.parquet reference")
    sample: int | None = option(10_000, "documents per corpus, drawn with the seed (all if fewer; null = all); "
                                        "duplicates are counted within this sample")
    seed: int = option(0, "seed of the document sample", min=0)
    repetition: RepetitionConfig = section(RepetitionConfig, "repetition: sampling loops")
    dedup: NearDupConfig = section(NearDupConfig, "duplicates: near-duplicate detection")
    copying: CopyingConfig = section(CopyingConfig, "pair-copying: a long span shared with the seed")
    alpha: float = option(0.3, "pair-irrelevance: cosine similarity of seed and document below which they are unrelated")
    overlap_n: list[int] = option([2, 4, 8, 16], "source overlap: word n-gram lengths")
    encoder: str | None = option(None, "pair-irrelevance: module:function of encode(texts) -> unit-norm rows; null = not measured")
    judge: str | None = option(None, "non-factual: module:function of judge(seed_or_source, text) -> True if non-factual, "
                                     "False if factual, None to abstain; null = not measured")
    judge_docs: int = option(200, "non-factual: documents of each sample the judge reads")
    out: str = option("quality.json", "the report written")
    progress: bool = option(True, "progress bars")

    def __post_init__(self) -> None:
        if self.sample is not None and self.sample < 1:
            raise ValueError(f"sample must be at least 1 (or null for all), got {self.sample}")
        if not -1.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha is a cosine similarity in [-1, 1], got {self.alpha}")
        if not self.overlap_n or min(self.overlap_n) < 1:
            raise ValueError(f"overlap_n must be n-gram lengths of at least 1, got {self.overlap_n}")
        if self.judge_docs < 1:
            raise ValueError(f"judge_docs must be at least 1, got {self.judge_docs}")


# ---------------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Share:
    """``count`` of ``total`` documents, with a Wilson 95% interval."""

    count: int
    total: int

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ValueError("a share of no documents is not a measurement")
        if not 0 <= self.count <= self.total:
            raise ValueError(f"count {self.count} is not between 0 and total {self.total}")

    @property
    def value(self) -> float:
        return self.count / self.total

    @property
    def ci95(self) -> tuple[float, float]:
        from scipy.stats import binomtest

        ci = binomtest(self.count, self.total).proportion_ci(0.95, method="wilson")
        return float(ci.low), float(ci.high)

    def to_dict(self) -> dict[str, Any]:
        low, high = self.ci95
        return {"count": self.count, "total": self.total, "share": self.value, "ci95": [low, high]}

    def cell(self) -> str:
        low, high = self.ci95
        return f"{100 * self.value:.1f}% [{100 * low:.1f}, {100 * high:.1f}] of {self.total}"


@dataclass(frozen=True)
class Overlap:
    """Word n-grams of the documents that occur in the source, per n: (matched, total)."""

    against: Literal["seed", "reference"]
    counts: dict[int, tuple[int, int]]

    def share(self, n: int) -> float | None:
        matched, total = self.counts[n]
        return matched / total if total else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "against": self.against,
            "n": {str(n): {"matched": m, "total": t, "share": self.share(n)} for n, (m, t) in self.counts.items()},
        }


@dataclass(frozen=True)
class QualityRow:
    """One corpus's metrics. A None metric has its reason in ``notes``."""

    name: str
    kind: Literal["real", "synthetic"]
    docs: int
    empty: int
    sampled: int
    pairs: int
    median_words: float | None
    repetition: Share | None
    duplicates: Share | None
    reference_copies: Share | None
    pair_copying: Share | None
    pair_irrelevance: Share | None
    non_factual: Share | None
    source_overlap: Overlap | None
    notes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "docs": self.docs, "empty": self.empty, "sampled": self.sampled,
            "pairs": self.pairs, "median_words": self.median_words,
        }
        for key in _METRICS:
            value = getattr(self, key)
            out[key] = value.to_dict() if value is not None else None
        out["notes"] = dict(self.notes)
        return out


_METRICS = ("repetition", "duplicates", "reference_copies", "pair_copying", "pair_irrelevance", "non_factual", "source_overlap")


@dataclass(frozen=True)
class QualityReport:
    rows: list[QualityRow]
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        out = {"rows": [r.to_dict() for r in self.rows], "config": self.config}
        # Strict JSON: a NaN or infinity here is a bug, refused rather than written.
        json.dumps(out, allow_nan=False)
        return out

    def to_markdown(self) -> str:
        ns = sorted({n for r in self.rows if r.source_overlap for n in r.source_overlap.counts})
        head = ["corpus", "sampled", "repetition", "duplicates", "reference copies", "pair-copying", "pair-irrelevance",
                "non-factual"]
        head += [f"overlap {n}-gram" for n in ns]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [f"{r.name} ({r.kind})", f"{r.sampled} of {r.docs}"]
            for key in _METRICS[:-1]:
                value = getattr(r, key)
                cells.append(value.cell() if value is not None else _short_note(r.notes.get(key, "")))
            for n in ns:
                if r.source_overlap is None or n not in r.source_overlap.counts:
                    cells.append(_short_note(r.notes.get("source_overlap", "")))
                else:
                    share = r.source_overlap.share(n)
                    cells.append("no n-grams" if share is None else f"{100 * share:.2f}%")
            lines.append("| " + " | ".join(cells) + " |")
        if any(r.source_overlap for r in self.rows):
            against = {r.source_overlap.against for r in self.rows if r.source_overlap}
            lines.append("")
            lines.append("Source overlap is measured against " + " and ".join(sorted(against)) + " documents.")
        return "\n".join(lines)


def _short_note(note: str) -> str:
    return note.split(":")[0] if note else "n/a"


# ---------------------------------------------------------------------------------------------------------
# per-document metrics


def loop_span(text: str, cfg: RepetitionConfig | None = None) -> int:
    """Words covered by the longest back-to-back repetition of one unit of 1..max_period words with at least
    min_copies copies (0 if there is none); the last copy may be cut short."""
    cfg = cfg or RepetitionConfig()
    ids = word_hashes(text)
    m = len(ids)
    best = 0
    for u in range(1, min(cfg.max_period, m // cfg.min_copies) + 1):
        same = ids[u:] == ids[:-u]
        need = (cfg.min_copies - 1) * u
        if np.count_nonzero(same) < need:
            continue
        # Words i..i+R+u-1 repeat with period u when same[i:i+R] all hold; keep the longest such run.
        edges = np.diff(np.concatenate(([0], same.view(np.int8), [0])))
        run = int((np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).max())
        if run >= need:
            best = max(best, run + u)
    return best


def loop_threshold(words_in_text: int, cfg: RepetitionConfig | None = None) -> int:
    """The loop span, in words, from which a document of this length is repetitive."""
    cfg = cfg or RepetitionConfig()
    return min(cfg.min_span, max(cfg.min_words, math.ceil(cfg.share * words_in_text)))


def is_repetitive(text: str, cfg: RepetitionConfig | None = None) -> bool:
    """Whether the text holds a sampling loop (see :func:`loop_span`) of at least :func:`loop_threshold` words."""
    cfg = cfg or RepetitionConfig()
    return loop_span(text, cfg) >= loop_threshold(len(words(text)), cfg)


def common_span(a: str, b: str) -> int:
    """The length in words of the longest run of words that ``a`` and ``b`` share."""
    ha, hb = word_hashes(a), word_hashes(b)
    lo, hi = 0, min(len(ha), len(hb))
    # Sharing a span of L words implies sharing one of every shorter length: binary search on L.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.isin(ngram_hashes(ha, mid), ngram_hashes(hb, mid)).any():
            lo = mid
        else:
            hi = mid - 1
    return lo


def copy_threshold(words_a: int, words_b: int, cfg: CopyingConfig | None = None) -> int:
    """The common span, in words, from which a document copies its seed."""
    cfg = cfg or CopyingConfig()
    return min(cfg.span_words, max(cfg.min_words, math.ceil(cfg.share * min(words_a, words_b))))


def is_copy(seed: str, text: str, cfg: CopyingConfig | None = None) -> bool:
    """Whether ``text`` shares a span with ``seed`` of at least :func:`copy_threshold` words."""
    threshold = copy_threshold(len(words(seed)), len(words(text)), cfg)
    return common_span(seed, text) >= threshold


# ---------------------------------------------------------------------------------------------------------
# corpus-level metrics


def sample_indices(n: int, size: int | None, seed: int) -> list[int]:
    """A seeded sample of ``size`` of ``range(n)`` (all of it if fewer or None), in ascending order."""
    if size is None or size >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=size, replace=False).tolist())


def repetition_share(texts: Sequence[str], cfg: RepetitionConfig | None = None, progress: bool = False) -> Share:
    bar = tqdm(texts, desc="repetition", unit="doc", disable=not progress, leave=False)
    return Share(sum(is_repetitive(t, cfg) for t in bar), len(texts))


def duplicate_share(texts: Sequence[str], cfg: NearDupConfig | None = None, progress: bool = False) -> Share:
    return Share(len(NearDup(cfg).find(texts, progress=progress).drop), len(texts))


def reference_copy_share(texts: Sequence[str], reference: Sequence[str], cfg: NearDupConfig | None = None,
                         progress: bool = False) -> Share:
    """Texts that are exact or near duplicates of a reference text."""
    return Share(NearDup(cfg).find(texts, against=reference, progress=progress).against, len(texts))


def copying_share(pairs: Sequence[tuple[str, str]], cfg: CopyingConfig | None = None, progress: bool = False) -> Share:
    """Pairs are (seed, text)."""
    bar = tqdm(pairs, desc="pair-copying", unit="pair", disable=not progress, leave=False)
    return Share(sum(is_copy(seed, text, cfg) for seed, text in bar), len(pairs))


def _embed(encode: Encode, texts: Sequence[str]) -> np.ndarray:
    rows = np.asarray(encode(texts), dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] != len(texts):
        raise DataeffError(f"encode returned an array of shape {rows.shape} for {len(texts)} texts; expected one row per text")
    norms = np.linalg.norm(rows, axis=1)
    if not np.all(np.isfinite(norms)) or np.abs(norms - 1).max() > 1e-3:
        raise DataeffError(f"encode must return unit-norm rows; got norms from {norms.min():.4g} to {norms.max():.4g}")
    return rows


def irrelevance_share(pairs: Sequence[tuple[str, str]], encode: Encode, alpha: float = 0.3,
                      batch: int = 256, progress: bool = False) -> Share:
    """Pairs whose seed and text embeddings have a cosine similarity below ``alpha``."""
    below = 0
    for start in tqdm(range(0, len(pairs), batch), desc="pair-irrelevance", unit="batch", disable=not progress, leave=False):
        chunk = pairs[start : start + batch]
        seeds = _embed(encode, [s for s, _ in chunk])
        texts = _embed(encode, [t for _, t in chunk])
        below += int(np.count_nonzero(np.einsum("ij,ij->i", seeds, texts) < alpha))
    return Share(below, len(pairs))


def non_factual_share(items: Sequence[tuple[str, str]], judge: Judge, progress: bool = False) -> tuple[Share | None, int]:
    """The judge's verdicts on (seed or source, text) items: the share judged non-factual among those it did not
    abstain on (None if it abstained on all), and the number of abstentions."""
    flagged = judged = abstained = 0
    for source, text in tqdm(items, desc="non-factual", unit="doc", disable=not progress, leave=False):
        verdict = judge(source, text)
        if verdict is None:
            abstained += 1
            continue
        if not isinstance(verdict, bool | np.bool_):
            raise DataeffError(f"judge returned {verdict!r}; expected True (non-factual), False (factual) or None")
        judged += 1
        flagged += bool(verdict)
    return (Share(flagged, judged) if judged else None), abstained


def _ngram_set(texts: Sequence[str], n: int) -> np.ndarray:
    grams = [ngram_hashes(word_hashes(t), n) for t in texts]
    return np.unique(np.concatenate(grams)) if grams else np.empty(0, dtype=np.uint64)


def _matched(grams: np.ndarray, source: np.ndarray) -> int:
    if grams.size == 0 or source.size == 0:
        return 0
    pos = np.searchsorted(source, grams).clip(max=source.size - 1)
    return int(np.count_nonzero(source[pos] == grams))


def source_overlap(texts: Sequence[str], ns: Sequence[int], sources: Sequence[str] | None = None,
                   seeds: Sequence[str] | None = None, progress: bool = False) -> Overlap:
    """Share of the texts' word n-grams (every occurrence) found in the source: each text's own seed
    (``seeds``, aligned with ``texts``), or else any of the ``sources`` documents."""
    if (sources is None) == (seeds is None):
        raise ValueError("give exactly one of sources (a reference corpus) and seeds (one per text)")
    counts: dict[int, tuple[int, int]] = {}
    for n in ns:
        matched = total = 0
        if seeds is not None:
            if len(seeds) != len(texts):
                raise ValueError(f"{len(seeds)} seeds for {len(texts)} texts")
            for seed, text in tqdm(list(zip(seeds, texts, strict=True)), desc=f"overlap {n}-grams", unit="pair",
                                   disable=not progress, leave=False):
                grams = ngram_hashes(word_hashes(text), n)
                matched += _matched(grams, _ngram_set([seed], n))
                total += grams.size
        else:
            assert sources is not None
            pool = _ngram_set(sources, n)
            for text in tqdm(texts, desc=f"overlap {n}-grams", unit="doc", disable=not progress, leave=False):
                grams = ngram_hashes(word_hashes(text), n)
                matched += _matched(grams, pool)
                total += grams.size
        counts[n] = (matched, total)
    return Overlap("seed" if seeds is not None else "reference", counts)


# ---------------------------------------------------------------------------------------------------------
# corpora and the table


@dataclass(frozen=True)
class Corpus:
    """Documents to measure; ``seeds[i]`` is the seed of ``texts[i]`` (None: no seed), or ``seeds`` is None."""

    name: str
    texts: list[str]
    seeds: list[str | None] | None = None
    empty: int = 0


def read_corpus(path: str | Path, text_field: str = "text", name: str | None = None) -> Corpus:
    """A synthetic JSONL corpus (see the module docstring); a malformed line is refused with its number."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataeffError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataeffError(f"{path}: is a directory; expected a .jsonl file") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataeffError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
    texts: list[str] = []
    seeds: list[str | None] = []
    empty = 0
    for loc, record in json_records(content, str(path)):
        if text_field not in record:
            raise DataeffError(f"{loc}: no field '{text_field}' (found: {', '.join(record) or 'none'})")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataeffError(f"{loc}: field '{text_field}' is {type(text).__name__}, expected a string")
        seed_field = next((f for f in _SEED_FIELDS if record.get(f) is not None), None)
        seed = record[seed_field] if seed_field else None
        if seed_field == "seed_text" and not isinstance(seed, str):
            raise DataeffError(f"{loc}: field 'seed_text' is {type(seed).__name__}, expected a string")
        if not isinstance(seed, str):
            seed = None  # a non-string "seed" is an id or a sampling seed, not the seed document
        if not text.strip():
            empty += 1
            continue
        texts.append(text.strip())
        seeds.append(seed)
    if not texts:
        raise DataeffError(f"{path}: no documents ({empty} empty texts)" if empty else f"{path}: no documents")
    return Corpus(name or path.stem, texts, seeds if any(s is not None for s in seeds) else None, empty)


def measure(corpus: Corpus, kind: Literal["real", "synthetic"], cfg: QualityConfig | None = None, *,
            reference: Sequence[str] | None = None, encode: Encode | None = None, judge: Judge | None = None) -> QualityRow:
    """One row of the table: every metric of ``corpus`` on its seeded sample of ``cfg.sample`` documents."""
    cfg = cfg or QualityConfig()
    progress = cfg.progress
    chosen = sample_indices(len(corpus.texts), cfg.sample, cfg.seed)
    texts = [corpus.texts[i] for i in chosen]
    seeds = [corpus.seeds[i] for i in chosen] if corpus.seeds is not None else [None] * len(texts)
    pairs = [(s, t) for s, t in zip(seeds, texts, strict=True) if s is not None]
    notes: dict[str, str] = {}

    copying = irrelevance = None
    if kind == "real":
        for key in ("pair_copying", "pair_irrelevance"):
            notes[key] = "n/a: real text has no seeds"
    elif not pairs:
        for key in ("pair_copying", "pair_irrelevance"):
            notes[key] = "n/a: no record has a seed_text"
    else:
        copying = copying_share(pairs, cfg.copying, progress)
        if encode is None:
            notes["pair_irrelevance"] = "not measured: no encoder"
        else:
            irrelevance = irrelevance_share(pairs, encode, cfg.alpha, progress=progress)

    non_factual = None
    if judge is None:
        notes["non_factual"] = "not measured: no judge"
    else:
        items = [(s or "", t) for s, t in zip(seeds, texts, strict=True)][: cfg.judge_docs]
        non_factual, abstained = non_factual_share(items, judge, progress)
        if non_factual is None:
            notes["non_factual"] = f"not measured: the judge abstained on all {abstained} documents"
        elif abstained:
            notes["non_factual"] = f"the judge abstained on {abstained} of {len(items)} documents"

    reference_copies = None
    if kind == "synthetic" and reference is not None:
        reference_copies = reference_copy_share(texts, reference, cfg.dedup, progress)
    else:
        notes["reference_copies"] = "n/a: the reference itself" if kind == "real" else "n/a: no reference"

    overlap = None
    if kind == "synthetic" and pairs:
        overlap = source_overlap([t for _, t in pairs], cfg.overlap_n, seeds=[s for s, _ in pairs], progress=progress)
    elif kind == "synthetic" and reference is not None:
        overlap = source_overlap(texts, cfg.overlap_n, sources=reference, progress=progress)
    else:
        notes["source_overlap"] = "n/a: the reference itself" if kind == "real" else "n/a: no seeds and no reference"

    return QualityRow(
        name=corpus.name, kind=kind, docs=len(corpus.texts), empty=corpus.empty, sampled=len(texts), pairs=len(pairs),
        median_words=float(np.median([len(words(t)) for t in texts])),
        repetition=repetition_share(texts, cfg.repetition, progress),
        duplicates=duplicate_share(texts, cfg.dedup, progress), reference_copies=reference_copies,
        pair_copying=copying, pair_irrelevance=irrelevance, non_factual=non_factual, source_overlap=overlap,
        notes=notes,
    )


def quality_table(synthetic: Sequence[Corpus], reference: Corpus | None = None, cfg: QualityConfig | None = None, *,
                  encode: Encode | None = None, judge: Judge | None = None) -> QualityReport:
    """The table: the real reference row first (when given), then one row per synthetic corpus."""
    cfg = cfg or QualityConfig()
    rows = []
    if reference is not None:
        rows.append(measure(reference, "real", cfg, judge=judge))
    ref_texts = reference.texts if reference is not None else None
    rows.extend(measure(c, "synthetic", cfg, reference=ref_texts, encode=encode, judge=judge) for c in synthetic)
    return QualityReport(rows, to_dict(cfg))


# ---------------------------------------------------------------------------------------------------------
# the command


def _import(spec: str, key: str) -> Callable[..., Any]:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise DataeffError(f"quality.{key}={spec!r}: expected module:function, e.g. mypkg.judges:judge")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise DataeffError(f"quality.{key}={spec!r}: cannot import ({e})") from None
    if not callable(obj):
        raise DataeffError(f"quality.{key}={spec!r}: {type(obj).__name__} is not callable")
    return obj


def read_reference(cfg: QualityConfig) -> Corpus:
    """The reference corpus's documents of ``cfg.reference_split``."""
    assert cfg.reference is not None
    data = DataConfig(corpus=cfg.reference, format=cfg.reference_format, separator=cfg.reference_separator,
                      text_field=cfg.reference_field)
    sources = resolve_sources(data)
    if cfg.reference_split not in sources:
        raise DataeffError(f"quality.reference_split={cfg.reference_split!r}: {cfg.reference} has splits "
                           f"{', '.join(sources)}")
    name = cfg.reference if cfg.reference in ("tinystories", "wikitext2", "tinyshakespeare") else Path(cfg.reference).stem
    return Corpus(f"{name}/{cfg.reference_split}", read_source(sources[cfg.reference_split], cfg.reference_field))


def run_quality(cfg: QualityConfig) -> QualityReport:
    """``dataeff quality``: measure, write ``cfg.out`` (strict JSON) and return the report."""
    if not cfg.synthetic and cfg.reference is None:
        raise DataeffError("quality: nothing to measure; set synthetic=[corpus.jsonl] and/or reference=...")
    corpora = [read_corpus(p, cfg.text_field) for p in cfg.synthetic]
    reference = read_reference(cfg) if cfg.reference is not None else None
    encode = _import(cfg.encoder, "encoder") if cfg.encoder else None
    judge = _import(cfg.judge, "judge") if cfg.judge else None
    report = quality_table(corpora, reference, cfg, encode=encode, judge=judge)
    atomic_write_text(cfg.out, json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    return report
