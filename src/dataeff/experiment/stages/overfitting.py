"""Stage ``overfitting``: held-out loss against epochs at several weight decays for one size, the figure that
shows why regularisation wins (without it the loss is U-shaped in epochs; with it, it keeps falling).

Without the sweep its section falls back to the tuning runs of the recipe that tunes both weight decay and
epochs, at its optimum's other knobs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.ticker import NullFormatter

from dataeff.config import option
from dataeff.experiment.fitting import finite_or_none
from dataeff.experiment.stage import Context, Failure, Stage, StageResult
from dataeff.report.blocks import Block, Fig, Heading, finite, sci
from dataeff.report.plots import colors, new_figure, png, set_ylim


@dataclass
class OverfittingConfig:
    size: str | None = option(None, "model size of the loss-vs-epochs figure (default: none, no extra runs)")
    weight_decays: list[float] = option([0.1, 0.8, 3.2], "weight decays, one curve each")
    epochs: list[float] = option([1, 2, 4, 8, 16, 32], "epochs along each curve")
    lr: float | None = option(None, "learning rate (default: the regularized recipe's tuned LR at that size)", min=0.0)


@dataclass
class SweepRun:
    size: str
    lr: float
    weight_decay: float
    epochs: float
    loss: float | None  # None: the run failed (error says why)
    run_dir: str | None = None
    error: str | None = None


@dataclass
class OverfittingResult(StageResult):
    runs: list[SweepRun] = field(default_factory=list)

    def failures(self) -> list[Failure]:
        return [Failure(f"overfitting / {r.size}", {"optim.lr": r.lr, "optim.weight_decay": r.weight_decay,
                                                     "train.epochs": r.epochs}, r.run_dir, r.error)
                for r in self.runs if r.error or r.loss is None]


def _run(ctx: Context, o: OverfittingConfig) -> OverfittingResult:
    assert o.size is not None
    cfg, world = ctx.cfg, ctx.world
    lr = o.lr
    if lr is None:
        tuning = ctx.results["tuning"]
        regularized = {r.name for r in tuning.recipes if "optim.weight_decay" in r.grid}
        tuned = [t for t in tuning.tuned if t.size == o.size and t.budget == world and t.recipe in regularized]
        lr = tuned[0].best.get("optim.lr", cfg.base.optim.lr) if tuned else cfg.base.optim.lr
    points = [(wd, ep) for wd in o.weight_decays for ep in o.epochs]
    configs = [ctx.run_config(o.size, world, {"optim.lr": lr, "optim.weight_decay": wd, "train.epochs": ep},
                              cfg.seeds[0], "overfitting") for wd, ep in points]
    jobs = ctx.run_jobs(configs)
    return OverfittingResult([
        SweepRun(o.size, lr, wd, ep, finite_or_none((r.result or {}).get("val_loss", math.inf)
                                                    if r.status in ("done", "skipped") else math.inf),
                 str(r.run_dir), r.error)
        for (wd, ep), r in zip(points, jobs, strict=True)])


Curves = dict[float, list[tuple[float, float | None, str | None]]]


def _points(results: Any) -> tuple[Curves, str, str] | None:
    """({weight decay: [(epochs, loss, error)]}, where, source) from the sweep or, failing that, the tuning runs
    of the recipe that tunes weight decay and epochs (at its optimum's other knobs)."""
    sweep: OverfittingResult | None = results.stages.get("overfitting")
    if sweep is not None and sweep.runs:
        curves: Curves = {}
        for r in sweep.runs:
            curves.setdefault(r.weight_decay, []).append((r.epochs, r.loss, r.error))
        lr = sweep.runs[0].lr
        return curves, f"size {sweep.runs[0].size}" + (f", LR {sci(lr)}" if finite(lr) else ""), ""
    tuning = results["tuning"]
    recipe = next((r.name for r in tuning.recipes if "optim.weight_decay" in r.grid and "train.epochs" in r.grid), None)
    for t in tuning.at_budget(recipe, results.world_tokens) if recipe else []:
        others = {k: v for k, v in t.best.items() if k not in ("optim.weight_decay", "train.epochs")}
        curves = {}
        for ev in t.evaluations:
            v = ev.values
            if "optim.weight_decay" in v and "train.epochs" in v and all(v.get(k) == x for k, x in others.items()):
                curves.setdefault(float(v["optim.weight_decay"]), []).append((float(v["train.epochs"]), ev.loss, ev.error))
        # A curve needs two epochs to show a trend; three points in all is the least that says anything.
        curves = {wd: pts for wd, pts in curves.items() if len({e for e, _, _ in pts}) >= 2}
        if sum(len(p) for p in curves.values()) >= 3:
            lr = others.get("optim.lr")
            where = f"size {t.size}" + (f", LR {sci(lr)}" if finite(lr) else "")
            return curves, where, f" No overfitting sweep was run: the points are {recipe}'s tuning runs at its optimum's other knobs."
    return None


def _section(results: Any, root: Path) -> list[Block]:
    return [Heading("Overfitting without regularisation"), _figure(results)]


def _figure(results: Any) -> Fig:
    found = _points(results)
    if found is None:
        return Fig("overfitting", "Overfitting figure skipped: no overfitting sweep was run (set overfitting.size) and no "
                                  "recipe's tuning runs trace loss against epochs at two or more points per weight decay.", None)
    curves, where, source = found
    fig, ax = new_figure()
    _, top = set_ylim(ax, [loss for pts in curves.values() for _, loss, _ in pts])
    n_failed = 0
    epochs_all: set[float] = set()
    for color, (wd, pts) in zip(colors(len(curves)), sorted(curves.items()), strict=True):
        pts = sorted(pts, key=lambda p: p[0])
        epochs_all.update(e for e, _, _ in pts)
        ok = [(e, loss) for e, loss, _ in pts if loss is not None]
        if ok:
            ax.plot(*zip(*ok, strict=True), "o-", color=color, label=f"WD {wd:g}")
        bad = [e for e, loss, _ in pts if loss is None]
        n_failed += len(bad)
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=color, markersize=9, mew=2, clip_on=False)
    if n_failed:
        ax.plot([], [], "x", color="0.3", mew=2, label="failed run (plotted at the top)")
    ax.set_xscale("log", base=2)
    ticks = sorted(epochs_all)
    ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("epochs (log2)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"Held-out loss vs epochs per weight decay ({where})", fontsize=10)
    ax.legend(fontsize=8)
    caption = f"Held-out loss against epochs, one line per weight decay ({where}).{source}"
    if n_failed:
        caption += f" {n_failed} failed run(s) are drawn as x at the top edge."
    return Fig("overfitting", caption, png(fig))


STAGE = Stage("overfitting", config=lambda cfg: cfg.overfitting, enabled=lambda o: o.size is not None,
              result=OverfittingResult, run=_run, section=_section)
