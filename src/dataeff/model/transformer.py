"""A decoder-only transformer of the Llama family (RMSNorm, RoPE, SwiGLU, optional QK-norm), sized by a few dials.

Projections are fused (q|k|v and gate|up) because one larger matmul runs faster than three small ones on a
CPU; :mod:`dataeff.hf` splits them again for Hugging Face export.

Incremental decoding is part of the model: :meth:`Transformer.new_cache` preallocates a :class:`KVCache`,
:meth:`Transformer.prefill` runs a prompt through the ordinary forward pass into it, and
:meth:`Transformer.decode_step` feeds one token per row through a path computing the same function with about
half the operators (see :class:`StepWeights`). Sampling, serving and synthesis all decode through it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dataeff.errors import DataeffError
from dataeff.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_cache(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables in Hugging Face Llama's half-rotation layout, so weights transfer without permutation."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.n_kv_heads is not None
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # The tables are fp32; under bf16 autocast they would silently promote q and k (and attention) to fp32.
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal = True
        if cache is not None:
            k, v = cache.update(layer, k, v)
            causal = t > 1
        dropout = self.dropout if self.training else 0.0
        gqa = self.n_kv_heads != self.n_heads
        if causal and k.shape[2] != t:
            # Prefill after earlier tokens: causal within the new block, full view of the cached prefix.
            past = k.shape[2] - t
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.d_ff is not None
        self.d_ff = cfg.d_ff
        self.w13 = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.d_ff, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, layer))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class KVCache:
    """Preallocated keys and values for every layer, for incremental decoding. A cache made by
    :meth:`Transformer.new_cache` also holds the weights (:class:`StepWeights`) that prefill and decode it."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        assert cfg.n_kv_heads is not None
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len
        # (batch·kv_heads, head_dim, position) key and (batch·kv_heads, position, head_dim) value views of each
        # layer, for decode_step's batched matmuls: they read a prefix of the cache in place.
        self.keys = [k.view(batch * cfg.n_kv_heads, max_len, cfg.head_dim).transpose(1, 2) for k in self.k]
        self.values = [v.view(batch * cfg.n_kv_heads, max_len, cfg.head_dim) for v in self.v]
        self.step_weights: StepWeights | None = None

    def reset(self) -> None:
        """Empty the cache (its memory is kept), e.g. to prefill a slid window."""
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        end = self.pos + t
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        self.pos += t


