"""SBP's synthesizer: the base model continued as a conditional model p(d2 | d1) on nearest-neighbour pairs.

:func:`pair_corpus` turns a ``dataeff pairs`` directory and the world's documents into a conditional JSONL
corpus, one record ``{"d1": ..., "d2": ..., "i": ..., "j": ...}`` per direction of a pair (``i`` and ``j`` are
the documents' indices in the world's split). Training reads it with ``data.prompt_field=d1`` and
``data.text_field=d2``: each record is d1, an end-of-document token, d2 and an end-of-document token, with the
loss on d2's tokens only. Each side is cut (in the base model's tokens) to its share of the context, so a record
fits one padded window and d2 always sees its d1: d1 and its separator fill at most ``prompt_share`` of the
context, d2 and its end token the rest.

:func:`synthesizer_run` is the training run: an ordinary :class:`~dataeff.train.config.RunConfig` that starts
from the base run (``train.init_from``), tokenizes with the base run's own tokenizer, trains on padded windows
and keeps every setting of ``run`` otherwise (optimizer, epochs, batch), so the usual trainer, executor and
tuning machinery apply to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dataeff.config import option, section, to_dict
from dataeff.data.config import DataConfig, TokenizerConfig
from dataeff.data.tokenizer import Tokenizer
from dataeff.data.tokens import load_prepared
from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_write_json, atomic_write_text
from dataeff.model.config import ModelConfig
from dataeff.synth.embed import document_text
from dataeff.synth.neighbors import read_pairs
from dataeff.train.config import RunConfig
from dataeff.train.identity import default_run_dir
from dataeff.train.rundir import model_config

PROMPT_FIELD = "d1"
TEXT_FIELD = "d2"


@dataclass
class SynthesizerConfig:
    base: str = option("", "the base run directory: the synthesizer starts from its weights and uses its tokenizer")
    pairs: str = option("", "a `dataeff pairs` output directory (pairs.parquet, pair_stats.json)")
    prompt_share: float = option(0.5, "share of the context that d1 and its separator may fill; d2 and its end "
                                      "token get the rest (each side is cut to its share)", above=0.0, below=1.0)
    both_directions: bool = option(True, "train on p(d2 | d1) and p(d1 | d2) for every pair")
    max_pairs: int | None = option(None, "pairs used at most (the most similar first; default: all)", min=1)
    run: RunConfig = section(RunConfig, "the synthesizer's training run: optimizer, epochs, batch, where it lives; "
                                        "its data, tokenizer, model shape and init_from are set from base and pairs")
    corpus: str | None = option(None, "where the conditional corpus is written (default: <pairs>/synthesizer-"
                                      "<hash>.jsonl)")
    val_fraction: float = option(0.05, "share of the conditional records held out for the synthesizer's "
                                       "validation loss", above=0.0, below=1.0)

    def __post_init__(self) -> None:
        if not 0.0 < self.prompt_share < 1.0:
            raise ValueError(f"prompt_share must be in (0, 1), got {self.prompt_share}")


def side_budgets(seq_len: int, prompt_share: float) -> tuple[int, int]:
    """(d1 tokens, d2 tokens) at most: d1 + separator + d2 + end token is one padded window of seq_len + 1."""
    prompt = int(prompt_share * seq_len) - 1
    text = seq_len - 1 - prompt
    if prompt < 1 or text < 1:
        raise DataeffError(f"synthesizer: a context of {seq_len} tokens at prompt_share={prompt_share} leaves "
                           f"{prompt} tokens for d1 and {text} for d2; SBP needs a context of at least 256 tokens")
    return prompt, text


def truncate(text: str, tokenizer: Tokenizer, limit: int) -> str:
    """The longest prefix of ``text`` cut at a token boundary whose re-encoding has at most ``limit`` tokens."""
    ids = tokenizer.encode(text)
    if len(ids) <= limit:
        return text
    keep = limit
    while keep > 0:
        cut = tokenizer.decode(ids[:keep])
        # Decoding and re-encoding a prefix can merge differently at its end; shorten until it fits.
        if len(tokenizer.encode(cut)) <= limit:
            return cut
        keep -= 1
    return ""


def _pairs_store(stats: dict[str, Any], pairs_dir: Path) -> tuple[Path, str]:
    store = stats.get("embeddings", {}).get("store", {})
    if "path" not in store:
        raise DataeffError(f"{pairs_dir / 'pair_stats.json'}: names no token store (embeddings.store.path)")
    return Path(store["path"]), str(store["split"])


def pair_corpus(pairs_dir: str | Path, tokenizer: Tokenizer, seq_len: int, prompt_share: float, out: str | Path,
                both_directions: bool = True, max_pairs: int | None = None) -> dict[str, Any]:
    """Write the conditional corpus of a pairs directory to ``out`` (atomically); return its statistics."""
    pairs_dir = Path(pairs_dir)
    columns, stats = read_pairs(pairs_dir)
    store_path, split_name = _pairs_store(stats, pairs_dir)
    prepared = load_prepared(store_path)
    split = prepared.split(split_name)
    order = np.argsort(-columns["similarity"], kind="stable")
    if max_pairs is not None:
        order = order[:max_pairs]
    prompt_budget, text_budget = side_budgets(seq_len, prompt_share)
    prompts: dict[int, str] = {}
    texts: dict[int, str] = {}

    def side(doc: int, budget: int, cache: dict[int, str]) -> str:
        if doc not in cache:
            cache[doc] = truncate(document_text(split, prepared.tokenizer, doc), tokenizer, budget)
        return cache[doc]

    lines = []
    directed = 0
    seen: set[tuple[int, int]] = set()
    for row in order.tolist():
        i, j = int(columns["i"][row]), int(columns["j"][row])
        for a, b in ((i, j), (j, i)) if both_directions else ((i, j),):
            if (a, b) in seen:  # a mutual pair lists both directions already
                continue
            seen.add((a, b))
            d1, d2 = side(a, prompt_budget, prompts), side(b, text_budget, texts)
            if d1.strip() and d2.strip():
                lines.append(json.dumps({PROMPT_FIELD: d1, TEXT_FIELD: d2, "i": a, "j": b}, ensure_ascii=False))
                directed += 1
    if not lines:
        raise DataeffError(f"synthesizer: {pairs_dir} gives no (d1, d2) record with text on both sides")
    atomic_write_text(out, "\n".join(lines) + "\n")
    return {"records": directed, "pairs": len(order), "prompt_tokens": prompt_budget, "text_tokens": text_budget,
            "store": str(store_path), "split": split_name}


def check_tokenizer(run_dir: str | Path, tokenizer: Tokenizer, what: str) -> None:
    """Refuse a run whose tokenizer differs from ``tokenizer`` (its ids would mean other words)."""
    path = Path(run_dir) / "tokenizer.json"
    if not path.is_file():
        raise DataeffError(f"{what}={run_dir}: not a finished dataeff run (no tokenizer.json)")
    theirs = Tokenizer.load(path)
    if theirs.ids_sha256 != tokenizer.ids_sha256:
        raise DataeffError(f"{what}={run_dir}: its tokenizer ({theirs.kind}, {theirs.vocab_size} ids, sha256 "
                           f"{theirs.ids_sha256[:12]}) differs from the world's ({tokenizer.kind}, "
                           f"{tokenizer.vocab_size} ids, sha256 {tokenizer.ids_sha256[:12]}); train the synthesizer "
                           "from a base run of this world")


def default_corpus(cfg: SynthesizerConfig) -> Path:
    key = {k: v for k, v in to_dict(cfg).items() if k in ("base", "prompt_share", "both_directions", "max_pairs")}
    key["base_weights"] = hashlib.sha256((Path(cfg.base) / "model.safetensors").read_bytes()).hexdigest()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.pairs) / f"synthesizer-{digest}.jsonl"


def synthesizer_run(cfg: SynthesizerConfig, corpus: str | Path) -> RunConfig:
    """The synthesizer's training run on ``corpus`` (written by :func:`pair_corpus`)."""
    base = Path(cfg.base)
    shape = model_config(base)
    run = cfg.run
    data = DataConfig(corpus=str(corpus), format="jsonl", prompt_field=PROMPT_FIELD, text_field=TEXT_FIELD,
                      val_fraction=cfg.val_fraction, cache_dir=run.data.cache_dir)
    return dataclasses.replace(
        run, data=data, tokenizer=TokenizerConfig(kind="file", path=str(base / "tokenizer.json")),
        model=ModelConfig(seq_len=shape.seq_len, dropout=run.model.dropout),
        train=dataclasses.replace(run.train, init_from=str(base), shuffle="padded"))


