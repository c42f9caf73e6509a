"""``dataeff pairs``: nearest-neighbour pairs of documents for Synthetic Bootstrapped Pretraining.

Every pairable document (at least ``embed.min_words`` words) is a query for its ``k`` nearest other documents
by inner product of unit embeddings (cosine similarity). The search is exact (faiss ``IndexFlatIP``) up to
``exact_below`` documents and approximate above (IVF by default, or HNSW), or as ``index`` says;
:func:`knn_numpy` is the brute-force reference. A neighbour becomes a pair when its similarity is above
``alpha``; pairs are then dropped as near-duplicates, counted by reason:

- ``similarity``: similarity above ``dup_similarity`` (near-identical meaning: copying, not a new document);
- ``text``: the texts' word-shingle Jaccard similarity at least ``jaccard`` (an LSH band match of MinHash
  signatures confirmed by the true Jaccard, as :class:`dataeff.synth.dedup.NearDup` decides).

Output, written to a temporary directory and renamed into place (so a directory that exists is complete):

- ``pairs.parquet``: one row per directed pair, columns ``i``, ``j`` (int64 document indices of the split),
  ``similarity`` (float32) and ``rank`` (int16, 1 = ``j`` is ``i``'s nearest neighbour), sorted by ``i``
  then ``rank``. A row means "``j`` is among ``i``'s k nearest". Similarity is symmetric but top-k is not, so
  ``(j, i)`` is present only when ``i`` is also among ``j``'s k nearest (``pair_stats.json`` counts these
  mutual pairs); the filters are symmetric, so they never keep one direction of a mutual pair and drop the
  other. For training a synthesizer on p(d2 | d1), read ``i`` as d1 and ``j`` as d2.
- ``pair_stats.json``: the embeddings' identity (store, split, model, window), k, alpha, the thresholds,
  the index type and its parameters, counts (documents, pairable, with at least one pair, pairs, mutual,
  near-duplicates by reason), and the similarity histogram and quantiles of all searched neighbours and of
  the kept pairs.
- ``pair_similarity.png``: that histogram, with alpha and the duplicate threshold marked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from dataeff.config import option, section, to_dict
from dataeff.errors import DataeffError
from dataeff.synth.dedup import NearDup, jaccard, shingles
from dataeff.synth.embed import (
    EmbedConfig,
    Embeddings,
    describe,
    document_text,
    embed,
    identity,
    load_embeddings,
    open_store,
    same_identity,
)

IndexKind = Literal["auto", "flat", "hnsw", "ivf"]
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
HIST_BINS = np.linspace(-1.0, 1.0, 81)
# Queries per faiss search call: small enough for a moving progress bar, large enough to batch well.
_QUERY_BLOCK = 4096
_IVF_ITERATIONS = 10
_IVF_POINTS_PER_CENTROID = 64


@dataclass
class PairsConfig:
    embed: EmbedConfig = section(EmbedConfig, "the embeddings to pair: store, split, model, window (embedded first "
                                              "if not cached); embed.min_words also decides who is pairable")
    embeddings: str | None = option(None, "an existing embeddings directory to pair instead of embed's cache; "
                                          "refused unless made by the model and for the store that embed names")
    k: int = option(10, "neighbours searched per document")
    alpha: float = option(0.75, "keep neighbours whose similarity (cosine) is above this")
    dup_similarity: float = option(0.97, "drop pairs above this similarity as near-duplicates")
    jaccard: float = option(0.8, "drop pairs whose texts' word-shingle Jaccard similarity is at least this")
    ngram: int = option(5, "words per shingle for the text near-duplicate check")
    num_perm: int = option(128, "MinHash permutations for the text near-duplicate check")
    seed: int = option(0, "MinHash seed")
    index: IndexKind = option("auto", "flat (exact), ivf or hnsw (approximate); auto: flat up to exact_below "
                                      "documents, ivf above (bench/ann_pairs.py compares them)")
    exact_below: int = option(50_000, "auto: the exact index up to this many pairable documents")
    hnsw_m: int = option(16, "hnsw: links per node")
    hnsw_ef_construction: int = option(40, "hnsw: candidate list size while building")
    hnsw_ef_search: int = option(48, "hnsw: candidate list size while searching (at least k + 1)")
    ivf_nlist: int = option(0, "ivf: coarse clusters (0: 4·sqrt(n))")
    ivf_nprobe: int = option(16, "ivf: clusters visited per query")
    threads: int = option(0, "faiss threads (0: faiss's default, all cores)")
    out: str | None = option(None, "output directory (default: <embeddings dir>/pairs-<hash of these settings>)")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if not -1.0 <= self.alpha < 1.0:
            raise ValueError(f"alpha must be in [-1, 1), got {self.alpha}")
        if not self.alpha < self.dup_similarity <= 1.0:
            raise ValueError(f"dup_similarity={self.dup_similarity} must be above alpha={self.alpha} and at most 1")
        if not 0.0 < self.jaccard <= 1.0:
            raise ValueError(f"jaccard must be in (0, 1], got {self.jaccard}")
        for name in ("ngram", "num_perm", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.ivf_nlist < 0 or self.threads < 0 or self.exact_below < 0:
            raise ValueError("ivf_nlist, threads and exact_below must be 0 or more")


# ---------------------------------------------------------------------------------------------------------
# search


def _drop_self(sims: np.ndarray, ids: np.ndarray, self_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` results of each row that are not the query itself (nor faiss's -1 "no result")."""
    sims = sims.astype(np.float32, copy=True)
    bad = (ids == self_ids[:, None]) | (ids < 0)
    sims[bad] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    sims, ids = np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)
    ids[~np.isfinite(sims)] = -1
    return sims, ids


