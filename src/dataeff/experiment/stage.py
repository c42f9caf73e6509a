"""The stage contract: what a pipeline stage declares, and what the driver gives it.

A stage is one file in ``experiment/stages/`` holding its config dataclass, a typed result dataclass, ``run``,
its report section and a settings check, and exporting ``STAGE``. It is registered by two adjacent lines in
``experiment/config.py``: its config field in :class:`~dataeff.experiment.config.PipelineConfig` and its entry
in the ordered ``STAGES`` list. The driver runs the enabled stages in that order; the report renders their
sections in the same order; ``results.json`` holds each result under the stage's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataeff.config import config_hash, from_dict, merge, to_dict, unflatten
from dataeff.errors import DataeffError
from dataeff.experiment import executor
from dataeff.experiment.executor import Job, JobResult
from dataeff.experiment.fitting import Multiplier
from dataeff.experiment.progress import PipelineProgress
from dataeff.report.blocks import Block
from dataeff.train.config import RunConfig

if TYPE_CHECKING:
    from dataeff.experiment.config import PipelineConfig, Results
    from dataeff.experiment.stages.tuning import TunedPoint


@dataclass(frozen=True)
class Failure:
    """A run that failed, for the report's table of failed runs (``error`` None: its FAILED marker says why)."""

    context: str
    values: dict[str, Any]
    run_dir: str | None
    error: str | None


class StageResult:
    """What every stage result can add beyond its own section; each method's default adds nothing."""

    def headline(self) -> list[str]:
        """Lines for the report's verdict."""
        return []

    def data_efficiency(self) -> dict[str, Multiplier]:
        """Data-efficiency multipliers of the losses this stage reached, by label."""
        return {}

    def failures(self) -> list[Failure]:
        """Failed runs to list in the report."""
        return []


def _no_check(ctx: Context, cfg: Any) -> None:
    """A stage with nothing to check before training."""


@dataclass(frozen=True)
class Stage:
    name: str  # its results.json key
    config: Callable[[PipelineConfig], Any]  # its config, out of the pipeline's
    enabled: Callable[[Any], bool]  # whether that config turns it on
    result: type  # its typed result, read back from results.json with config.from_dict
    run: Callable[[Context, Any], Any]  # does the work; returns an instance of ``result``
    section: Callable[[Results, Path], list[Block]]  # its report section (also when it did not run)
    check: Callable[[Context, Any], None] = _no_check  # refuses bad settings before anything trains


@dataclass
class Context:
    """What a stage is given: the pipeline config and root, earlier stages' results by name, and the means to
    run work through the executor."""

    cfg: PipelineConfig
    root: Path
    progress: bool = True
    results: dict[str, Any] = field(default_factory=dict)
    # The pipeline's one progress line; without it (or with progress_bars) each batch of runs shows its own bar.
    tracker: PipelineProgress | None = None
    progress_bars: bool = False

    @property
    def world(self) -> int:
        """The world's token budget."""
        return world_budget(self.cfg)

    def say(self, message: str) -> None:
        if self.progress:
            if self.tracker is not None:
                self.tracker.write(f"[dataeff run] {message}")
            else:
                print(f"[dataeff run] {message}", flush=True)

    @property
    def _bars(self) -> bool:
        return self.progress and (self.tracker is None or self.progress_bars)

    def run_config(self, size: str, budget: int, values: dict[str, Any], seed: int, source: str) -> RunConfig:
        """The base config with a size, budget, seed (init and data order) and knob values applied; ``source``
        names them in an error."""
        return run_config(self.cfg, size, budget, values, seed, source)

    def run_jobs(self, configs: list[RunConfig]) -> list[JobResult]:
        """Train every config (each once) in ``<root>/runs/<config hash>``; a finished run is never retrained."""
        return executor.run_jobs(configs, self.cfg.executor, self.root / "runs", progress=self._bars,
                                 tracker=self.tracker)

    def run(self, jobs: list[Job]) -> list[JobResult]:
        """Run any jobs through the executor (on the cluster under Ray), each once."""
        return executor.run(jobs, self.cfg.executor, progress=self._bars, tracker=self.tracker)

    def tuned(self, recipe: str, size: str) -> TunedPoint:
        """The tuned optimum of a recipe at a size, at the world's budget."""
        return self.results["tuning"].optimum(recipe, size, self.world)

    def artifact(self, kind: str, key: Any) -> Path:
        """The directory of a job's output under ``<root>/<kind>/``, named by the hash of everything it depends
        on (``key``), so a changed input never reuses an old output; the job's DONE marker says it is complete."""
        return self.root / kind / config_hash(key)


def world_budget(cfg: PipelineConfig) -> int:
    if not cfg.base.data.train_tokens:
        raise DataeffError("pipeline: base.data.train_tokens (the world's token budget) must be set")
    return cfg.base.data.train_tokens


def run_config(cfg: PipelineConfig, size: str, budget: int, values: dict[str, Any], seed: int, source: str) -> RunConfig:
    """The base config with a size, budget, seed and the recipe's knob values applied (keys are validated)."""
    data = to_dict(cfg.base)
    merge(data, unflatten({"model.preset": size, "data.train_tokens": budget, "train.init_seed": seed,
                           "train.data_seed": seed, "run_dir": None, **values}))
    return from_dict(RunConfig, data, source=source)


def plain(obj: Any) -> Any:
    """A result as plain JSON values, non-finite floats as null: results.json is strict JSON for any reader."""
    return _strict(to_dict(obj))


def _strict(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _strict(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_strict(x) for x in v]
    return v
