"""Training metrics mirrored to TensorBoard and Weights & Biases (``train.loggers=[tensorboard,wandb]``).

``metrics.jsonl`` stays the run's record: every row it gets is passed on here, numbers only, at its step.
Both are optional extras (``pip install 'dataeff[track]'``). TensorBoard writes event files into the run's
``tensorboard/`` directory. W&B runs offline unless ``WANDB_MODE`` says otherwise, so training never waits on
a network; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads a run later. A W&B run is named by the run's
hash, carries its config and is grouped by ``train.log_group`` (a pipeline sets its name there), so a sweep
shows up as one group of a project.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Protocol

from dataeff.config import to_dict
from dataeff.errors import DataeffError
from dataeff.train.config import RunConfig


class Tracker(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise DataeffError("train.loggers=[tensorboard] needs TensorBoard: pip install 'dataeff[track]'") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        for key, value in _scalars(row).items():
            self.writer.add_scalar(key, value, global_step=int(row["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, cfg: RunConfig, run_dir: Path):
        try:
            import wandb
        except ImportError:
            raise DataeffError("train.loggers=[wandb] needs Weights & Biases: pip install 'dataeff[track]'") from None
        t = cfg.train
        self.run = wandb.init(project=t.wandb_project, group=t.log_group, name=run_dir.name, id=run_dir.name,
                              dir=str(run_dir), config=to_dict(cfg), resume="allow", reinit="create_new",
                              mode=os.environ.get("WANDB_MODE", "offline"))  # type: ignore[arg-type]

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(_scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


def open_trackers(cfg: RunConfig, run_dir: Path) -> list[Tracker]:
    """The trackers ``train.loggers`` names, open on ``run_dir``."""
    out: list[Tracker] = []
    for name in cfg.train.loggers:
        out.append(TensorBoard(run_dir) if name == "tensorboard" else WandB(cfg, run_dir))
    return out