def knn_numpy(x: np.ndarray, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` other rows of ``x`` by inner product, best first: the brute-force reference.

    Returns (similarities float32, indices int64), both (n, k); ties are broken by the lower index.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    k_eff = min(k + 1, n)
    sims = np.empty((n, k_eff), dtype=np.float32)
    ids = np.empty((n, k_eff), dtype=np.int64)
    for start in range(0, n, block):
        scores = x[start : start + block] @ x.T
        part = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
        top = np.take_along_axis(scores, part, 1)
        # Sort by score, then index, so the result does not depend on argpartition's internal order.
        order = np.lexsort((part, -top), axis=1)
        sims[start : start + block] = np.take_along_axis(top, order, 1)
        ids[start : start + block] = np.take_along_axis(part, order, 1)
    return _drop_self(sims, ids, np.arange(n), k)


def choose_index(n: int, cfg: PairsConfig) -> Literal["flat", "hnsw", "ivf"]:
    if cfg.index != "auto":
        return cfg.index
    # IVF over HNSW: on a CPU it builds several times faster at equal recall on clustered embeddings.
    return "flat" if n <= cfg.exact_below else "ivf"


def build_index(x: np.ndarray, kind: Literal["flat", "hnsw", "ivf"], cfg: PairsConfig) -> tuple[Any, dict[str, Any]]:
    """A faiss inner-product index over ``x`` (float32, C order), and the parameters it was built with."""
    import faiss

    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        params: dict[str, Any] = {}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
        index.hnsw.efSearch = max(cfg.hnsw_ef_search, cfg.k + 1)
        params = {"m": cfg.hnsw_m, "ef_construction": cfg.hnsw_ef_construction, "ef_search": index.hnsw.efSearch}
    else:
        nlist = cfg.ivf_nlist or max(1, min(n // 39, round(4 * np.sqrt(n))))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        # Training is k-means over the sample: with faiss's defaults (256 points per centroid, 25 iterations)
        # it costs a third of an exact all-pairs search at 100k vectors. Coarse cells need far less: 64 points
        # per centroid (faiss warns below 39) and 10 iterations lose no recall (bench/ann_pairs.py).
        index.cp.niter = _IVF_ITERATIONS
        per_centroid = _IVF_POINTS_PER_CENTROID * nlist
        sample = x if n <= per_centroid else x[np.random.default_rng(cfg.seed).choice(n, per_centroid, replace=False)]
        index.train(sample)
        index.nprobe = min(cfg.ivf_nprobe, nlist)
        params = {"nlist": nlist, "nprobe": index.nprobe}
    index.add(x)
    return index, params


def knn_faiss(x: np.ndarray, cfg: PairsConfig, kind: Literal["flat", "hnsw", "ivf"] | None = None,
              progress: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Top-``cfg.k`` other rows of ``x`` by inner product with a faiss index: (similarities, indices, info)."""
    import faiss

    if cfg.threads:
        faiss.omp_set_num_threads(cfg.threads)
    x = np.ascontiguousarray(x, dtype=np.float32)
    kind = kind or choose_index(len(x), cfg)
    started = time.perf_counter()
    index, params = build_index(x, kind, cfg)
    built = time.perf_counter()
    k_eff = min(cfg.k + 1, len(x))
    sims = np.empty((len(x), k_eff), dtype=np.float32)
    ids = np.empty((len(x), k_eff), dtype=np.int64)
    with tqdm(total=len(x), desc=f"search ({kind})", unit="doc", disable=not progress) as bar:
        for start in range(0, len(x), _QUERY_BLOCK):
            stop = min(start + _QUERY_BLOCK, len(x))
            sims[start:stop], ids[start:stop] = index.search(x[start:stop], k_eff)
            bar.update(stop - start)
    sims, ids = _drop_self(sims, ids, np.arange(len(x)), cfg.k)
    info = {"type": kind, **params, "build_s": round(built - started, 3),
            "search_s": round(time.perf_counter() - built, 3)}
    return sims, ids, info


# ---------------------------------------------------------------------------------------------------------
# filtering


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    q = np.quantile(values, QUANTILES)
    return {f"p{round(p * 100):02d}": round(float(v), 4) for p, v in zip(QUANTILES, q, strict=True)}


def _histogram(values: np.ndarray) -> dict[str, list[float] | list[int]]:
    counts, edges = np.histogram(np.clip(values, -1.0, 1.0), bins=HIST_BINS)
    return {"edges": [round(float(e), 3) for e in edges], "counts": counts.tolist()}


def no_pairs_message(best: np.ndarray, alpha: float, n_docs: int) -> str:
    """Why α kept nothing, with the distribution of each document's best neighbour so α can be chosen."""
    q = np.quantile(best, (0.5, 0.9, 0.99, 1.0))
    ladder = sorted(set(np.round(np.quantile(best, (0.5, 0.75, 0.9)), 2).tolist()))
    keeps = ", ".join(f"alpha={a:.2f} keeps {int((best > a).sum())}" for a in ladder)
    return (f"pairs: no neighbour has similarity above alpha={alpha}; of {n_docs} pairable documents, the best "
            f"neighbour's similarity has median {q[0]:.3f}, p90 {q[1]:.3f}, p99 {q[2]:.3f}, max {q[3]:.3f} "
            f"({keeps} documents with a pair); lower alpha")


class TextDuplicates:
    """:meth:`dataeff.synth.dedup.NearDup.pair_is_duplicate` for pairs of documents, with each document's
    shingle set and MinHash signature computed once rather than once per pair it is in.

    The verdict is NearDup's: the true Jaccard of the shingle sets is at least τ and the signatures agree on
    a whole LSH band (tests check the two agree). Jaccard comes first, as it is the cheaper test and most
    neighbours are not duplicates; a signature is only computed for a document in a pair that passes it.
    """

    def __init__(self, text: Callable[[int], str], threshold: float, ngram: int, num_perm: int, seed: int):
        self.near_dup = NearDup(threshold=threshold, ngram=ngram, num_perm=num_perm, seed=seed)
        self.text = text
        self._shingles: dict[int, frozenset[int]] = {}
        self._bands: dict[int, np.ndarray] = {}

    def _shingles_of(self, d: int) -> frozenset[int]:
        if d not in self._shingles:
            self._shingles[d] = shingles(self.text(d), self.near_dup.config.ngram)
        return self._shingles[d]

    def _bands_of(self, d: int) -> np.ndarray:
        if d not in self._bands:
            bands, rows = self.near_dup.bands, self.near_dup.rows
            values = self.near_dup.signature(self.text(d)).hashvalues[: bands * rows]
            self._bands[d] = values.reshape(bands, rows)
        return self._bands[d]

    def __call__(self, a: int, b: int) -> bool:
        if jaccard(self._shingles_of(a), self._shingles_of(b)) < self.near_dup.config.threshold:
            return False
        return bool((self._bands_of(a) == self._bands_of(b)).all(axis=1).any())


def find_pairs(
    x: np.ndarray,
    pairable: np.ndarray,
    cfg: PairsConfig,
    text: Callable[[int], str],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Pairs of documents among the rows of ``x`` (unit vectors) whose ``pairable`` flag is set.

    ``text(i)`` gives document ``i``'s text for the text near-duplicate check. Returns the pair columns
    (i, j, similarity, rank; document indices into ``x``) and the statistics for ``pair_stats.json``.
    """
    candidates = np.flatnonzero(pairable)
    n = len(candidates)
    if n <= cfg.k:
        raise DataeffError(f"pairs: k={cfg.k} neighbours per document needs more than {cfg.k} pairable documents; "
                           f"there are {n} of {len(x)} ({len(x) - n} have fewer than min_words words); lower k")
    sims, local, info = knn_faiss(x[candidates], cfg, progress=cfg.progress)
    found = local >= 0
    best = np.where(found[:, 0], sims[:, 0], -1.0)
    rank = np.broadcast_to(np.arange(1, cfg.k + 1, dtype=np.int16), sims.shape)
    keep = found & (sims > cfg.alpha)
    if not keep.any():
        raise DataeffError(no_pairs_message(best, cfg.alpha, n))
    rows = np.nonzero(keep)
    i, j = candidates[rows[0]], candidates[local[rows]]
    sim, rnk = sims[rows], rank[rows]

    too_similar = sim > cfg.dup_similarity
    is_duplicate = TextDuplicates(text, cfg.jaccard, cfg.ngram, cfg.num_perm, cfg.seed)
    verdicts: dict[tuple[int, int], bool] = {}
    text_dup = np.zeros(len(i), dtype=bool)
    for t in tqdm(np.flatnonzero(~too_similar), desc="near-duplicates", unit="pair", disable=not cfg.progress):
        a, b = int(i[t]), int(j[t])
        key = (min(a, b), max(a, b))  # one verdict for both directions: the check is symmetric
        if key not in verdicts:
            verdicts[key] = is_duplicate(a, b)
        text_dup[t] = verdicts[key]
    kept = ~too_similar & ~text_dup
    if not kept.any():
        raise DataeffError(f"pairs: all {len(i)} neighbours above alpha={cfg.alpha} are near-duplicates "
                           f"({int(too_similar.sum())} by similarity > {cfg.dup_similarity}, {int(text_dup.sum())} "
                           f"by text Jaccard ≥ {cfg.jaccard}); nothing is left to pair")
    columns = {"i": i[kept].astype(np.int64), "j": j[kept].astype(np.int64),
               "similarity": sim[kept].astype(np.float32), "rank": rnk[kept].astype(np.int16)}
    edges = set(zip(columns["i"].tolist(), columns["j"].tolist(), strict=True))
    mutual = sum((b, a) in edges for a, b in edges)
    stats = {
        "k": cfg.k,
        "alpha": cfg.alpha,
        "dup_similarity": cfg.dup_similarity,
        "jaccard": cfg.jaccard,
        "ngram": cfg.ngram,
        "num_perm": cfg.num_perm,
        "index": info,
        "n_docs": len(x),
        "n_pairable": n,
        "n_docs_with_pair": len(np.unique(columns["i"])),
        "n_pairs": len(columns["i"]),
        "n_mutual_pairs": mutual,
        "both_directions": "a row (i, j) means j is among i's k nearest; (j, i) is present only when i is also "
                           "among j's k nearest (n_mutual_pairs rows are such pairs)",
        "near_duplicates": {"similarity": int(too_similar.sum()), "text": int(text_dup.sum())},
        "neighbour_similarity": {"quantiles": _quantiles(sims[found]), "histogram": _histogram(sims[found])},
        "best_neighbour_quantiles": _quantiles(best),
        "pair_similarity": {"quantiles": _quantiles(columns["similarity"]),
                            "histogram": _histogram(columns["similarity"])},
    }
    return columns, stats


# ---------------------------------------------------------------------------------------------------------
# the command


def _embeddings(cfg: PairsConfig) -> Embeddings:
    if cfg.embeddings is None:
        return embed(cfg.embed)
    found = load_embeddings(cfg.embeddings)
    expected = identity(cfg.embed)
    if not same_identity(found.manifest, expected):
        raise DataeffError(f"pairs: {cfg.embeddings} holds embeddings of {describe(found.manifest)}, but this config "
                           f"names {describe(expected)}; set embed.* to match or point embeddings elsewhere")
    return found


def _settings(cfg: PairsConfig) -> dict[str, Any]:
    data = to_dict(cfg)
    for key in ("embed", "embeddings", "out", "progress", "threads"):
        data.pop(key)
    return {**data, "min_words": cfg.embed.min_words}


def _figure(stats: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for key, label in (("neighbour_similarity", f"all {stats['k']} nearest"), ("pair_similarity", "kept pairs")):
        hist = stats[key]["histogram"]
        ax.stairs(hist["counts"], hist["edges"], label=label, fill=key == "pair_similarity", alpha=0.6)
    ax.axvline(stats["alpha"], color="k", linestyle="--", label=f"alpha {stats['alpha']}")
    ax.axvline(stats["dup_similarity"], color="r", linestyle=":", label=f"duplicate {stats['dup_similarity']}")
    lowest = stats["neighbour_similarity"]["quantiles"]["p00"]
    ax.set_xlim(max(-1.0, lowest - 0.05), 1.0)
    ax.set_yscale("log")  # the kept pairs are often a small tail of all neighbours
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("neighbours")
    ax.set_title(f"{stats['n_pairs']} pairs, {stats['n_docs_with_pair']} of {stats['n_pairable']} documents paired")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)


def pairs(cfg: PairsConfig) -> Path:
    """Find, filter and write the pairs; return the output directory (reused if it already exists)."""
    embeddings = _embeddings(cfg)
    settings = _settings(cfg)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(cfg.out) if cfg.out else embeddings.directory / f"pairs-{key}"
    if (out / "pair_stats.json").exists():
        _, previous = read_pairs(out)
        if previous.get("settings") != settings or not same_identity(previous["embeddings"], embeddings.manifest):
            raise DataeffError(f"pairs: {out} holds pairs of other embeddings or settings (see its pair_stats.json); "
                               "set out elsewhere or delete it")
        return out
    prepared = open_store(cfg.embed)
    split = prepared.split(embeddings.manifest["store"]["split"])
    x = np.asarray(embeddings, dtype=np.float32)
    columns, stats = find_pairs(x, embeddings.n_words >= cfg.embed.min_words, cfg,
                                lambda d: document_text(split, prepared.tokenizer, d))
    stats = {"embeddings": {**embeddings.identity, "directory": str(embeddings.directory.resolve())},
             "settings": settings, "min_words": cfg.embed.min_words, **stats}
    _write(out, columns, stats)
    return out


def _write(out: Path, columns: dict[str, np.ndarray], stats: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        pq.write_table(pa.table(columns), tmp / "pairs.parquet")
        (tmp / "pair_stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _figure(stats, tmp / "pair_similarity.png")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should be like any directory
        if out.exists():
            shutil.rmtree(out)  # no pair_stats.json: left by something else, never by a finished run
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_pairs(directory: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The pair columns and statistics of a ``dataeff pairs`` output directory."""
    import pyarrow.parquet as pq

    directory = Path(directory)
    if not (directory / "pair_stats.json").exists():
        raise DataeffError(f"{directory}: not a pairs directory (no pair_stats.json); run `dataeff pairs`")
    table = pq.read_table(directory / "pairs.parquet")
    stats = json.loads((directory / "pair_stats.json").read_text(encoding="utf-8"))
    return {name: table.column(name).to_numpy() for name in table.column_names}, stats
