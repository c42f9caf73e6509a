"""``dataeff run PIPELINE.yaml``: the compute-for-data experiment as one declarative, resumable job.

A world (corpus + token budget) and a list of model sizes and recipes. The driver checks every enabled stage's
settings before anything trains, then runs the stages of :data:`~dataeff.experiment.config.STAGES` in order
(tuning first: every later stage builds on its optima), writes ``results.json`` and the report. All training
goes through the executor and every run lives in a directory named by its config hash, so a rerun after an
interruption, or after adding a size, trains only what is missing.
"""

from __future__ import annotations

import time
from pathlib import Path

from dataeff.data.corpora import resolve_sources
from dataeff.experiment.config import STAGES, PipelineConfig, Results, write_results
from dataeff.experiment.progress import PipelineProgress
from dataeff.experiment.stage import Context
from dataeff.report.write import write_report


def run_pipeline(cfg: PipelineConfig, *, progress: bool = True) -> Results:
    """Run every enabled stage, then write ``results.json`` and the report under ``cfg.root``."""
    ctx = Context(cfg, Path(cfg.root), progress)
    enabled = [(stage, stage.config(cfg)) for stage in STAGES if stage.enabled(stage.config(cfg))]
    # Refused before anything trains: a stage's bad setting must not surface after hours of tuning.
    resolve_sources(cfg.base.data)  # a corpus that cannot be found is refused before the progress line starts
    for stage, stage_cfg in enabled:
        stage.check(ctx, stage_cfg)
    ctx.root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    stage_seconds: dict[str, float] = {}
    if progress and cfg.progress != "none":
        ctx.tracker = PipelineProgress()
        ctx.progress_bars = cfg.progress == "runs"
    try:
        for stage, stage_cfg in enabled:
            if ctx.tracker is not None:
                ctx.tracker.enter(stage.name)
            stage_started = time.time()
            ctx.results[stage.name] = stage.run(ctx, stage_cfg)
            stage_seconds[stage.name] = time.time() - stage_started
    finally:
        if ctx.tracker is not None:
            ctx.tracker.close()
    results = Results(name=cfg.name, world_tokens=ctx.world, config=cfg, seconds=time.time() - started,
                      stage_seconds=stage_seconds, stages=dict(ctx.results))
    write_results(ctx.root / "results.json", results)
    write_report(ctx.root)
    return results
