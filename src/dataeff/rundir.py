"""The run-directory contract: every run directory holds

- ``config.yaml``: the resolved config (rerunning it reproduces the run),
- ``manifest.json``: versions, git sha, seeds, machine, data store and parameter counts,
- ``metrics.jsonl``: one JSON object per logged step or evaluation,
- ``checkpoints/step_*.safetensors``: model, optimizer and RNG state (exact resumption),
- ``model.safetensors`` + ``tokenizer.json``: the final weights and the tokenizer that reads them,
- with ``train.ema`` / ``train.snapshots``: ``model_ema.safetensors``, ``snapshots/step_*.safetensors`` and
  ``model_swa.safetensors`` (their average), see :mod:`dataeff.averaging`,
- ``DONE`` (final metrics) on success or ``FAILED`` (the reason) on failure; neither while incomplete.
"""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dataeff
from dataeff.fsutil import atomic_write_json, atomic_write_text, read_jsonl

DONE = "DONE"
FAILED = "FAILED"


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


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def rewind(self, step: int) -> None:
        rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)
