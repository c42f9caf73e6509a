"""``dataeff ensemble``: train K members that differ by seed through the executor, save and score the ensemble.

A member is its base config with other seeds: the initialisation, the data order, or both (the paper varies
both; either alone captures most of the gain). Members are ordinary runs in ``<out>/runs/<config hash>``, so
a rerun trains only missing members, and a larger K reuses the smaller ensemble's members.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dataeff.config import option, section
from dataeff.data.tokens import fitness_split, prepare
from dataeff.errors import DataeffError
from dataeff.eval.ensemble import EnsembleSpec, evaluate_ensemble, save_ensemble
from dataeff.experiment.executor import ExecutorConfig, run_jobs
from dataeff.fsutil import atomic_write_json
from dataeff.train.config import RunConfig

Vary = Literal["both", "init", "data"]


def member_config(base: RunConfig, i: int, vary: Vary = "both", first_seed: int = 0) -> RunConfig:
    """Member ``i``: seed ``first_seed + i`` for what varies; the base's own seed for what does not."""
    seed = first_seed + i
    t = base.train
    return dataclasses.replace(base, run_dir=None, train=dataclasses.replace(
        t, init_seed=seed if vary in ("both", "init") else t.init_seed,
        data_seed=seed if vary in ("both", "data") else t.data_seed))


@dataclass
class EnsembleTrainConfig:
    name: str = option("ensemble", "the ensemble's name (in ensemble.json)")
    out: str = option("", "directory of the members' runs, ensemble.json and scores.json (default: runs/ensembles/<name>)")
    members: int = option(4, "K: members to train", min=1)
    vary: Vary = option("both", "what differs between members: both seeds, the initialisation, or the data order")
    first_seed: int = option(0, "member i uses seed first_seed + i", min=0)
    combine: Literal["prob", "logit"] = option("prob", "how ensemble.json combines members by default")
    fitness_tokens: int = option(
        16384, "held-out training-pool tokens (disjoint from validation) to learn member weights on (0: none)", min=0)
    base: RunConfig = section(RunConfig, "the members' config; the seeds are set per member")
    executor: ExecutorConfig = section(ExecutorConfig, "where and how the members train")


def train_ensemble(cfg: EnsembleTrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train the members, write ``ensemble.json`` (and ``ensemble_weighted.json`` with learned weights) and
    ``scores.json`` with every prefix ensemble's loss; returns the scores."""
    if cfg.members < 1:
        raise DataeffError(f"ensemble.members={cfg.members} must be at least 1")
    if cfg.fitness_tokens < 0:
        raise DataeffError(f"ensemble.fitness_tokens={cfg.fitness_tokens} must be 0 or more")
    if cfg.fitness_tokens and cfg.base.data.train_tokens is None:
        # Checked before training: the fitness split is the training pool outside the budget.
        raise DataeffError("ensemble.fitness_tokens needs base.data.train_tokens (a budget leaving training "
                           "documents out); set it, or fitness_tokens=0 for no learned weights")
    out = Path(cfg.out or Path("runs") / "ensembles" / cfg.name)
    configs = [member_config(cfg.base, i, cfg.vary, cfg.first_seed) for i in range(cfg.members)]
    jobs = run_jobs(configs, cfg.executor, out / "runs", progress=progress)
    failed = [j for j in jobs if j.result is None]
    if failed:
        raise DataeffError(f"ensemble: {len(failed)} of {cfg.members} members failed; first: {failed[0].run_dir}: "
                           f"{failed[0].error}")
    members = [str(j.run_dir) for j in jobs]
    save_ensemble(EnsembleSpec(name=cfg.name, members=members, combine=cfg.combine), out / "ensemble.json")
    return score_ensemble(cfg.name, members, cfg.base, cfg.fitness_tokens, out, progress=progress)


def score_ensemble(name: str, members: list[str], base: RunConfig, fitness_tokens: int, out: Path, *,
                   progress: bool = False) -> dict[str, Any]:
    """Every prefix ensemble scored on the validation tokens the members' own final evaluation used; weights
    learned on the fitness slice go to ``ensemble_weighted.json``. Kept in ``scores.json`` and reused while
    the members and settings are the same (members are finished runs, so their weights cannot change)."""
    t = base.train
    key = {"members": members, "max_tokens": t.final_eval_tokens, "fitness_tokens": fitness_tokens}
    cache = out / "scores.json"
    if cache.exists():
        stored = json.loads(cache.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            return stored
    prepared = prepare(base.data, base.tokenizer, progress=False)
    fitness = fitness_split(prepared, base.data, fitness_tokens) if fitness_tokens else None
    ev = evaluate_ensemble(members, prepared.split("val"), fitness=fitness, max_tokens=t.final_eval_tokens,
                           batch_size=t.eval_batch_size, dtype=t.dtype, device=t.device, progress=progress)
    weighted = out / "ensemble_weighted.json"
    if ev.weights is not None and ev.weights_learned:
        save_ensemble(EnsembleSpec(name=f"{name} (learned weights)", members=members, combine="prob",
                                   weights=list(ev.weights)), weighted)
    else:
        weighted.unlink(missing_ok=True)  # an earlier run's weights belong to other members or settings
    scores = {"name": name, "key": key, **ev.to_dict()}
    atomic_write_json(cache, scores)
    return scores
