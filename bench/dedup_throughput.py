"""Near-duplicate search throughput: ``NearDup.find`` vs datasketch used as its README shows, on the same texts.

The texts are short documents of real TinyStories sentences (4-11 sentences drawn at random from the 2 MiB
training sample under ``DATAEFF_DATA_DIR``; about 75 words each), of which ``--planted`` share are copies of an
earlier document with one word replaced (true Jaccard of 5-word shingles about 0.9) and as many again exact
copies up to case and punctuation. Both sides use τ = 0.8, 5-word shingles and 128 permutations:

- ``find``: ``NearDup().find(texts)`` (hashed shingles fed to MinHash without rehashing, one MinHash copied per
  text, greedy LSH search confirmed by true Jaccard);
- ``baseline``: for each text, a ``MinHash()`` updated with the UTF-8 bytes of every shingle (datasketch's
  default SHA-1 hash), inserted into a ``MinHashLSH`` after querying it; a text with any candidate counts as a
  duplicate (no confirmation), which is what "MinHash dedup" does in most pipelines.

Each side runs ``--repeats`` times alternately so that a burst of load on the shared machine hits both; the
ratio is the median over repeats of baseline time / find time. The last line is one JSON object: docs,
find_s, find_docs_per_s, baseline_s, speedup, and for both sides the recall of the duplicates due (exact copies,
and planted copies whose true Jaccard with their original is at least τ) and the spurious drops (texts dropped
that are none of the planted copies).

    python bench/dedup_throughput.py                 # 100k documents: a few minutes
    python bench/dedup_throughput.py --docs 20000    # quick
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import numpy as np
from datasketch import MinHash, MinHashLSH

from dataeff.data import data_root, split_text
from dataeff.synth.dedup import NearDup, jaccard, shingles, words


def make_texts(n: int, planted: float, seed: int = 0) -> tuple[list[str], dict[int, int], set[int]]:
    """``n`` documents of random real sentences, with planted near copies ({copy: original}) and exact copies."""
    text = (data_root() / "tinystories" / "train_sample_2MiB.txt").read_text(encoding="utf-8")
    sentences = [s for d in split_text(text, "<|endoftext|>", True) for s in re.split(r"(?<=[.!?])\s+", d) if s]
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    near: dict[int, int] = {}
    exact: set[int] = set()
    for i in range(n):
        roll = rng.random()
        if i > 0 and roll < planted:
            original = int(rng.integers(0, i))
            ws = texts[original].split()
            ws[int(rng.integers(0, len(ws)))] = "zebra"
            texts.append(" ".join(ws))
            near[i] = original
        elif i > 0 and roll < 2 * planted:
            texts.append(texts[int(rng.integers(0, i))].upper())
            exact.add(i)
        else:
            k = int(rng.integers(4, 12))
            texts.append(" ".join(sentences[j] for j in rng.integers(0, len(sentences), k)))
    return texts, near, exact


def baseline(texts: list[str]) -> set[int]:
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    dropped = set()
    for i, t in enumerate(texts):
        ws = words(t)
        grams = [" ".join(ws[j : j + 5]).encode() for j in range(max(len(ws) - 4, 1))]
        m = MinHash(num_perm=128, seed=0)
        m.update_batch(grams)
        if lsh.query(m):
            dropped.add(i)
        else:
            lsh.insert(i, m)
    return dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--planted", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    texts, near, exact = make_texts(args.docs, args.planted)
    # Planted copies whose true Jaccard with their original reaches τ are duplicates by definition; those of
    # short documents (one changed word moves 5 of few shingles) fall below τ and count on neither side.
    sim = {i: jaccard(shingles(texts[i]), shingles(texts[j])) for i, j in near.items()}
    due = exact | {i for i, s in sim.items() if s >= 0.8}
    below = {i for i, s in sim.items() if s < 0.8}
    print(f"{len(texts)} texts, {np.mean([len(t.split()) for t in texts]):.1f} words on average, {len(exact)} exact "
          f"and {len(near)} planted near copies ({len(near) - len(below)} with J >= 0.8)")
    nd = NearDup()
    find_s, base_s, ratios = [], [], []
    result, base_dropped = None, set()
    for r in range(args.repeats):
        t0 = time.perf_counter()
        result = nd.find(texts, progress=False)
        t1 = time.perf_counter()
        base_dropped = baseline(texts)
        t2 = time.perf_counter()
        find_s.append(t1 - t0)
        base_s.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
        print(f"repeat {r}: find {t1 - t0:.1f} s, baseline {t2 - t1:.1f} s")
    assert result is not None
    dropped = set(result.drop)
    f = statistics.median(find_s)
    print(json.dumps({
        "docs": len(texts), "find_s": round(f, 2), "find_docs_per_s": round(len(texts) / f),
        "baseline_s": round(statistics.median(base_s), 2), "speedup": round(statistics.median(ratios), 2),
        "duplicates_due": len(due),
        "find_recall": round(len(dropped & due) / len(due), 4),
        "baseline_recall": round(len(base_dropped & due) / len(due), 4),
        "find_spurious": len(dropped - due - below), "baseline_spurious": len(base_dropped - due - below),
        "find_candidates": result.candidates, "find_rejected": result.rejected,
    }))


if __name__ == "__main__":
    main()
