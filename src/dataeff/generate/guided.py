"""Guided (constrained) JSON decoding, as vLLM does it: a request's JSON Schema (``response_format`` or vLLM's
``guided_json``, parsed by :func:`dataeff.generate.llm.sampling.json_schema_of`) becomes a grammar, and at
every sampling step the tokens that would leave it are masked, row by row of the batch, so a finished answer
always parses and matches the schema. An answer cut short by ``max_tokens`` stops mid-JSON (and its
``finish_reason`` says ``length``).

The grammar engine is llguidance (guidance-ai, the engine behind vLLM's, SGLang's and llama.cpp's structured
output). Chosen because it is a dependency-free CPU wheel that reads our byte-level BPE from its
``tokenizer.json`` as it is; it covers the JSON Schema we send (``$ref``, ``enum``, ``maxLength``,
``maxItems``, ...), names the keywords it does not implement, and computes a mask in microseconds. The
other candidates installable here fell short: xgrammar pulls triton (and would have us trust a torch of its
own), lm-format-enforcer walks the vocabulary in Python every step, and outlines-core compiles a schema to
a regular expression, which cannot nest arbitrarily.

Answers are written as Python's ``json.dumps`` writes them (``", "`` and ``": "`` between items, no other
whitespace): free whitespace would let a small model spend its tokens on blanks, and this is the form of
the JSON in text written by Python. Word-level vocabularies are refused (see :class:`Vocabulary`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import llguidance
import numpy as np
import torch

from dataeff.data.tokenizer import Tokenizer

_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Vocabulary:
    """A tokenizer as the grammar engine sees it, for a model whose logits have ``n_vocab`` entries."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int):
        if tokenizer.kind != "bpe":
            # llguidance forces the bytes a grammar leaves no choice about (the `": "` after a key) by
            # tokenizing them, and assumes any bytes can be tokenized. A word vocabulary cannot spell `"`
            # alone, and the engine then masks as if it had: measured, the answer broke 10 bytes in.
            raise ValueError(f"response_format: guided decoding needs a byte-level BPE tokenizer, which can spell "
                             f"any text a schema forces; this model's tokenizer ({tokenizer.kind}) cannot. Set "
                             f"the client's json_mode=off (llm.json_mode, cpt.generator.json_mode): it still "
                             f"validates the answers and re-asks")
        self.n_vocab, self.eos_id = n_vocab, tokenizer.eos_id
        self.ll = llguidance.LLTokenizer(tokenizer.hf.to_str(), n_vocab=n_vocab, eos_token=tokenizer.eos_id)

    def grammar(self, schema: str) -> str:
        """The grammar of answers matching ``schema`` (JSON Schema text), written as the module docstring says."""
        value = json.loads(schema)
        if isinstance(value, dict):
            value = {**value, "x-guidance": {**_FORMAT, **value.get("x-guidance", {})}}
        embedded = json.dumps(value, separators=(",", ":"))
        return llguidance.LLMatcher.grammar_from_lark(f"start: %json {embedded}")

    def matcher(self, schema: str) -> llguidance.LLMatcher:
        """A fresh matcher of ``schema``; ``ValueError`` naming the problem if the schema or this vocabulary
        cannot give an answer."""
        m = llguidance.LLMatcher(self.ll, self.grammar(schema), log_level=0)
        if m.is_error():
            raise ValueError(f"response_format: {m.get_error()}")
        if not np.frombuffer(m.compute_bitmask(), dtype=np.uint32).any():
            raise ValueError("response_format: no token of this model's vocabulary can start an answer matching "
                             "the schema")
        return m


class RowMasks:
    """The matchers of one batch's rows (``None``: that row samples freely); masks scores, follows tokens."""

    def __init__(self, vocab: Vocabulary, matchers: Sequence[llguidance.LLMatcher | None]):
        self.vocab, self.matchers = vocab, list(matchers)
        self.rows = [i for i, m in enumerate(matchers) if m is not None]
        self.bits = np.zeros(((vocab.n_vocab + 31) // 32 * len(self.rows),), dtype=np.uint32)
        self.shifts = torch.arange(32, dtype=torch.int64)
        self.done = [False] * len(self.matchers)

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` (batch, V) with every token a row's grammar forbids at -inf."""
        words = (self.vocab.n_vocab + 31) // 32
        bits = self.bits.reshape(len(self.rows), words)
        for k, i in enumerate(self.rows):
            m = self.matchers[i]
            if self.done[i] or m is None:
                bits[k] = 0xFFFFFFFF  # a finished row's tokens are dropped anyway
            else:
                m.unsafe_compute_mask_ptr(bits[k].ctypes.data, bits[k].nbytes)
        packed = torch.from_numpy(bits.astype(np.int64))
        allowed = ((packed.unsqueeze(-1) >> self.shifts) & 1).bool().reshape(len(self.rows), -1)
        allowed = allowed[:, : scores.shape[-1]]
        # A vocabulary that can write no next byte of the grammar ends the row rather than sampling from
        # nothing: the answer then fails its schema where the client checks it.
        stuck = ~allowed.any(dim=-1)
        allowed[stuck, self.vocab.eos_id] = True
        mask = torch.ones(scores.shape, dtype=torch.bool)
        mask[self.rows] = allowed
        return scores.masked_fill(~mask.to(scores.device), -torch.inf)

    def advance(self, tokens: torch.Tensor) -> None:
        """Feed every constrained row its sampled token."""
        picked = tokens.tolist()
        for i in self.rows:
            if not self.done[i]:
                m = self.matchers[i]
                assert m is not None
                m.consume_token(picked[i])
                self.done[i] = picked[i] == self.vocab.eos_id or m.is_error()


class Guide:
    """The schemas of one :func:`dataeff.generate.sample.generate` call's prompts (``None``: unconstrained)."""

    def __init__(self, vocab: Vocabulary, schemas: Sequence[str | None]):
        self.vocab, self.schemas = vocab, list(schemas)

    def rows(self, prompts: Sequence[int]) -> RowMasks | None:
        """Fresh masks for a batch of these prompt indices; ``None`` when none of them is constrained, so the
        unconstrained path does no work at all."""
        chosen = [self.schemas[i] for i in prompts]
        if not any(s is not None for s in chosen):
            return None
        return RowMasks(self.vocab, [self.vocab.matcher(s) if s is not None else None for s in chosen])
