"""The order in which training sequences are seen: a fresh shuffle every epoch, a pure function of (seed, step).

Because the order is computed rather than iterated, resuming at step ``s`` needs no saved loader state, and
runs differing only by ``data_seed`` see the same sequences in different orders.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from dataeff.errors import DataeffError


class EpochOrder:
    """Sample ``k`` of the run is window ``perm_e[k mod n]`` of epoch ``e = k // n``.

    ``sequence`` mode cuts the token stream once into ``n`` windows of ``seq_len + 1`` tokens (sharing one
    boundary token) and permutes the windows each epoch. ``document`` mode permutes whole documents each epoch
    and re-packs them into a new stream before cutting, so window boundaries move too (as Slowrun found helps).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        doc_offsets: np.ndarray,
        seq_len: int,
        seed: int,
        mode: Literal["sequence", "document"] = "sequence",
    ):
        self.tokens = tokens
        self.doc_offsets = doc_offsets
        self.seq_len = seq_len
        self.seed = seed
        self.mode = mode
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise DataeffError(
                f"training split has {len(tokens)} tokens, fewer than one training sequence of {seq_len + 1}; "
                "lower model.seq_len or raise data.train_tokens"
            )
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(stream, window permutation) of an epoch; the last epoch's is kept since batches walk through it."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        rng = np.random.default_rng([self.seed, epoch])
        if self.mode == "document":
            starts, ends = self.doc_offsets[:-1], self.doc_offsets[1:]
            order = rng.permutation(len(starts))
            stream = np.concatenate([self.tokens[starts[i] : ends[i]] for i in order])
            perm = np.arange(self.n)
        else:
            stream = self.tokens
            perm = rng.permutation(self.n)
        self._cache = (epoch, stream, perm)
        return stream, perm

    def window_ids(self, start: int, count: int) -> np.ndarray:
        """The window index (into the once-cut stream) of samples ``start .. start+count-1``: a fixed position
        only in ``sequence`` mode, where it keys per-window data such as a teacher's cached predictions."""
        if self.mode != "sequence":
            raise DataeffError("window ids are fixed positions only with train.shuffle=sequence")
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, j = divmod(start + i, self.n)
            out[i] = self._epoch(epoch)[1][j]
        return out

    def windows(self, ids: np.ndarray) -> np.ndarray:
        """Windows ``ids`` of the once-cut stream, shape (len(ids), seq_len + 1)."""
        return np.stack([np.asarray(self.tokens[i * self.seq_len : i * self.seq_len + self.seq_len + 1], dtype=np.int64)
                         for i in ids])

    def samples(self, start: int, count: int) -> np.ndarray:
        """Samples ``start .. start+count-1`` as an int64 array of shape (count, seq_len + 1)."""
        out = np.empty((count, self.seq_len + 1), dtype=np.int64)
        for i in range(count):
            epoch, j = divmod(start + i, self.n)
            stream, perm = self._epoch(epoch)
            s = int(perm[j]) * self.seq_len
            out[i] = stream[s : s + self.seq_len + 1]
        return out
