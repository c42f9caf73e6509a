"""``dataeff eval``: score a trained run on any split of its token store or on any text file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dataeff import checkpoint as ckpt
from dataeff.config import from_dict, option, read_yaml
from dataeff.dist import pick_device
from dataeff.errors import DataeffError
from dataeff.evaluate import evaluate
from dataeff.model import ModelConfig, Transformer
from dataeff.tokens import PreparedData, load_prepared, prepare, tokenize_file


@dataclass
class EvalConfig:
    run_dir: str = option("", "the run directory to evaluate (required)")
    split: str = option("val", "split of the run's token store to score (train, val, test)")
    file: str | None = option(None, "score this text file instead of a split (documents as the corpus separates them)")
    checkpoint: str | None = option(None, "weights to score (default: the run's final model.safetensors)")
    max_tokens: int | None = option(None, "score at most this many tokens (default: all)")
    batch_size: int = option(16, "sequences per forward pass")
    dtype: str = option("bf16", "bf16 or fp32")
    device: str = option("auto", "auto, cpu, cuda or mps")


def load_model(run_dir: str | Path, weights: str | Path | None = None, device: str = "cpu") -> Transformer:
    """The trained model of a run directory: its final weights, or those of a given checkpoint file."""
    run_dir = Path(run_dir)
    manifest = run_dir / "manifest.json"
    if not manifest.exists():
        raise DataeffError(f"{run_dir}: not a dataeff run directory (no manifest.json)")
    model_cfg = from_dict(ModelConfig, json.loads(manifest.read_text())["model"], source=str(manifest))
    path = Path(weights) if weights else run_dir / "model.safetensors"
    if not path.exists():
        raise DataeffError(f"{path}: not found (is the run finished? `dataeff train` resumes it)")
    model = Transformer(model_cfg, init_seed=None)
    ckpt.load_weights(path, model)
    return model.to(pick_device(device)).eval()


def run_prepared(run_dir: str | Path) -> PreparedData:
    """The token store a run trained on (rebuilt from its config if the cache was deleted)."""
    from dataeff.train import RunConfig

    run_dir = Path(run_dir)
    manifest = run_dir / "manifest.json"
    if manifest.exists():
        store = Path(json.loads(manifest.read_text()).get("data_store", ""))
        if (store / "meta.json").exists():
            return load_prepared(store)
    data, lines = read_yaml(run_dir / "config.yaml")
    cfg = from_dict(RunConfig, data, source=str(run_dir / "config.yaml"), lines=lines)
    return prepare(cfg.data, cfg.tokenizer, progress=False)


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    if not cfg.run_dir:
        raise DataeffError("eval: run_dir is required, e.g. `dataeff eval run_dir=runs/abc123`")
    model = load_model(cfg.run_dir, cfg.checkpoint, cfg.device)
    prepared = run_prepared(cfg.run_dir)
    if cfg.file:
        split = tokenize_file(prepared, cfg.file)
        source = cfg.file
    else:
        if cfg.split not in prepared.splits:
            raise DataeffError(f"eval.split: {cfg.split!r} is not in the run's token store (has {', '.join(prepared.splits)})")
        split = prepared.split(cfg.split)
        source = cfg.split
    with torch.inference_mode():
        result = evaluate(model, split.tokens, n_bytes=split.n_bytes, n_words=split.n_words, seq_len=model.cfg.seq_len,
                          batch_size=cfg.batch_size, max_tokens=cfg.max_tokens, dtype=cfg.dtype)
    return {"run_dir": str(cfg.run_dir), "source": source, **result.to_dict()}
