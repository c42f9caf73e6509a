"""The model's config: its shape, named presets, and the parameter and FLOP counts that follow from them.

Pure arithmetic on the config; it imports no tensor library, so configs and sweeps can be planned without torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

from dataeff.config import option
from dataeff.errors import DataeffError

# name -> (d_model, n_layers, n_heads). Non-embedding parameters are ~12·d²·L; the vocabulary adds the rest.
PRESETS: dict[str, tuple[int, int, int]] = {
    "femto": (8, 2, 2),  # ~0.002M non-embedding: where a 25k-token world's loss still falls steeply with size
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
    d_model: int = option(128, "residual stream width", min=1)
    n_layers: int = option(4, "transformer blocks", min=1)
    n_heads: int = option(4, "attention heads", min=1)
    n_kv_heads: int | None = option(None, "key/value heads for grouped-query attention (default: n_heads)", min=1)
    d_ff: int | None = option(None, "SwiGLU hidden width (default: 8/3·d_model rounded up to a multiple of 32)", min=1)
    seq_len: int = option(256, "context length in tokens", min=1)
    vocab_size: int = option(0, "vocabulary size (0: taken from the tokenizer)", min=0, max=2**24)
    tie_embeddings: bool = option(True, "share the input embedding and output projection")
    qk_norm: bool = option(False, "RMSNorm on queries and keys per head")
    dropout: float = option(0.0, "dropout on embeddings, attention weights and residual branches", min=0.0, below=1.0)
    rope_theta: float = option(10000.0, "RoPE base frequency", above=0.0)
    norm_eps: float = option(1e-5, "RMSNorm epsilon", above=0.0)
    init_std: float = option(0.02, "standard deviation of weight initialisation", above=0.0)

    def resolved(self) -> ModelConfig:
        """The config with the preset applied and derived widths filled in."""
        cfg = self
        if self.preset is not None:
            if self.preset not in PRESETS:
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
