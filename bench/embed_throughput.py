"""Embedding throughput: ``dataeff embed`` vs a plain ``SentenceTransformer.encode`` loop on the same documents.

Documents: the first N TinyStories training stories from ``DATAEFF_DATA_DIR`` (or, without it, generated
word salad of TinyStories-like lengths), prepared into a token store. Model: the packaged all-MiniLM-L6-v2,
window 256 tokens (its max_seq_length), fp32 on the CPU, batch size 64 for both, one model object shared by
both (loaded before timing, so model loading is excluded from both).

- dataeff: :func:`dataeff.synth.embed.embed` end to end into a fresh directory: planning, decoding every
  document from the store, finding first chunks, encoding with rows sorted longest first, writing shards.
- plain: the document texts (decoded beforehand, not timed) encoded in corpus order in fixed batches,
  ``model.encode(texts[i:i+64])``, as a simple script would.

Runs alternate between the two and the best of each counts, because the machine may be shared: the load
average is printed with the figures. The vectors must agree to 1e-3 (dataeff stores float16). The last line
is one JSON object: dataeff_docs_s, plain_docs_s, ratio, max_abs_diff.

    python bench/embed_throughput.py            # 512 stories, 3 rounds: several minutes on 2 busy cores
    python bench/embed_throughput.py --quick    # 128 stories, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from dataeff.data.config import DataConfig, TokenizerConfig
from dataeff.data.tokens import prepare
from dataeff.synth.embed import EmbedConfig, EmbedWarning, document_text, embed, load_encoder, resolve_model

BATCH = 64


def stories(n: int) -> tuple[list[str], str]:
    data = os.environ.get("DATAEFF_DATA_DIR")
    path = Path(data or "") / "tinystories" / "train_sample_2MiB.txt"
    if data and path.is_file():
        docs = [d.strip() for d in path.read_text(encoding="utf-8").split("<|endoftext|>")[:-1] if d.strip()]
        return docs[:n], "tinystories"
    rng = np.random.default_rng(0)
    words = ["once", "upon", "a", "time", "there", "was", "little", "girl", "named", "lily", "she", "liked", "to", "play", "in", "the", "park", "with", "her", "dog"]
    lengths = rng.lognormal(np.log(160), 0.5, n).astype(int) + 20
    return [" ".join(rng.choice(words, size=k)) + "." for k in lengths], "generated"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128 stories, one round")
    parser.add_argument("--docs", type=int, default=0, help="documents (0: 512, or 128 with --quick)")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds (0: 3, or 1 with --quick)")
    args = parser.parse_args()
    n = args.docs or (128 if args.quick else 512)
    rounds = args.rounds or (1 if args.quick else 3)
    docs, source = stories(n)

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "docs.txt"
        corpus.write_text("\n\n".join(" ".join(d.split()) for d in docs) + "\n", encoding="utf-8")
        store = prepare(DataConfig(corpus=str(corpus), val_docs=1, cache_dir=f"{tmp}/cache"),
                        TokenizerConfig(vocab_size=2048), progress=False)
        split = store.split("train")
        texts = [document_text(split, store.tokenizer, i) for i in range(split.n_docs)]
        model = load_encoder(resolve_model("all-MiniLM-L6-v2"), "cpu").model  # type: ignore[attr-defined]

        def run_dataeff(r: int) -> np.ndarray:
            cfg = EmbedConfig(store=str(store.path), batch_size=BATCH, device="cpu", progress=False,
                              out=f"{tmp}/emb{r}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", EmbedWarning)
                return np.asarray(embed(cfg), dtype=np.float32)

        def run_plain(r: int) -> np.ndarray:
            model.max_seq_length = 256
            return np.concatenate([model.encode(texts[i : i + BATCH], batch_size=BATCH)
                                   for i in range(0, len(texts), BATCH)])

        model.encode(texts[:BATCH], batch_size=BATCH)  # warm-up: the first forward pass sets up its kernels
        best = {"dataeff": 0.0, "plain": 0.0}
        vectors: dict[str, np.ndarray] = {}
        for r in range(rounds):
            for name, run in (("dataeff", run_dataeff), ("plain", run_plain)):
                start = time.perf_counter()
                vectors[name] = run(r)
                best[name] = max(best[name], len(texts) / (time.perf_counter() - start))
                print(f"round {r}: {name} {best[name]:.1f} docs/s (best so far)")
    diff = float(np.abs(vectors["dataeff"] - vectors["plain"]).max())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"{len(texts)} {source} documents; load average (1 min): {load}; cores: {os.cpu_count()}")
    print(json.dumps({"docs": len(texts), "source": source, "dataeff_docs_s": round(best["dataeff"], 2),
                      "plain_docs_s": round(best["plain"], 2), "ratio": round(best["dataeff"] / best["plain"], 3),
                      "max_abs_diff": round(diff, 6), "load_avg": load}))


if __name__ == "__main__":
    main()
