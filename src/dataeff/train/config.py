"""The config of one training run, and the part of its identity the config alone fixes. Imports nothing but
configs. The whole identity (with the data's content and the initial weights') is :mod:`dataeff.train.identity`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

from dataeff.config import non_default, option, section
from dataeff.data.config import DataConfig, TokenizerConfig
from dataeff.errors import DataeffWarning
from dataeff.model.config import ModelConfig


@dataclass
class OptimConfig:
    name: Literal["adamw", "muon"] = option("adamw", "adamw, or muon for hidden matrices with AdamW for the rest")
    lr: float = option(3e-3, "peak learning rate (AdamW groups)", min=0.0)
    weight_decay: float = option(0.1, "decoupled weight decay on matrices (the paper's optimum is 0.8-3.2)")
    beta1: float = option(0.9, "AdamW beta1", min=0.0, below=1.0)
    beta2: float = option(0.95, "AdamW beta2", min=0.0, below=1.0)
    eps: float = option(1e-8, "AdamW epsilon", above=0.0)
    muon_lr: float | None = option(None, "Muon learning rate (default: lr; Muon's update is RMS-matched to AdamW)", min=0.0)
    muon_momentum: float = option(0.95, "Muon momentum", min=0.0, below=1.0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)", min=0.0)
    schedule: Literal["cosine", "wsd", "constant"] = option("cosine", "learning-rate schedule after warmup")
    warmup: float = option(0.01, "warmup length as a fraction of all steps", min=0.0, max=1.0)
    decay: float = option(0.2, "wsd: length of the final linear decay as a fraction of all steps", min=0.0, max=1.0)
    min_lr_ratio: float = option(0.0, "final learning rate as a fraction of the peak", min=0.0, max=1.0)

    def __post_init__(self) -> None:
        if self.lr == 0:
            warnings.warn("optim.lr=0: the weights never change", DataeffWarning, stacklevel=3)
        if self.weight_decay < 0:
            warnings.warn(f"optim.weight_decay={self.weight_decay:g} is negative: it pushes the weights away from 0",
                          DataeffWarning, stacklevel=3)


@dataclass
class TrainConfig:
    epochs: float = option(4.0, "passes over the token budget (fractional allowed)", above=0.0)
    batch_tokens: int = option(8192, "global batch size in tokens (a multiple of model.seq_len)", min=1)
    micro_batch_size: int = option(0, "sequences per forward pass per process (0: the whole per-process batch)", min=0)
    shuffle: Literal["sequence", "document", "padded"] = option(
        "sequence", "per-epoch reshuffle of sequences, or of documents re-packed, or of padded windows that never mix "
        "two documents (needed by conditional documents, data.prompt_field)")
    init_from: str = option(
        "scratch", "where the weights start: scratch (initialised with init_seed), a dataeff run directory (its "
        "final weights), or a Hugging Face Llama/Qwen3 checkpoint directory (hf:PATH or a path holding config.json); "
        "the model's shape comes from it, model.seq_len and model.dropout from this config")
    init_seed: int = option(0, "seed of the weight initialisation", min=0)
    data_seed: int = option(0, "seed of the data order and dropout", min=0)
    dtype: Literal["auto", "bf16", "fp32"] = option("auto", "bf16 autocast (fp32 master weights), plain fp32, or auto: bf16 where the device computes it natively, else fp32")
    compile: bool | Literal["auto"] = option(
        False, "torch.compile the model: true, false, or auto (time the first steps eagerly, then compile if the "
               "steps left pay for the compile cost; short runs stay eager)")
    device: str = option("auto", "auto, cpu, cuda or mps")
    threads: int = option(0, "torch intra-op threads (0: torch's default)", min=0, max=4096)
    eval_every: int = option(0, "steps between held-out evaluations (0: ten per run)", min=0)
    eval_tokens: int = option(65536, "held-out tokens scored at periodic evaluations", min=1)
    final_eval_tokens: int | None = option(None, "held-out tokens scored at the end (default: the whole split)", min=1)
    eval_batch_size: int = option(16, "sequences per evaluation forward pass", min=1)
    checkpoint_every: int = option(0, "steps between checkpoints (0: at every evaluation)", min=0)
    keep_checkpoints: int = option(2, "checkpoints kept on disk (the newest ones)", min=1)
    ema: float = option(0.0, "EMA of the weights: decay per optimizer step, e.g. 0.999 (0: off); saved as model_ema.safetensors")
    snapshots: int = option(0, "weight snapshots evenly spaced over the last snapshot_fraction of training, the last at "
                               "the final step; with 2 or more, their average (SWA) and snapshot ensemble are scored")
    snapshot_fraction: float = option(0.25, "share of the run, at its end, that train.snapshots spans")
    log_every: int = option(10, "steps between training-loss rows in metrics.jsonl", min=1)
    progress: bool = option(True, "show a progress bar")
    loggers: list[Literal["tensorboard", "wandb"]] = option(
        [], "mirror metrics.jsonl to TensorBoard (RUN_DIR/tensorboard) and/or Weights & Biases (offline unless "
            "WANDB_MODE says otherwise); needs pip install 'dataeff[track]'")
    wandb_project: str = option("dataeff", "the Weights & Biases project")
    log_group: str | None = option(None, "the group of the run in Weights & Biases (a pipeline sets its name)")


@dataclass
class DistillConfig:
    teachers: list[str] = option(
        [], "the teacher: run directories (several form an ensemble) or one ensemble.json; empty: no distillation")
    combine: Literal["prob", "logit"] = option("prob", "how an ensemble teacher's members combine per token")
    weight: float = option(0.5, "α: loss = (1-α)·cross-entropy + α·T²·KL(teacher ‖ student); 1 = KL only", above=0.0, max=1.0)
    temperature: float = option(1.0, "softmax temperature T of teacher and student inside the KL", above=0.0)
    teacher_cache: Literal["online", "topk"] = option(
        "online", "online: teachers stay resident and run on every batch; topk: their top-k log-probs per training "
        "position are computed once, stored in the run directory and read from disk (needs train.shuffle=sequence)")
    top_k: int = option(64, "topk: teacher log-probs kept per position", min=1)

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
_NOT_IDENTITY = {("run_dir",), ("data", "cache_dir"), ("train", "progress"), ("train", "threads"), ("train", "log_every"),
                 ("train", "loggers"), ("train", "wandb_project"), ("train", "log_group")}
# A run's identity leaves out every field at its default, so adding a field never changes an existing run's
# hash. Bump this whenever a default of RunConfig (or of a section in it) changes: an old run trained with the
# old default must not answer for the new one. tests/test_config.py pins the defaults each version stands for.
IDENTITY_VERSION = 2


def config_identity(cfg: RunConfig) -> dict[str, Any]:
    """The config minus the fields that only change where things are kept or how progress is shown, and minus
    every field at its default."""
    data = non_default(cfg)
    for path in _NOT_IDENTITY:
        node = data
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return {"identity_version": IDENTITY_VERSION, **{k: v for k, v in data.items() if v != {}}}
