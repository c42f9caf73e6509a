"""Weight files: a model's tensors in safetensors with JSON metadata, written atomically, checked on loading.

Nothing here unpickles, so a weight file from an untrusted source cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_path


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights detached and contiguous on the CPU."""
    return {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}


def save_weights(path: str | Path, model: torch.nn.Module, metadata: dict[str, Any] | None = None) -> None:
    save_weights_tensors(path, model_state(model), metadata)


def save_weights_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Write named weights atomically, with ``metadata`` as JSON (what :func:`load_weights` returns)."""
    meta = {"dataeff": json.dumps(metadata or {})}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def assign_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load ``tensors`` (final weights, or a training checkpoint's ``model.*``) into ``model``, checking fit first."""
    if any(k.startswith("model.") for k in tensors):
        tensors = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    # Checked here because load_state_dict reports shape mismatches as a multi-line RuntimeError.
    bad = sorted(set(expected) ^ set(tensors)) or [k for k in expected if tensors[k].shape != expected[k].shape]
    if bad:
        raise DataeffError(f"{source}: weights do not fit the model (first mismatch: {bad[0]})")
    model.load_state_dict(tensors)


def load_weights(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights into ``model``; return the stored metadata."""
    tensors, meta = read_safetensors(path)
    assign_weights(model, tensors, path)
    return json.loads(meta.get("dataeff", "{}"))


def read_safetensors(path: str | Path, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (those whose names start with ``prefix``: the others are never read) and metadata."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118 (safe_open is not a mapping)
    except FileNotFoundError:
        raise DataeffError(f"{path}: checkpoint not found") from None
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise DataeffError(f"{path}: corrupt or unreadable safetensors file ({type(e).__name__}: {e})") from None
    return tensors, meta
