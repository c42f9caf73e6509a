"""``dataeff eval``: score a trained run or an ensemble on any split of its token store or on any text file,
and optionally on downstream tasks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dataeff.config import option
from dataeff.data.tokens import PreparedData, TokenSplit, tokenize_file
from dataeff.errors import DataeffError
from dataeff.eval.ensemble import evaluate_ensemble, resolve_members
from dataeff.eval.loss import evaluate
from dataeff.eval.tasks import TasksConfig, run_tasks
from dataeff.train.rundir import load_model, run_prepared


@dataclass
class EvalConfig:
    run_dir: str = option("", "the run directory to evaluate, or an ensemble.json (or set members)")
    members: list[str] = option([], "run directories of an ensemble's members, scored by probability and logit "
                                    "averaging (and its saved weights, for an ensemble.json)")
    split: str = option("val", "split of the run's token store to score (train, val, test)")
    file: str | None = option(None, "score this text file instead of a split (documents as the corpus separates them)")
    checkpoint: str | None = option(None, "weights to score (default: the run's final model.safetensors; also "
                                          "model_ema.safetensors, model_swa.safetensors, snapshots/ or checkpoints/ files)")
    max_tokens: int | None = option(None, "score at most this many tokens (default: all)", min=1)
    batch_size: int = option(16, "sequences per forward pass", min=1)
    dtype: str = option("auto", "bf16, fp32, or auto: bf16 where the device computes it natively, else fp32")
    device: str = option("auto", "auto, cpu, cuda or mps")
    tasks: list[str] = option([], "also score these downstream tasks (arc_easy, arc_challenge, piqa, hellaswag, "
                                  "blimp, lambada_openai) from DATAEFF_DATA_DIR")
    limit: int | None = option(None, "tasks: at most this many items per task (a seeded random subset)", min=1)


def _split(cfg: EvalConfig, prepared: PreparedData) -> tuple[TokenSplit, str]:
    if cfg.file:
        return tokenize_file(prepared, cfg.file), cfg.file
    if cfg.split not in prepared.splits:
        raise DataeffError(f"eval.split: {cfg.split!r} is not in the run's token store (has {', '.join(prepared.splits)})")
    return prepared.split(cfg.split), cfg.split


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    if bool(cfg.run_dir) == bool(cfg.members):
        raise DataeffError("eval: give a run directory or ensemble.json (`dataeff eval runs/abc123`) or members=[...]")
    ensemble = list(cfg.members) or ([cfg.run_dir] if cfg.run_dir.endswith(".json") else [])
    out = _eval_ensemble(cfg, ensemble) if ensemble else _eval_model(cfg)
    if cfg.tasks:
        tasks = run_tasks(TasksConfig(run_dir="" if ensemble else cfg.run_dir, members=ensemble,
                                      tasks=list(cfg.tasks), limit=cfg.limit, device=cfg.device, progress=False))
        out["tasks"] = tasks["tasks"]
    return out


def _eval_ensemble(cfg: EvalConfig, source: list[str]) -> dict[str, Any]:
    if cfg.checkpoint:
        raise DataeffError("eval.checkpoint: an ensemble is scored with its members' final weights")
    members, _ = resolve_members(source)
    split, where = _split(cfg, run_prepared(members[0]))
    ev = evaluate_ensemble(source, split, batch_size=cfg.batch_size, max_tokens=cfg.max_tokens, dtype=cfg.dtype,
                           device=cfg.device)
    d = ev.to_dict()
    return {"members": members, "source": where, "prob": d["prob"][-1], "logit": d["logit"][-1],
            "weighted": d["weighted"], "weights": d["weights"], "by_k": {"k": d["k"], "prob": d["prob"],
                                                                          "logit": d["logit"]},
            "members_alone": d["members"]}


def _eval_model(cfg: EvalConfig) -> dict[str, Any]:
    model = load_model(cfg.run_dir, cfg.checkpoint, cfg.device)
    split, source = _split(cfg, run_prepared(cfg.run_dir))
    with torch.inference_mode():
        result = evaluate(model, split.tokens, n_bytes=split.n_bytes, n_words=split.n_words, seq_len=model.cfg.seq_len,
                          batch_size=cfg.batch_size, max_tokens=cfg.max_tokens, dtype=cfg.dtype)
    return {"run_dir": str(cfg.run_dir), "source": source, **result.to_dict()}
