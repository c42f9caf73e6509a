"""Optimizers and learning-rate schedules: AdamW with decay on matrices only, or Muon for the hidden matrices."""

from __future__ import annotations

import math

import torch

from dataeff.model.transformer import Transformer
from dataeff.train.config import OptimConfig


def lr_multiplier(step: int, total: int, o: OptimConfig) -> float:
    """Warmup, then cosine or warmup-stable-decay, evaluated for the update made at ``step`` (0-based)."""
    warmup = max(1, round(o.warmup * total)) if o.warmup > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_steps = max(1, round(o.decay * total))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    progress = (step - decay_start + 1) / decay_steps
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * (1 - min(progress, 1.0))


def build_optimizers(model: Transformer, o: OptimConfig) -> list[torch.optim.Optimizer]:
    """AdamW with decay on matrices only; with ``muon``, Muon takes the hidden matrices instead."""
    embeddings = {id(model.embed.weight)} | ({id(model.lm_head.weight)} if model.lm_head is not None else set())
    hidden = [p for p in model.parameters() if p.dim() == 2 and id(p) not in embeddings]
    other_matrices = [p for p in model.parameters() if p.dim() >= 2 and id(p) in embeddings]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    adam_kwargs = {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps}
    fused = {"fused": True} if next(model.parameters()).device.type in ("cpu", "cuda") else {}
    if o.name == "muon":
        muon = torch.optim.Muon(
            hidden, lr=o.muon_lr or o.lr, weight_decay=o.weight_decay, momentum=o.muon_momentum,
            adjust_lr_fn="match_rms_adamw",
        )
        adam = torch.optim.AdamW(
            [{"params": other_matrices, "weight_decay": o.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
            **adam_kwargs, **fused,
        )
        return [adam, muon]
    adam = torch.optim.AdamW(
        [{"params": hidden + other_matrices, "weight_decay": o.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
        **adam_kwargs, **fused,
    )
    return [adam]