def _plain_linear(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: F.linear(x, w)


def packed_linear(weight: torch.Tensor, dtype: torch.dtype, batch_hint: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x @ weight.T`` in ``dtype`` for decode-sized batches.

    On CPUs with oneDNN the weight is packed once for oneDNN's GEMM kernel, which runs such matmuls up to 2x
    faster than ``F.linear`` in bf16 (1.2-1.4x in fp32 at the larger shapes; measured at the 10m preset, batch
    8). No public PyTorch API packs a weight this way: the packing is the one Inductor's freezing pass uses,
    reached through the private ``torch.ops.mkldnn`` operators. So it is tried, and wherever those operators
    are missing or refuse the weight (another build, another device, a dtype the CPU lacks) the plain
    ``F.linear`` is used; ``tests/test_sample.py`` checks both give the same tokens.
    """
    w = weight.detach().to(dtype)
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return _plain_linear(w)
    try:
        mkldnn = torch.ops.mkldnn
        if dtype == torch.bfloat16 and not mkldnn._is_mkldnn_bf16_supported():
            return _plain_linear(w)
        packed = mkldnn._reorder_linear_weight(w, batch_hint)
        run = mkldnn._linear_pointwise
        probe = torch.zeros(1, w.shape[1], dtype=dtype)
        run(probe, packed, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return _plain_linear(w)
    return lambda x: run(x, packed, None, "none", [], "")


@dataclass(frozen=True, slots=True)
class _Layer:
    attn_norm: torch.Tensor
    wqkv: Callable[[torch.Tensor], torch.Tensor]
    qk_norm: torch.Tensor | None  # per-head q|k RMSNorm weights, shape (n_heads + n_kv_heads, head_dim)
    wo: Callable[[torch.Tensor], torch.Tensor]
    mlp_norm: torch.Tensor
    w13: Callable[[torch.Tensor], torch.Tensor]
    w2: Callable[[torch.Tensor], torch.Tensor]


class StepWeights:
    """A model's weights laid out for one-token decoding steps.

    At one token per row a CPU step of a small model costs more in per-operator overhead than in arithmetic,
    so the step folds the softmax scale into the query weights (or the query norm), applies RoPE as
    ``x·cos + roll(x)·sin`` with the sign folded into ``sin``, attends with two batched matmuls instead of
    SDPA (whose CPU kernels cost several times more at one query), and packs weights for oneDNN
    (:func:`packed_linear`). The cache is fp32 whatever the compute dtype: fp32 batched matmuls read a prefix
    of it in place. ``tests/test_sample.py`` checks the step against the model's uncached forward pass.
    """

    def __init__(self, model: Transformer, compute: torch.dtype, batch_hint: int, linear: Callable[..., Callable[[torch.Tensor], torch.Tensor]]):
        c = model.cfg
        assert c.n_kv_heads is not None
        self.compute = compute
        scale = c.head_dim**-0.5
        q_rows = c.n_heads * c.head_dim
        device = model.embed.weight.device
        cos, sin = rope_cache(c.seq_len, c.head_dim, c.rope_theta)
        half = c.head_dim // 2
        self.cos = cos.to(device)
        self.sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1).to(device)
        self.embed = model.embed.weight.detach()
        self.norm = model.norm.weight.detach()
        self.layers = []
        for block in model.blocks:
            attn = block.attn
            wqkv = attn.wqkv.weight.detach()
            qk_norm = None
            if attn.q_norm is not None and attn.k_norm is not None:
                # The norm undoes any scaling of the projection, so the scale goes into the norm's weight.
                qk_norm = torch.cat([(attn.q_norm.weight.detach().float() * scale).expand(c.n_heads, -1),
                                     attn.k_norm.weight.detach().float().expand(c.n_kv_heads, -1)])
            else:
                wqkv = torch.cat([wqkv[:q_rows] * scale, wqkv[q_rows:]])
            self.layers.append(_Layer(
                attn_norm=block.attn_norm.weight.detach(),
                wqkv=linear(wqkv, compute, batch_hint),
                qk_norm=qk_norm,
                wo=linear(attn.wo.weight, compute, batch_hint),
                mlp_norm=block.mlp_norm.weight.detach(),
                w13=linear(block.mlp.w13.weight, compute, batch_hint),
                w2=linear(block.mlp.w2.weight, compute, batch_hint),
            ))
        self.head = linear(model.output_weight, compute, batch_hint)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, init_seed: int | None = 0):
        super().__init__()
        cfg = cfg.resolved()
        if cfg.vocab_size <= 0:
            raise DataeffError("model.vocab_size must be set (it is normally taken from the tokenizer)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_cache(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if init_seed is not None:
            self.reset_parameters(init_seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        # A private generator: the initialisation seed is independent of the data-order and dropout seeds.
        g = torch.Generator().manual_seed(seed)
        std = self.cfg.init_std
        # GPT-2's scaling of residual output projections keeps the residual stream's variance depth-independent.
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                init = torch.empty(p.shape, dtype=torch.float32)
                init.normal_(0.0, out_std if name.endswith(("wo.weight", "w2.weight")) else std, generator=g)
                p.copy_(init)

    @property
    def seq_len(self) -> int:
        """The context length (an ensemble has the same property: its members' shortest)."""
        return self.cfg.seq_len

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        t = idx.shape[1]
        start = cache.pos if cache is not None else 0
        if start + t > self.cfg.seq_len:
            raise DataeffError(f"sequence of {start + t} tokens exceeds the model's context of {self.cfg.seq_len}")
        cos, sin = self.rope_cos[start : start + t], self.rope_sin[start : start + t]
        x = self.drop(self.embed(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Logits of shape (batch, time, vocab); with ``targets``, the mean cross-entropy in nats instead."""
        logits = F.linear(self.hidden(idx, cache), self.output_weight)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    def step_weights(self, dtype: Literal["bf16", "fp32"] = "fp32", batch_hint: int = 1, *,
                     linear: Callable[..., Callable[[torch.Tensor], torch.Tensor]] = packed_linear) -> StepWeights:
        """This model's weights, as they are now, laid out for :meth:`decode_step`; one layout serves every
        cache of a generation. ``dtype="bf16"`` computes as ``torch.autocast`` does in training: bf16 matmuls,
        an fp32 residual stream, fp32 RoPE, softmax and logits. ``linear`` makes each projection's matmul (the
        default packs weights for oneDNN where it can, for batches of about ``batch_hint`` rows)."""
        with torch.no_grad():
            return StepWeights(self, torch.bfloat16 if dtype == "bf16" else torch.float32, batch_hint, linear)

    def new_cache(self, batch: int, max_len: int, weights: StepWeights) -> KVCache:
        """A preallocated cache of ``max_len`` positions for ``batch`` rows, decoded with ``weights``."""
        if max_len > self.cfg.seq_len:
            raise DataeffError(f"a cache of {max_len} positions exceeds the model's context of {self.cfg.seq_len}")
        cache = KVCache(self.cfg, batch, max_len, self.embed.weight.device, torch.float32)
        cache.step_weights = weights
        return cache

    def prefill(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run ``(batch, time)`` tokens through the forward pass into ``cache`` (after what it holds); the
        next-token fp32 logits, ``(batch, vocab)``."""
        w = cache.step_weights
        if w is None:
            raise DataeffError("prefill needs a cache made by Transformer.new_cache")
        bf16 = w.compute == torch.bfloat16
        with torch.autocast(idx.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            h = self.hidden(idx, cache)[:, -1]
        return w.head(h.to(w.compute)).float()

    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one token per row, ``(batch,)``, at the cache's position; the next-token fp32 logits,
        ``(batch, vocab)``. The same function as the forward pass over the whole sequence, for a cache made by
        :meth:`new_cache` (dropout off)."""
        w = cache.step_weights
        if w is None:
            raise DataeffError("decode_step needs a cache made by Transformer.new_cache")
        if cache.pos >= cache.max_len:
            raise DataeffError(f"decode_step: the cache's {cache.max_len} positions are full")
        pos, end = cache.pos, cache.pos + 1
        c = self.cfg
        assert c.n_kv_heads is not None and c.d_ff is not None
        b, heads, kv, hd, eps, dt = tokens.shape[0], c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps, w.compute
        qk_heads = heads + kv
        x = F.embedding(tokens, w.embed)
        d = x.shape[-1]
        cos, sin = w.cos[pos], w.sin[pos]
        for i, layer in enumerate(w.layers):
            qkv = layer.wqkv(F.rms_norm(x, (d,), layer.attn_norm, eps).to(dt)).view(b, qk_heads + kv, hd)
            qk = qkv[:, :qk_heads]
            if layer.qk_norm is not None:
                qk = F.rms_norm(qk.float(), (hd,), None, eps) * layer.qk_norm
            qk = torch.addcmul(qk * cos, qk.roll(hd // 2, -1), sin)
            cache.k[i, :, :, pos] = qk[:, heads:]
            cache.v[i, :, :, pos] = qkv[:, qk_heads:]
            # Query heads sharing a key/value head are rows of one matrix: grouped-query attention needs no copies.
            q = qk[:, :heads].reshape(b * kv, heads // kv, hd)
            att = torch.bmm(q, cache.keys[i][:, :, :end]).softmax(dim=-1)
            y = torch.bmm(att, cache.values[i][:, :end]).view(b, heads * hd)
            x = x + layer.wo(y.to(dt))
            gate, up = layer.w13(F.rms_norm(x, (d,), layer.mlp_norm, eps).to(dt)).split(c.d_ff, dim=-1)
            x = x + layer.w2(F.silu(gate) * up)
        cache.pos = end
        return w.head(F.rms_norm(x, (d,), w.norm, eps).to(dt)).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
