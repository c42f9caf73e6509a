"""Safetensors checkpoints holding model, optimizer and RNG state, written atomically.

Nothing here unpickles: tensors go to safetensors, everything else to the JSON metadata of the same file,
so a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_path

_STEP_FILE = re.compile(r"^step_(\d{9})\.safetensors$")
# Prefix of a checkpoint's extra tensors, apart from the model.* and opt*.* ones.
_EXTRA = "extra."


def _flatten_optimizer(prefix: str, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Move an optimizer state_dict's tensors into ``tensors`` and return the JSON-able remainder."""
    rest: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, pstate in state["state"].items():
        entry: dict[str, Any] = {}
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{idx}.{key}"] = value.detach().cpu().contiguous()
                entry[key] = {"tensor": f"{prefix}.{idx}.{key}"}
            else:
                entry[key] = value
        rest["state"][str(idx)] = entry
    return rest


def _unflatten_optimizer(rest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for idx, entry in rest["state"].items():
        state[int(idx)] = {
            key: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value else value
            for key, value in entry.items()
        }
    return {"state": state, "param_groups": rest["param_groups"]}


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights detached and contiguous on the CPU."""
    return {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}


def save_weights(path: str | Path, model: torch.nn.Module, metadata: dict[str, Any] | None = None) -> None:
    meta = {"dataeff": json.dumps(metadata or {})}
    with atomic_path(path) as tmp:
        save_file(model_state(model), str(tmp), metadata=meta)


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


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    step: int,
    extra: dict[str, Any] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """``extra`` is JSON metadata; ``extra_tensors`` (e.g. an EMA of the weights) come back from
    :func:`load_extra_tensors` under the same names."""
    tensors = {f"model.{k}": v for k, v in model_state(model).items()}
    tensors.update({f"{_EXTRA}{k}": v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()})
    opt_meta = [_flatten_optimizer(f"opt{i}", opt.state_dict(), tensors) for i, opt in enumerate(optimizers)]
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"step": str(step), "optimizers": json.dumps(opt_meta), "extra": json.dumps(extra or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]
) -> tuple[int, dict[str, Any]]:
    tensors, meta = read_safetensors(path)
    assign_weights(model, tensors, path)
    opt_meta = json.loads(meta["optimizers"])
    if len(opt_meta) != len(optimizers):
        raise DataeffError(f"{path}: checkpoint has {len(opt_meta)} optimizers, the run has {len(optimizers)}")
    for opt, rest in zip(optimizers, opt_meta, strict=True):
        opt.load_state_dict(_unflatten_optimizer(rest, tensors))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(meta["step"]), json.loads(meta.get("extra", "{}"))


def load_extra_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``extra_tensors`` saved with a checkpoint (none for checkpoints written without them)."""
    tensors, _ = read_safetensors(path, prefix=_EXTRA)
    return {k.removeprefix(_EXTRA): v for k, v in tensors.items()}


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:09d}.safetensors"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found)


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    for _, path in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        path.unlink(missing_ok=True)
