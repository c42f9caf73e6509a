"""A run's identity: what makes two runs the same run. Its hash names the run's directory.

The identity is the config (minus bookkeeping fields and defaults, :func:`~dataeff.train.config.config_identity`),
the content of the data it trains on (the token store's content-addressed name: corpus files, data settings,
tokenizer) and the content of the weights it starts from. A changed corpus file or replaced initial weights
therefore make a new run instead of returning an old one's result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dataeff.config import config_hash, from_dict, read_yaml
from dataeff.data.tokens import store_identity
from dataeff.train import init
from dataeff.train.config import RunConfig, config_identity


def run_identity(cfg: RunConfig) -> dict[str, Any]:
    identity = {**config_identity(cfg), "data": store_identity(cfg.data, cfg.tokenizer)}
    if cfg.train.init_from != "scratch":
        identity["init_weights"] = init.fingerprint(init.resolve(cfg.train.init_from))
    return identity


def run_hash(cfg: RunConfig) -> str:
    return config_hash(run_identity(cfg))


def default_run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / run_hash(cfg)


def recorded_identity(run_dir: Path) -> dict[str, Any] | None:
    """The identity of the run a directory holds: as its manifest recorded it when training started (so a corpus
    changed since then shows), else computed from its config.yaml; None for a directory holding no run."""
    manifest = run_dir / "manifest.json"
    if manifest.exists():
        recorded = json.loads(manifest.read_text(encoding="utf-8")).get("identity")
        if recorded is not None:
            return recorded
    config = run_dir / "config.yaml"
    if not config.exists():
        return None
    return run_identity(from_dict(RunConfig, read_yaml(config)[0], source=str(config)))


def difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted keys where two identities differ, as ``key: old → new`` (a missing key is its default)."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(key, "default"), flat_new.get(key, "default")
        if a != b:
            out.append(f"{key}: {_short(a)} → {_short(b)}")
    return out


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "init_weights":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
