"""A decoder-only transformer of the Llama family (RMSNorm, RoPE, SwiGLU, optional QK-norm), sized by a few dials.

Projections are fused (q|k|v and gate|up) because one larger matmul runs faster than three small ones on a
CPU; :mod:`dataeff.hf` splits them again for Hugging Face export.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dataeff.config import option
from dataeff.errors import DataeffError

# name -> (d_model, n_layers, n_heads). Non-embedding parameters are ~12·d²·L; the vocabulary adds the rest.
PRESETS: dict[str, tuple[int, int, int]] = {
    "pico": (16, 2, 2),  # ~0.007M non-embedding: the smallest demo-world size
    "nano": (32, 2, 2),  # ~0.03M non-embedding: smoke tests
    "micro": (64, 2, 2),  # ~0.1M
    "mini": (128, 4, 4),  # ~0.8M
    "small": (192, 6, 6),  # ~2.7M
    "base": (256, 8, 8),  # ~6.3M
    "10m": (320, 8, 8),  # ~9.8M
    "medium": (512, 8, 8),  # ~25M
    "150m": (768, 12, 12),
    "300m": (1024, 16, 16),
    "600m": (1536, 16, 16),
    "1.4b": (2048, 24, 16),
}


@dataclass
class ModelConfig:
    preset: str | None = option(None, "named size (sets d_model, n_layers, n_heads): " + ", ".join(PRESETS))
    d_model: int = option(128, "residual stream width")
    n_layers: int = option(4, "transformer blocks")
    n_heads: int = option(4, "attention heads")
    n_kv_heads: int | None = option(None, "key/value heads for grouped-query attention (default: n_heads)")
    d_ff: int | None = option(None, "SwiGLU hidden width (default: 8/3·d_model rounded up to a multiple of 32)")
    seq_len: int = option(256, "context length in tokens")
    vocab_size: int = option(0, "vocabulary size (0: taken from the tokenizer)")
    tie_embeddings: bool = option(True, "share the input embedding and output projection")
    qk_norm: bool = option(False, "RMSNorm on queries and keys per head")
    dropout: float = option(0.0, "dropout on embeddings, attention weights and residual branches")
    rope_theta: float = option(10000.0, "RoPE base frequency")
    norm_eps: float = option(1e-5, "RMSNorm epsilon")
    init_std: float = option(0.02, "standard deviation of weight initialisation")

    def resolved(self) -> ModelConfig:
        """The config with the preset applied and derived widths filled in."""
        cfg = self
        if self.preset is not None:
            if self.preset not in PRESETS:
                import difflib

                close = difflib.get_close_matches(self.preset, list(PRESETS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise DataeffError(f"model.preset: unknown preset {self.preset!r}{hint}; choose from {', '.join(PRESETS)}")
            d, n_layers, n_heads = PRESETS[self.preset]
            cfg = dataclasses.replace(cfg, preset=None, d_model=d, n_layers=n_layers, n_heads=n_heads)
        if cfg.n_kv_heads is None:
            cfg = dataclasses.replace(cfg, n_kv_heads=cfg.n_heads)
        if cfg.d_ff is None:
            cfg = dataclasses.replace(cfg, d_ff=32 * math.ceil(8 * cfg.d_model / 3 / 32))
        if cfg.d_model % cfg.n_heads:
            raise DataeffError(f"model: d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}")
        if cfg.n_heads % cfg.n_kv_heads:  # type: ignore[operator]
            raise DataeffError(f"model: n_heads={cfg.n_heads} is not divisible by n_kv_heads={cfg.n_kv_heads}")
        if (cfg.d_model // cfg.n_heads) % 2:
            raise DataeffError(f"model: head dimension {cfg.d_model // cfg.n_heads} must be even for RoPE")
        if not 0.0 <= cfg.dropout < 1.0:
            raise DataeffError(f"model.dropout: {cfg.dropout} must be in [0, 1)")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts from the config alone (equal to summing the built model's tensors)."""
    c = cfg.resolved()
    assert c.n_kv_heads is not None and c.d_ff is not None
    hd = c.head_dim
    attn = c.d_model * (c.n_heads + 2 * c.n_kv_heads) * hd + c.n_heads * hd * c.d_model
    mlp = 3 * c.d_model * c.d_ff
    norms = 2 * c.d_model + (2 * hd if c.qk_norm else 0)
    per_layer = attn + mlp + norms
    non_embedding = c.n_layers * per_layer + c.d_model  # + final norm
    embedding = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    return {"total": non_embedding + embedding, "non_embedding": non_embedding, "embedding": embedding}


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6·N (matmul weights, incl. the output head) plus causal attention."""
    c = cfg.resolved()
    counts = count_parameters(c)
    matmul_params = counts["non_embedding"] + c.vocab_size * c.d_model
    # QK^T and AV each cost 2·T·d per token forward, halved by the causal mask; ×3 for forward+backward.
    attention = 3 * 2 * 2 * c.n_layers * c.seq_len * c.d_model / 2
    return 6 * matmul_params + attention


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
    """Preallocated keys and values for every layer, for incremental decoding."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        assert cfg.n_kv_heads is not None
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        end = self.pos + t
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        self.pos += t


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

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
