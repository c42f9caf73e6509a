"""The order in which training sequences are seen: a fresh shuffle every epoch, a pure function of (seed, step).

Because the order is computed rather than iterated, resuming at step ``s`` needs no saved loader state, and
runs differing only by ``data_seed`` see the same sequences in different orders.

Every order gives windows of ``seq_len + 1`` tokens (inputs and shifted targets) and, alongside, which targets
the loss counts (``target_masks``: all of them, except conditional documents' prompts and padding). Two orders
compose others: :class:`OnceMix` spreads a second source's windows, each seen once, evenly through the run,
and :class:`ReplayMix` replaces a seeded share of the sequences by random windows of a replay corpus.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from dataeff.errors import DataeffError

Mode = Literal["sequence", "document", "padded"]


class EpochOrder:
    """Sample ``k`` of the run is window ``perm_e[k mod n]`` of epoch ``e = k // n``.

    ``sequence`` mode cuts the token stream once into ``n`` windows of ``seq_len + 1`` tokens (sharing one
    boundary token) and permutes the windows each epoch. ``document`` mode permutes whole documents each epoch
    and re-packs them into a new stream before cutting, so window boundaries move too (as Slowrun found helps).
    ``padded`` mode gives every document windows of its own (a longer one is cut into several), padded with
    targets the loss skips, and permutes them each epoch: no window mixes two documents, so a conditional
    document's text always sees its prompt.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        doc_offsets: np.ndarray,
        seq_len: int,
        seed: int,
        mode: Mode = "sequence",
        mask: np.ndarray | None = None,
    ):
        self.tokens = tokens
        self.doc_offsets = doc_offsets
        self.seq_len = seq_len
        self.seed = seed
        self.mode = mode
        self.mask = mask
        if mode == "padded":
            self._spans = self._padded_spans()
            self.n = len(self._spans)
        else:
            self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise DataeffError(
                f"training split has {len(tokens)} tokens, fewer than one training sequence of {seq_len + 1}; "
                "lower model.seq_len or raise data.train_tokens"
            )
        self._cache: tuple[int, np.ndarray, np.ndarray | None, np.ndarray] | None = None

    def _padded_spans(self) -> np.ndarray:
        """(start, length) of every window: each document cut into pieces of at most ``seq_len + 1`` tokens that
        share a boundary token, keeping only pieces with a target the loss counts."""
        spans = []
        for start, end in zip(self.doc_offsets[:-1].tolist(), self.doc_offsets[1:].tolist(), strict=True):
            for s in range(start, max(start + 1, end - 1), self.seq_len):
                length = min(self.seq_len + 1, end - s)
                if length >= 2 and (self.mask is None or self.mask[s + 1 : s + length].any()):
                    spans.append((s, length))
        return np.asarray(spans, dtype=np.int64).reshape(-1, 2)

    def total_samples(self, epochs: float) -> float:
        return epochs * self.n

    def epochs_of(self, samples: int) -> float:
        """The passes over the data that ``samples`` samples make."""
        return samples / self.n

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(stream, its mask, window permutation) of an epoch; the last epoch's is kept since batches walk through it."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2], self._cache[3]
        rng = np.random.default_rng([self.seed, epoch])
        stream, mask = self.tokens, self.mask
        if self.mode == "document":
            starts, ends = self.doc_offsets[:-1], self.doc_offsets[1:]
            order = rng.permutation(len(starts))
            stream = np.concatenate([self.tokens[starts[i] : ends[i]] for i in order])
            if self.mask is not None:
                mask = np.concatenate([self.mask[starts[i] : ends[i]] for i in order])
            perm = np.arange(self.n)
        else:
            perm = rng.permutation(self.n)
        self._cache = (epoch, stream, mask, perm)
        return stream, mask, perm

    def window_ids(self, start: int, count: int) -> np.ndarray:
        """The window index (into the once-cut stream) of samples ``start .. start+count-1``: a fixed position
        only in ``sequence`` mode, where it keys per-window data such as a teacher's cached predictions."""
        if self.mode != "sequence":
            raise DataeffError("window ids are fixed positions only with train.shuffle=sequence")
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, j = divmod(start + i, self.n)
            out[i] = self._epoch(epoch)[2][j]
        return out

    def windows(self, ids: np.ndarray) -> np.ndarray:
        """Windows ``ids`` of the once-cut stream, shape (len(ids), seq_len + 1)."""
        return np.stack([np.asarray(self.tokens[i * self.seq_len : i * self.seq_len + self.seq_len + 1], dtype=np.int64)
                         for i in ids])

    def _window_at(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Padded window ``w`` (in document order) and which of its tokens count."""
        s, length = (int(v) for v in self._spans[w])
        tokens = np.zeros(self.seq_len + 1, dtype=np.int64)
        tokens[:length] = self.tokens[s : s + length]
        counts = np.zeros(self.seq_len + 1, dtype=np.uint8)
        counts[:length] = 1 if self.mask is None else self.mask[s : s + length]
        return tokens, counts

    def _window(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Sample ``k``'s tokens and its mask (None: every token counts), padded in padded mode."""
        epoch, j = divmod(k, self.n)
        stream, mask, perm = self._epoch(epoch)
        if self.mode == "padded":
            return self._window_at(int(perm[j]))
        s = int(perm[j]) * self.seq_len
        return stream[s : s + self.seq_len + 1], None if mask is None else mask[s : s + self.seq_len + 1]

    def samples(self, start: int, count: int) -> np.ndarray:
        """Samples ``start .. start+count-1`` as an int64 array of shape (count, seq_len + 1)."""
        out = np.empty((count, self.seq_len + 1), dtype=np.int64)
        for i in range(count):
            out[i] = self._window(start + i)[0]
        return out

    def target_masks(self, start: int, count: int) -> np.ndarray | None:
        """Which targets of samples ``start .. start+count-1`` the loss counts, (count, seq_len) booleans; None
        when every one does."""
        if self.mask is None and self.mode != "padded":
            return None
        out = np.empty((count, self.seq_len), dtype=bool)
        for i in range(count):
            out[i] = self._window(start + i)[1][1:]
        return out


class OnceMix:
    """The main order's samples with another source's windows spread evenly among them, each seen once.

    With ``n_extra`` extra windows among ``total`` samples, sample ``k`` is extra window ``floor(k·q)`` when
    ``floor((k+1)·q) > floor(k·q)``, ``q = n_extra / total``; otherwise it is the main order's sample
    ``k - floor(k·q)``. The main data repeats epoch after epoch around them (SBP's schedule: synthetic documents
    seen once, the real data repeated to fill the rest).
    """

    def __init__(self, main: EpochOrder, extra: EpochOrder, n_extra: int, main_epochs: float):
        if n_extra > extra.n:
            raise DataeffError(f"synthetic data: {n_extra} sequences of {extra.seq_len + 1} tokens are to be seen once, "
                               f"but the synthetic corpus holds {extra.n}; give more, or lower data.synthetic_share")
        if main.mask is not None:
            raise DataeffError("a synthetic corpus seen once cannot be mixed with conditional (prompt) documents")
        self.main, self.extra, self.n_extra = main, extra, n_extra
        self.seq_len, self.n, self.mask, self.mode = main.seq_len, main.n, None, main.mode
        self._q = n_extra / (main_epochs * main.n + n_extra)

    def total_samples(self, epochs: float) -> float:
        return self.main.total_samples(epochs) + self.n_extra

    def epochs_of(self, samples: int) -> float:
        return self.main.epochs_of(samples - self._extra_before(samples))

    def _extra_before(self, k: int) -> int:
        return min(int(np.floor(k * self._q)), self.n_extra)

    def samples(self, start: int, count: int) -> np.ndarray:
        out = np.empty((count, self.seq_len + 1), dtype=np.int64)
        for i in range(count):
            k = start + i
            before = self._extra_before(k)
            if self._extra_before(k + 1) > before:
                out[i] = self.extra.samples(before, 1)[0]  # its first epoch: each window once
            else:
                out[i] = self.main.samples(k - before, 1)[0]
        return out

    def target_masks(self, start: int, count: int) -> np.ndarray | None:
        return None

    def window_ids(self, start: int, count: int) -> np.ndarray:
        raise DataeffError("a teacher's top-k cache needs a plain training order; use distill.teacher_cache=online")


class ReplayMix:
    """The main order's samples, each replaced with probability ``rate`` by a random window of a replay corpus.

    The coin and the replacement of sample ``k`` come from a generator seeded by ``(seed, k)``: a pure function of
    the position, so a resumed run replays exactly what an uninterrupted one does (EntiGraph's per-sequence coin).
    """

    _TAG = 0x7E9  # keeps the replay coins independent of every other use of the seed

    def __init__(self, main: EpochOrder | OnceMix, replay: EpochOrder, rate: float, seed: int):
        if main.mask is not None:
            raise DataeffError("replay cannot be mixed with conditional (prompt) documents")
        self.main, self.replay, self.rate, self.seed = main, replay, rate, seed
        self.seq_len, self.n, self.mask, self.mode = main.seq_len, main.n, None, main.mode

    def total_samples(self, epochs: float) -> float:
        return self.main.total_samples(epochs)

    def epochs_of(self, samples: int) -> float:
        return self.main.epochs_of(samples)

    def replaced(self, k: int) -> int | None:
        """The replay window that takes sample ``k``'s place, or None."""
        rng = np.random.default_rng([self.seed, self._TAG, k])
        return int(rng.integers(self.replay.n)) if rng.random() < self.rate else None

    def samples(self, start: int, count: int) -> np.ndarray:
        out = self.main.samples(start, count)
        for i in range(count):
            window = self.replaced(start + i)
            if window is not None:
                out[i] = self.replay.samples(window, 1)[0]
        return out

    def target_masks(self, start: int, count: int) -> np.ndarray | None:
        return None

    def window_ids(self, start: int, count: int) -> np.ndarray:
        raise DataeffError("a teacher's top-k cache needs a plain training order; use distill.teacher_cache=online")


Order = EpochOrder | OnceMix | ReplayMix
