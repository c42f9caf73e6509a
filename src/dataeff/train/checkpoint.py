"""Training checkpoints: safetensors files holding model, optimizer and RNG state, written atomically.

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
from safetensors.torch import save_file

from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_path
from dataeff.model.weights import assign_weights, load_weights, model_state, read_safetensors, save_weights

# The weight files of dataeff.model.weights were defined here before the layered layout.
__all__ = ["assign_weights", "checkpoint_path", "list_checkpoints", "load_checkpoint", "load_extra_tensors", "load_weights",
           "model_state", "prune_checkpoints", "read_safetensors", "save_checkpoint", "save_weights"]

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
