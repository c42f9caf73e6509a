"""The config of one training run and its identity. Imports nothing but configs.

A run's identity is its config minus the fields that only change where things are kept or how progress is
shown; its hash names the run directory, so equal identities share one run and different ones never do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dataeff.config import config_hash, non_default, option, section
from dataeff.data.config import DataConfig, TokenizerConfig
from dataeff.model.config import ModelConfig


@dataclass
class OptimConfig:
    name: Literal["adamw", "muon"] = option("adamw", "adamw, or muon for hidden matrices with AdamW for the rest")
    lr: float = option(3e-3, "peak learning rate (AdamW groups)")
    weight_decay: float = option(0.1, "decoupled weight decay on matrices (the paper's optimum is 0.8-3.2)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    muon_lr: float | None = option(None, "Muon learning rate (default: lr; Muon's update is RMS-matched to AdamW)")
    muon_momentum: float = option(0.95, "Muon momentum")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)")
    schedule: Literal["cosine", "wsd", "constant"] = option("cosine", "learning-rate schedule after warmup")
    warmup: float = option(0.01, "warmup length as a fraction of all steps")
    decay: float = option(0.2, "wsd: length of the final linear decay as a fraction of all steps")
    min_lr_ratio: float = option(0.0, "final learning rate as a fraction of the peak")


@dataclass
class TrainConfig:
    epochs: float = option(4.0, "passes over the token budget (fractional allowed)")
    batch_tokens: int = option(8192, "global batch size in tokens (a multiple of model.seq_len)")
    micro_batch_size: int = option(0, "sequences per forward pass per process (0: the whole per-process batch)")
    shuffle: Literal["sequence", "document"] = option("sequence", "per-epoch reshuffle of sequences or of documents")
    init_from: str = option(
        "scratch", "where the weights start: scratch (initialised with init_seed), a dataeff run directory (its "
        "final weights), or a Hugging Face Llama/Qwen3 checkpoint directory (hf:PATH or a path holding config.json); "
        "the model's shape comes from it, model.seq_len and model.dropout from this config")
    init_seed: int = option(0, "seed of the weight initialisation")
    data_seed: int = option(0, "seed of the data order and dropout")
    dtype: Literal["bf16", "fp32"] = option("bf16", "bf16 autocast (fp32 master weights) or plain fp32")
    compile: bool = option(False, "torch.compile the model")
    device: str = option("auto", "auto, cpu, cuda or mps")
    threads: int = option(0, "torch intra-op threads (0: torch's default)")
    eval_every: int = option(0, "steps between held-out evaluations (0: ten per run)")
    eval_tokens: int = option(65536, "held-out tokens scored at periodic evaluations")
    final_eval_tokens: int | None = option(None, "held-out tokens scored at the end (default: the whole split)")
    eval_batch_size: int = option(16, "sequences per evaluation forward pass")
    checkpoint_every: int = option(0, "steps between checkpoints (0: at every evaluation)")
    keep_checkpoints: int = option(2, "checkpoints kept on disk (the newest ones)")
    ema: float = option(0.0, "EMA of the weights: decay per optimizer step, e.g. 0.999 (0: off); saved as model_ema.safetensors")
    snapshots: int = option(0, "weight snapshots evenly spaced over the last snapshot_fraction of training, the last at "
                               "the final step; with 2 or more, their average (SWA) and snapshot ensemble are scored")
    snapshot_fraction: float = option(0.25, "share of the run, at its end, that train.snapshots spans")
    log_every: int = option(10, "steps between training-loss rows in metrics.jsonl")
    progress: bool = option(True, "show a progress bar")


@dataclass
class DistillConfig:
    teachers: list[str] = option(
        [], "the teacher: run directories (several form an ensemble) or one ensemble.json; empty: no distillation")
    combine: Literal["prob", "logit"] = option("prob", "how an ensemble teacher's members combine per token")
    weight: float = option(0.5, "α: loss = (1-α)·cross-entropy + α·T²·KL(teacher ‖ student); 1 = KL only")
    temperature: float = option(1.0, "softmax temperature T of teacher and student inside the KL")
    teacher_cache: Literal["online", "topk"] = option(
        "online", "online: teachers stay resident and run on every batch; topk: their top-k log-probs per training "
        "position are computed once, stored in the run directory and read from disk (needs train.shuffle=sequence)")
    top_k: int = option(64, "topk: teacher log-probs kept per position")

    def __post_init__(self) -> None:
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"weight (α) must be in (0, 1], got {self.weight}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")


@dataclass
class RunConfig:
    run_dir: str | None = option(None, "where the run lives (default: runs/<config hash>)")
    data: DataConfig = section(DataConfig, "corpus and token budget")
    tokenizer: TokenizerConfig = section(TokenizerConfig, "tokenizer")
    model: ModelConfig = section(ModelConfig, "model shape")
    optim: OptimConfig = section(OptimConfig, "optimizer and schedule")
    train: TrainConfig = section(TrainConfig, "training loop")
    distill: DistillConfig = section(DistillConfig, "token-level distillation from a teacher model or ensemble")


# Fields that do not change what a run computes: they are left out of its identity.
_NOT_IDENTITY = {("run_dir",), ("data", "cache_dir"), ("train", "progress"), ("train", "threads"), ("train", "log_every")}
# A run's identity leaves out every field at its default, so adding a field never changes an existing run's
# hash. Bump this whenever a default of RunConfig (or of a section in it) changes: an old run trained with the
# old default must not answer for the new one. tests/test_config.py pins the defaults each version stands for.
IDENTITY_VERSION = 1


def run_identity(cfg: RunConfig) -> dict[str, Any]:
    data = non_default(cfg)
    for path in _NOT_IDENTITY:
        node = data
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return {"identity_version": IDENTITY_VERSION, **{k: v for k, v in data.items() if v != {}}}


def run_hash(cfg: RunConfig) -> str:
    return config_hash(run_identity(cfg))


def default_run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / run_hash(cfg)
