"""Held-out loss in nats/token, bits per byte and per-word perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dataeff.data.order import EpochOrder
from dataeff.errors import DataeffError
from dataeff.train.dist import autocast


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean nats per predicted token
    bpb: float  # bits per UTF-8 byte of the text predicted
    word_ppl: float  # perplexity per whitespace word (end-of-document counts as a word)
    tokens: int

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}loss": self.loss, f"{prefix}bpb": self.bpb, f"{prefix}word_ppl": self.word_ppl, f"{prefix}tokens": self.tokens}


def windows(n_tokens: int, seq_len: int, max_tokens: int | None = None) -> list[tuple[int, int]]:
    """Non-overlapping (start, length) windows whose targets cover tokens 1..n-1 (or the first ``max_tokens``)."""
    limit = n_tokens - 1 if max_tokens is None else min(n_tokens - 1, max_tokens)
    return [(s, min(seq_len, limit - s)) for s in range(0, limit, seq_len)]


def batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) batches of equal-length windows; the ragged last window comes alone."""
    spans = windows(len(tokens), seq_len, max_tokens)
    full = [s for s in spans if s[1] == seq_len]
    for i in range(0, len(full), batch_size):
        chunk = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s, _ in full[i : i + batch_size]])
        yield torch.from_numpy(chunk[:, :-1]), torch.from_numpy(chunk[:, 1:])
    for s, n in spans[len(full) :]:
        chunk = np.asarray(tokens[s : s + n + 1], dtype=np.int64)[None]
        yield torch.from_numpy(chunk[:, :-1]), torch.from_numpy(chunk[:, 1:])


IGNORE = -100  # a target the loss skips (torch's default ignore_index)


def masked_batches(
    tokens: np.ndarray, doc_offsets: np.ndarray, mask: np.ndarray, seq_len: int, batch_size: int,
    max_tokens: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of whole-document windows padded to ``seq_len`` (as ``train.shuffle=padded`` cuts them),
    targets the loss skips set to :data:`IGNORE`; windows stop once ``max_tokens`` targets are covered."""
    order = EpochOrder(tokens, doc_offsets, seq_len, seed=0, mode="padded", mask=mask)
    picked, counted = [], 0
    for k in range(order.n):
        window, keep = order._window_at(k)
        picked.append((window, keep))
        counted += int(keep[1:].sum())
        if max_tokens is not None and counted >= max_tokens:
            break
    for i in range(0, len(picked), batch_size):
        chunk = picked[i : i + batch_size]
        x = torch.from_numpy(np.stack([w[:-1] for w, _ in chunk]))
        y = torch.from_numpy(np.stack([np.where(m[1:] > 0, w[1:], IGNORE) for w, m in chunk]))
        yield x, y


@torch.no_grad()
def token_nll(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: str = "auto") -> torch.Tensor:
    """Per-token negative log-likelihood (nats), shape like ``y``."""
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    with autocast(device, dtype):
        logits = model(x)
    return F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")


def summarize(nats: float, n_tokens: int, split_tokens: int, split_bytes: int, split_words: int) -> EvalResult:
    """Turn summed nats into the three metrics; byte and word counts scale with the share of the split scored."""
    share = n_tokens / max(split_tokens - 1, 1)
    n_bytes = max(split_bytes * share, 1e-9)
    n_words = max(split_words * share, 1e-9)
    return EvalResult(
        loss=nats / n_tokens,
        bpb=nats / math.log(2) / n_bytes,
        word_ppl=math.exp(min(nats / n_words, 700.0)),
        tokens=n_tokens,
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    n_bytes: int,
    n_words: int,
    seq_len: int,
    batch_size: int = 16,
    max_tokens: int | None = None,
    dtype: str = "auto",
    doc_offsets: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> EvalResult:
    """Held-out metrics of ``tokens``; with a ``mask`` (conditional documents) only the targets it keeps count,
    each scored in its own document's window."""
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    if mask is not None:
        assert doc_offsets is not None
        windows = masked_batches(tokens, doc_offsets, mask, seq_len, batch_size, max_tokens)
    else:
        windows = batches(tokens, seq_len, batch_size, max_tokens)
    for x, y in windows:
        nll = token_nll(model, x, y, dtype)
        nats += float(nll.double().sum())
        count += int((y != IGNORE).sum()) if mask is not None else nll.numel()
    model.train(was_training)
    if count == 0:
        raise DataeffError(f"evaluation: {len(tokens)} held-out tokens leave no target to score")
    return summarize(nats, count, len(tokens), n_bytes, n_words)
