"""The run-directory contract: every run directory holds

- ``config.yaml``: the resolved config (rerunning it reproduces the run),
- ``manifest.json``: versions, git sha, seeds, machine, data store and parameter counts,
- ``metrics.jsonl``: one JSON object per logged step or evaluation,
- ``checkpoints/step_*.safetensors``: model, optimizer and RNG state (exact resumption),
- ``model.safetensors`` + ``tokenizer.json``: the final weights and the tokenizer that reads them,
- with ``train.ema`` / ``train.snapshots``: ``model_ema.safetensors``, ``snapshots/step_*.safetensors`` and
  ``model_swa.safetensors`` (their average), see :mod:`dataeff.averaging`,
- ``DONE`` (final metrics) on success or ``FAILED`` (the reason) on failure; neither while incomplete,
- ``.lock``: locked (an OS file lock) while a process works in the directory.
"""

from __future__ import annotations

import contextlib
import json
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dataeff
from dataeff.config import from_dict, read_yaml
from dataeff.data.tokens import PreparedData, load_prepared, prepare
from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_write_json, atomic_write_text, exclusive_lock, read_jsonl
from dataeff.model.config import ModelConfig
from dataeff.model.transformer import Transformer
from dataeff.train import checkpoint as ckpt
from dataeff.train.config import RunConfig
from dataeff.train.dist import pick_device

DONE = "DONE"
FAILED = "FAILED"
LOCK = ".lock"


def git_sha() -> str | None:
    """The commit of the dataeff source in use (with ``-dirty`` if modified), or None outside a checkout."""
    src = Path(dataeff.__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def manifest(extra: dict[str, Any]) -> dict[str, Any]:
    import safetensors
    import tokenizers

    return {
        "dataeff": dataeff.__version__,
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def status(run_dir: str | Path) -> str:
    """``done``, ``failed``, ``partial`` (started, not finished) or ``missing``."""
    d = Path(run_dir)
    if (d / DONE).exists():
        return "done"
    if (d / FAILED).exists():
        return "failed"
    if (d / "config.yaml").exists():
        return "partial"
    return "missing"


def read_result(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / DONE).read_text())


def read_failure(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / FAILED).read_text())


def mark_done(run_dir: str | Path, result: dict[str, Any]) -> None:
    (Path(run_dir) / FAILED).unlink(missing_ok=True)
    atomic_write_json(Path(run_dir) / DONE, result)


def mark_failed(run_dir: str | Path, reason: str, **details: Any) -> None:
    atomic_write_json(Path(run_dir) / FAILED, {"reason": reason, **details})


def run_lock(run_dir: str | Path) -> contextlib.AbstractContextManager[None]:
    """The directory's exclusive lock, held while a process works in it (see :func:`dataeff.fsutil.exclusive_lock`)."""
    return exclusive_lock(Path(run_dir) / LOCK, str(run_dir))


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, rows after the checkpoint's step are dropped. Each row
    written is also passed to every ``mirror`` (experiment trackers), after the file has it."""

    def __init__(self, path: str | Path, mirrors: Sequence[Callable[[dict[str, Any]], None]] = ()):
        self.path = Path(path)
        self.mirrors = list(mirrors)

    def rewind(self, step: int) -> None:
        self._keep(lambda r: r.get("step", 0) <= step)

    def drop_evaluation(self, step: int) -> None:
        """Remove held-out rows logged at ``step`` (before they are logged again)."""
        self._keep(lambda r: not (r.get("step") == step and "val_loss" in r))

    def _keep(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        rows = read_jsonl(self.path)
        kept = [r for r in rows if keep(r)]
        if len(kept) != len(rows):
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        for mirror in self.mirrors:
            mirror(row)

    def rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)


# ---------------------------------------------------------------------------------------------------------
# reading a finished run back


def model_config(run_dir: str | Path) -> ModelConfig:
    """The model config a run directory's manifest records."""
    run_dir = Path(run_dir)
    manifest = run_dir / "manifest.json"
    if not manifest.exists():
        raise DataeffError(f"{run_dir}: not a dataeff run directory (no manifest.json)")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataeffError(f"{manifest}: malformed JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise DataeffError(f"{manifest}: no 'model' entry (the run's model config)")
    return from_dict(ModelConfig, data["model"], source=str(manifest))


def load_model(run_dir: str | Path, weights: str | Path | None = None, device: str = "cpu") -> Transformer:
    """The trained model of a run directory: its final weights, or those of a given checkpoint file."""
    run_dir = Path(run_dir)
    model_cfg = model_config(run_dir)
    path = Path(weights) if weights else run_dir / "model.safetensors"
    if not path.exists():
        raise DataeffError(f"{path}: not found (is the run finished? `dataeff train` resumes it)")
    model = Transformer(model_cfg, init_seed=None)
    ckpt.load_weights(path, model)
    return model.to(pick_device(device)).eval()


def run_prepared(run_dir: str | Path) -> PreparedData:
    """The token store a run trained on (rebuilt from its config if the cache was deleted)."""
    run_dir = Path(run_dir)
    manifest = run_dir / "manifest.json"
    if manifest.exists():
        store = Path(json.loads(manifest.read_text()).get("data_store", ""))
        if (store / "meta.json").exists():
            return load_prepared(store)
    data, lines = read_yaml(run_dir / "config.yaml")
    cfg = from_dict(RunConfig, data, source=str(run_dir / "config.yaml"), lines=lines)
    return prepare(cfg.data, cfg.tokenizer, progress=False)
