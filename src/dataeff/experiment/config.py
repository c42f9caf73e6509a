"""The pipeline's config and its stage registry, and the typed ``results.json``.

Adding a stage is one new file in ``stages/`` plus two lines here: its config field in :class:`PipelineConfig`
and its entry in :data:`STAGES`, the order in which the driver runs the stages and the report shows them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dataeff.config import from_dict, option, section
from dataeff.errors import DataeffError
from dataeff.experiment.executor import ExecutorConfig
from dataeff.experiment.fitting import FitConfig
from dataeff.experiment.stage import Stage, plain
from dataeff.experiment.stages import cpt, distillation, downstream, ensembles, overfitting, sbp, tuning
from dataeff.experiment.tune import RecipeConfig
from dataeff.fsutil import atomic_write_text
from dataeff.train.config import RunConfig


@dataclass
class PipelineConfig:
    name: str = option("experiment", "experiment name (report title)")
    root: str = option("runs/experiment", "directory of the runs, results.json and the report")
    base: RunConfig = section(RunConfig, "the world and every setting the recipes do not tune")
    executor: ExecutorConfig = section(ExecutorConfig, "where and how the runs execute")
    fit: FitConfig = section(FitConfig, "scaling-law fits and intervals")
    progress: Literal["pipeline", "runs", "none"] = option(
        "pipeline", "pipeline: one line (stage, runs done/planned, elapsed, ETA); runs: also a bar per batch of runs")
    # The tuning stage's settings are the pipeline's own: every later stage builds on its optima.
    sizes: list[str] = option(["micro", "mini", "small"], "model presets, smallest first")
    recipes: list[RecipeConfig] = option([], "recipes to tune (default: the paper's standard and regularized)")
    seeds: list[int] = option([0], "seeds per grid point (init and data order); their mean loss is what is tuned")
    confirm_seeds: list[int] = option([], "extra seeds on which every tuned optimum is trained again: its loss "
                                          "becomes the mean over all seeds, and their spread sets the fit intervals")
    max_extensions: int = option(2, "how far a ladder may grow past its end when the optimum sits on it", min=0)
    data_scaling: tuning.DataScalingConfig = section(tuning.DataScalingConfig, "data-scaling baseline for the multipliers")
    # One section per later stage, each registered in STAGES below.
    overfitting: overfitting.OverfittingConfig = section(overfitting.OverfittingConfig, "the loss-vs-epochs-per-weight-decay figure")
    ensembles: ensembles.EnsembleStageConfig = section(ensembles.EnsembleStageConfig, "ensembles of every size: K-laws and the joint limit")
    distillation: distillation.DistillStageConfig = section(distillation.DistillStageConfig, "distilling an ensemble into one model")
    downstream: downstream.DownstreamStageConfig = section(downstream.DownstreamStageConfig, "downstream tasks of the models of one size")
    sbp: sbp.SBPStageConfig = section(sbp.SBPStageConfig, "Synthetic Bootstrapped Pretraining against repetition and an oracle, by world size")
    cpt: cpt.CPTStageConfig = section(cpt.CPTStageConfig, "synthetic continued pretraining on QuALITY: raw vs rephrase vs EntiGraph")


STAGES: list[Stage] = [
    tuning.STAGE,
    overfitting.STAGE,
    ensembles.STAGE,
    distillation.STAGE,
    downstream.STAGE,
    sbp.STAGE,
    cpt.STAGE,
]


@dataclass
class Results:
    """``results.json``: the experiment, its resolved config, and each stage's typed result under its name."""

    name: str
    world_tokens: int
    config: PipelineConfig
    seconds: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage, to plan a cut
    stages: dict[str, Any] = field(default_factory=dict)  # in STAGES order; each is a top-level key of the file

    def __getitem__(self, stage: str) -> Any:
        return self.stages[stage]

    def verdict(self) -> list[str]:
        """Every stage's headline lines, in stage order."""
        return [line for s in self.stages.values() if s is not None for line in s.headline()]

    def multipliers(self) -> dict[str, Any]:
        """Every data-efficiency multiplier the stages measured, by label."""
        return {label: m for s in self.stages.values() if s is not None for label, m in s.data_efficiency().items()}


def write_results(path: str | Path, results: Results) -> None:
    """Strict JSON (failed losses are null beside their reason, never Infinity), written atomically."""
    doc = plain({"name": results.name, "world_tokens": results.world_tokens, "config": results.config,
                 "seconds": results.seconds, "stage_seconds": results.stage_seconds})
    doc |= {s.name: plain(results.stages[s.name]) for s in STAGES if results.stages.get(s.name) is not None}
    atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


def read_results(path: str | Path) -> Results:
    """``results.json`` read back into types; a bad field is named (``ensembles.per_size.mini.prob``)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataeffError(f"{path}: not found; run the pipeline first") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataeffError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise DataeffError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(doc, dict):
        raise DataeffError(f"{path}: expected a JSON object at the top level")
    by_name = {s.name: s for s in STAGES}
    header = {k: v for k, v in doc.items() if k not in by_name}
    results = from_dict(Results, header, source=str(path))
    for name, value in doc.items():
        if name in by_name:
            results.stages[name] = from_dict(by_name[name].result, value, source=str(path), prefix=f"{name}.")
    if "tuning" not in results.stages:
        raise DataeffError(f"{path}: field 'tuning' is missing (every pipeline tunes first)")
    return results
