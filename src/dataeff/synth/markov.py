"""A known-truth world: documents from a random sparse first-order Markov source whose entropy rate is exact.

The source is a chain over ``symbols`` words ``s000, s001, …`` plus an end-of-document state. Every state moves
to ``successors`` others (one of them fixed by a random cycle through all states, so the chain is irreducible),
with Dirichlet(1) probabilities; a word ends its document with probability ``1 / doc_length``. Documents are
the chain's walks from one end state to the next, so a corpus of them, with the token store's end-of-document
token after each, *is* the chain's state sequence. Under a word-level tokenizer one word is one token and
every prediction sees at least the previous token, so the best achievable held-out loss per token is the
chain's entropy rate ``H = Σ_i π_i H(P_i)``, π the stationary distribution, in nats: the floor below which no
model's loss can go, and the asymptote of a token law L(D) of a model large enough to hold the transition table.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dataeff.config import option
from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_write_json, atomic_write_text


@dataclass
class MarkovConfig:
    out: str = option("runs/markov", "directory of train.jsonl, val.jsonl and source.json")
    symbols: int = option(48, "words of the source (the end-of-document state is one more)", min=2)
    successors: int = option(4, "states each state can move to", min=2)
    doc_length: float = option(40.0, "mean words per document", above=1.0)
    train_tokens: int = option(400_000, "tokens (words and end-of-document tokens) of the training split", min=1)
    val_tokens: int = option(65_536, "tokens of the validation split", min=1)
    seed: int = option(0, "seed of the source and of the samples", min=0)


@dataclass(frozen=True)
class MarkovSource:
    """``P[i, j]``: probability of state j after state i; state 0 ends a document, state k ≥ 1 is word k-1."""

    P: np.ndarray

    @property
    def stationary(self) -> np.ndarray:
        values, vectors = np.linalg.eig(self.P.T)
        v = np.real(vectors[:, int(np.argmin(np.abs(values - 1.0)))])
        return v / v.sum()

    @property
    def entropy_rate(self) -> float:
        """Nats per token, end-of-document tokens included."""
        with np.errstate(divide="ignore", invalid="ignore"):
            row_h = -np.where(self.P > 0, self.P * np.log(self.P), 0.0).sum(axis=1)
        return float(self.stationary @ row_h)

    def words(self) -> list[str]:
        width = len(str(len(self.P) - 2))
        return [f"s{k:0{width}d}" for k in range(len(self.P) - 1)]

    def sample(self, n_tokens: int, rng: np.random.Generator) -> list[str]:
        """Whole documents, each starting after an end state, until they hold ``n_tokens`` tokens counting
        one end-of-document token each."""
        words = self.words()
        cdf = np.cumsum(self.P, axis=1)
        cdf[:, -1] = 1.0
        docs: list[str] = []
        doc: list[str] = []
        state, count = 0, 0
        while count < n_tokens or doc:
            for u in rng.random(4096):
                state = int(np.searchsorted(cdf[state], u, side="right"))
                count += 1
                if state == 0:
                    docs.append(" ".join(doc))
                    doc = []
                    if count >= n_tokens:
                        break
                else:
                    doc.append(words[state - 1])
        return docs


def random_source(symbols: int, successors: int, doc_length: float, seed: int) -> MarkovSource:
    if successors > symbols:
        raise DataeffError(f"markov: successors={successors} exceeds symbols={symbols}")
    rng = np.random.default_rng(seed)
    n = symbols + 1
    cycle = rng.permutation(n)
    P = np.zeros((n, n))
    end = 1.0 / doc_length
    for pos, i in enumerate(cycle):
        nxt = int(cycle[(pos + 1) % n])
        # Words only: the end state is entered with probability `end` from every word (so it never follows
        # itself and documents are never empty), and the cycle's edges keep every word reachable.
        others = [j for j in range(1, n) if j not in (i, nxt)]
        words = sorted({nxt, *rng.choice(others, size=successors - 1, replace=False).tolist()} - {0})
        probs = rng.dirichlet(np.ones(len(words)))
        P[i, words] = probs if i == 0 else probs * (1.0 - end)
        if i != 0:
            P[i, 0] = end
    return MarkovSource(P)


def write_corpus(cfg: MarkovConfig) -> dict[str, object]:
    """Write the splits as JSONL (``{"text": ...}`` per document) and ``source.json`` with the exact entropy."""
    source = random_source(cfg.symbols, cfg.successors, cfg.doc_length, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 1])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, n in (("train", cfg.train_tokens), ("val", cfg.val_tokens)):
        docs = source.sample(n, rng)
        atomic_write_text(out / f"{split}.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
        counts[split] = {"documents": len(docs), "tokens": sum(len(d.split()) + 1 for d in docs)}
    pi = source.stationary
    info: dict[str, object] = {
        "entropy_rate": source.entropy_rate,
        "unigram_entropy": float(-(pi * np.log(pi)).sum()),
        "vocab": cfg.symbols + 1,
        "max_entropy": math.log(cfg.symbols + 1),
        "config": asdict(cfg),
        "splits": counts,
    }
    atomic_write_json(out / "source.json", info)
    return info
