"""Where a run's weights start (``train.init_from``): scratch, a dataeff run, or a Hugging Face checkpoint.

Continued pretraining and SBP's synthesizer are ordinary runs that start from trained weights, so they use the
ordinary trainer with its resumption, DDP, averaging and export. A trained source fixes the model's shape; only
the context length and dropout, which no weight depends on, come from the run's own config. The run's data must
be tokenized with the source's tokenizer, or token ids would mean other words.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from dataeff.data.corpora import file_sha256
from dataeff.data.tokenizer import Tokenizer
from dataeff.errors import DataeffError
from dataeff.model.config import ModelConfig
from dataeff.model.hf import from_hf
from dataeff.model.transformer import Transformer
from dataeff.model.weights import assign_weights, read_safetensors
from dataeff.train.config import RunConfig
from dataeff.train.rundir import model_config

# Fields a trained source fixes: every weight's shape or meaning depends on them.
SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "tie_embeddings", "qk_norm",
                "rope_theta", "norm_eps")


@dataclass(frozen=True)
class Source:
    kind: str  # scratch, run or hf
    path: Path | None
    weights: list[Path]  # the files the weights come from, fingerprinted in the run's manifest


def resolve(init_from: str) -> Source:
    if init_from == "scratch":
        return Source("scratch", None, [])
    path = Path(init_from.removeprefix("hf:"))
    if not init_from.startswith("hf:") and (path / "manifest.json").is_file():
        return Source("run", path, [path / "model.safetensors"])
    if (path / "config.json").is_file():
        return Source("hf", path, sorted(path.glob("*.safetensors")))
    raise DataeffError(f"train.init_from={init_from!r}: not 'scratch', a dataeff run directory (with manifest.json) "
                       "or a Hugging Face checkpoint directory (with config.json)")


def fingerprint(source: Source) -> dict[str, str]:
    """sha256 of each weight file the run starts from: part of the run's identity, so other weights at the same
    path make another run."""
    return {path.name: file_sha256(path) for path in source.weights}


def _shape(cfg: ModelConfig, source: ModelConfig, where: str) -> ModelConfig:
    """The source's shape with the run's context and dropout; a shape field the run sets otherwise is refused."""
    asked, default = cfg.resolved(), dataclasses.replace(ModelConfig(), vocab_size=cfg.vocab_size).resolved()
    for name in SHAPE_FIELDS:
        mine, theirs = getattr(asked, name), getattr(source, name)
        if mine != theirs and mine != getattr(default, name) and name != "vocab_size":
            raise DataeffError(f"model.{name}={mine} differs from {where}'s {theirs}; a run started from trained "
                               f"weights takes their shape (leave model.{name} unset)")
    return dataclasses.replace(source, seq_len=cfg.seq_len, dropout=cfg.dropout)


def initial_model(cfg: RunConfig, tokenizer: Tokenizer) -> Transformer:
    """The model a run starts with, before any checkpoint of its own is loaded."""
    init_from = cfg.train.init_from
    source = resolve(init_from)
    if source.kind == "scratch":
        return Transformer(dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size).resolved(),
                           init_seed=cfg.train.init_seed)
    assert source.path is not None
    theirs = Tokenizer.load(source.path / "tokenizer.json")
    if theirs.ids_sha256 != tokenizer.ids_sha256:
        raise DataeffError(f"train.init_from={init_from}: its tokenizer differs from the data's; tokenize the data with "
                           f"it: tokenizer.kind=file tokenizer.path={source.path / 'tokenizer.json'}")
    if source.kind == "run":
        shape = model_config(source.path)
        tensors, _ = read_safetensors(source.weights[0])
    else:
        hf_model = from_hf(source.path)
        shape, tensors = hf_model.cfg, hf_model.state_dict()
    model = Transformer(_shape(dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size), shape, init_from),
                        init_seed=None)
    assign_weights(model, tensors, source.weights[0] if source.weights else init_from)
    return model