def train_synthesizer(cfg: SynthesizerConfig) -> dict[str, Any]:
    """``dataeff synthesizer``: write the conditional corpus, then train the synthesizer from the base run."""
    from dataeff.train.loop import train

    if not cfg.base or not cfg.pairs:
        raise DataeffError("synthesizer: set base=<base run dir> and pairs=<pairs dir>")
    base = Path(cfg.base)
    if not (base / "model.safetensors").is_file():
        raise DataeffError(f"synthesizer.base={base}: not a finished dataeff run (no model.safetensors)")
    tokenizer = Tokenizer.load(base / "tokenizer.json")
    _, stats = read_pairs(cfg.pairs)
    store_path, _ = _pairs_store(stats, Path(cfg.pairs))
    check_tokenizer(base, load_prepared(store_path).tokenizer, "synthesizer.base")
    corpus = Path(cfg.corpus) if cfg.corpus else default_corpus(cfg)
    info = pair_corpus(cfg.pairs, tokenizer, model_config(base).seq_len, cfg.prompt_share, corpus,
                       cfg.both_directions, cfg.max_pairs)
    atomic_write_json(corpus.with_suffix(".json"), info)
    run = synthesizer_run(cfg, corpus)
    result = train(run)
    return {"run_dir": str(default_run_dir(run)), "corpus": str(corpus), **info, **result}
