"""Open-book QuALITY: retrieval over the articles' chunks, the top-k placed before the question. It is the
upper reference EntiGraph compares closed-book CPT with (RAG), here with SBP's embedding index: chunks and
questions embedded by the sentence-transformers model of :mod:`dataeff.synth.embed`, searched exactly by
inner product with faiss (:func:`dataeff.synth.neighbors.build_index`).

As in the paper's retrieval code, articles are cut into non-overlapping chunks, each headed by its article's
title and author, and the retrieved chunks go before the question with the best one last (next to it).
The question is the closed-book one, with its article reference, so the reference helps find the article.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch

from dataeff.config import option, section
from dataeff.data.corpora import data_root
from dataeff.data.tokenizer import Tokenizer
from dataeff.errors import DataeffError
from dataeff.eval.ensemble import load_ensemble
from dataeff.eval.quality import Article, QAItem, read_articles, read_quality, score_answers, split_items
from dataeff.eval.tasks import QUALITY_FILE, evaluate_qa, log_prob_fn, subset
from dataeff.fsutil import atomic_write_json
from dataeff.generate.llm import LLMConfig
from dataeff.generate.qa import answer_items
from dataeff.synth.embed import DEFAULT_MODEL, load_encoder, model_window, resolve_model
from dataeff.synth.neighbors import PairsConfig, build_index
from dataeff.train.dist import pick_device
from dataeff.train.rundir import load_model


@dataclass(frozen=True)
class Chunk:
    article: str  # the article's reference
    text: str  # with its header


def chunk_articles(articles: list[Article], words: int) -> list[Chunk]:
    """Non-overlapping chunks of ``words`` whitespace words, each headed by its article's title and author."""
    if words < 1:
        raise DataeffError(f"retrieval: chunk_words={words} must be at least 1")
    chunks = []
    for a in articles:
        header = f"Title: {a.title}" + (f"\nAuthor: {a.author}" if a.author else "")
        tokens = a.text.split()
        chunks += [Chunk(a.reference, f"{header}\n{' '.join(tokens[i : i + words])}")
                   for i in range(0, len(tokens), words)]
    return chunks


class Retriever:
    """Exact top-k search over chunk embeddings."""

    def __init__(self, chunks: list[Chunk], model: str = DEFAULT_MODEL, device: str = "auto", batch_size: int = 64):
        ref = resolve_model(model)
        self.encoder, self.window, self.batch_size = load_encoder(ref, device), model_window(ref), batch_size
        self.chunks = chunks
        vectors = self.encoder.encode([c.text for c in chunks], self.window, batch_size)
        self.index, _ = build_index(np.ascontiguousarray(vectors, dtype=np.float32), "flat", PairsConfig())

    def search(self, queries: list[str], k: int) -> np.ndarray:
        """The indices of each query's ``k`` most similar chunks, best first."""
        vectors = self.encoder.encode(queries, self.window, self.batch_size)
        _, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(self.chunks)))
        return ids


def open_book(items: list[QAItem], retriever: Retriever, k: int) -> tuple[list[QAItem], float]:
    """The items with their top-k chunks as passages (best last), and the share of questions for which a chunk
    of their own article was retrieved (article recall@k)."""
    ids = retriever.search([it.prompt for it in items], k)
    out, hits = [], []
    for it, row in zip(items, ids, strict=True):
        found = [retriever.chunks[i] for i in row if i >= 0]
        hits.append(any(c.article == it.article for c in found))
        out.append(dataclasses.replace(it, passages=[c.text for c in reversed(found)]))
    return out, float(np.mean(hits))


@dataclass
class OpenBookConfig:
    model: str = option("", "the model answering: a run directory or an ensemble.json (loglik), or the llm "
                            "section's model (generation)")
    mode: Literal["loglik", "generation"] = option("loglik", "score each option's log-likelihood after the "
                                                             "passages, or generate a chain-of-thought answer")
    split: Literal["test", "validation", "all"] = option("test", "articles asked about")
    file: str | None = option(None, "the QuALITY file (default: quality_leval_subset/quality.jsonl in "
                                    "DATAEFF_DATA_DIR)")
    limit: int | None = option(None, "at most this many questions (a seeded random subset)", min=1)
    seed: int = option(0, "seed of the subset", min=0)
    k: int = option(4, "chunks retrieved per question", min=1)
    chunk_words: int = option(200, "whitespace words per chunk", min=1)
    embed_model: str = option(DEFAULT_MODEL, "the sentence-transformers model embedding chunks and questions")
    n_shots: int = option(5, "generation: worked examples before the question", min=0, max=5)
    device: str = option("auto", "auto, cpu, cuda or mps")
    batch_size: int = option(16, "loglik: sequences per forward pass", min=1)
    llm: LLMConfig = section(LLMConfig, "generation: the client and the model answering")


def open_book_job(cfg: OpenBookConfig, out_dir: Path) -> dict[str, Any]:
    """Open-book accuracy with bootstrap intervals, and the retrieval's article recall@k."""
    path = Path(cfg.file) if cfg.file else data_root() / QUALITY_FILE
    items = cast(list[QAItem], subset(split_items(read_quality(path), cfg.split), cfg.limit, cfg.seed))
    retriever = Retriever(chunk_articles(read_articles(path), cfg.chunk_words), cfg.embed_model, cfg.device)
    books, recall = open_book(items, retriever, cfg.k)
    if cfg.mode == "loglik":
        if not cfg.model:
            raise DataeffError("open_book.model: the run directory or ensemble.json to score")
        device = str(pick_device(cfg.device))
        if cfg.model.endswith(".json"):
            ensemble = load_ensemble(cfg.model, device=device)
            fn, first = log_prob_fn(ensemble), Path(ensemble.names[0])
        else:
            fn, first = log_prob_fn(load_model(cfg.model, device=device)), Path(cfg.model)
        with torch.inference_mode():
            result = evaluate_qa(fn, Tokenizer.load(first / "tokenizer.json"), books, cfg.batch_size)
    else:
        chosen, _, summary = answer_items(cfg.llm, books, n_shots=cfg.n_shots, manifest=out_dir / "llm_job.json")
        result = {**score_answers(books, chosen), "llm": summary}
    out = {**result, "recall_at_k": recall, "k": cfg.k, "chunk_words": cfg.chunk_words, "mode": cfg.mode}
    atomic_write_json(out_dir / "open_book.json", out)
    return out
