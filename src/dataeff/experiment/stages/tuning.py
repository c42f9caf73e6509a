"""Stage ``tuning``: every recipe tuned at every size with the local-optimality certificate, the standard recipe
tuned at several token budgets (the data-scaling baseline), then ``L = E + A·x^-α`` fitted over parameters and
over tokens with bootstrap intervals, and losses turned into data-efficiency multipliers.

Its config is the pipeline's own top-level fields (``sizes``, ``recipes``, ``seeds``, ``confirm_seeds``,
``max_extensions``, ``data_scaling``, ``fit``). Every tuner asks for its points round by round and all of them
share one executor batch per round, so a rerun after an interruption, or after adding a size, trains only
what is missing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.lines import Line2D

from dataeff.config import option
from dataeff.data.tokens import prepare
from dataeff.errors import DataeffError
from dataeff.experiment import coverage
from dataeff.experiment.comparison import (
    Comparison,
    ProfileResult,
    compare_recipes,
    method_text,
    profile_result,
)
from dataeff.experiment.executor import JobResult
from dataeff.experiment.fitting import (
    Fit,
    Multiplier,
    finite_or_none,
    fit_with_intervals,
    multiplier,
    pooled_sigma,
    seed_noise,
)
from dataeff.experiment.stage import Context, Failure, Stage, StageResult, world_budget
from dataeff.experiment.tune import Evaluation, RecipeConfig, Tuner, TuneResult, builtin_recipes
from dataeff.fsutil import read_jsonl
from dataeff.model.config import PRESETS, count_parameters
from dataeff.report.blocks import (
    MISSING,
    Block,
    Cell,
    Fig,
    Heading,
    Para,
    Table,
    count,
    finite,
    interval,
    knob,
    knob_label,
    knob_order,
    knobs_text,
    loss,
    mult,
    sig,
)
from dataeff.report.plots import band, colors, curve, locate, new_figure, png, set_ylim
from dataeff.train.identity import run_hash


@dataclass
class DataScalingConfig:
    budgets: list[int] = option([], "token budgets for the standard recipe's L(D) baseline (the world's own is added)")
    recipe: str = option("standard", "the recipe whose data scaling is the 1x reference")
    sizes: list[str] = option([], "model sizes tuned at every budget; the best of them counts (default: all sizes)")


# ---------------------------------------------------------------------------------------------------------
# Results


@dataclass
class GridPoint:
    """One trained grid point: its knob values and mean held-out loss over seeds."""

    values: dict[str, Any]
    loss: float | None  # None: a seed failed (error says why)
    run_dir: str | None = None
    error: str | None = None
    seed_losses: list[float] = field(default_factory=list)


@dataclass
class TunedPoint:
    """A recipe tuned at one size and token budget: its optimum, the certificate, and every point trained."""

    recipe: str
    size: str
    params: int
    budget: int
    best: dict[str, Any]
    best_loss: float | None  # None: every configuration tried failed
    certified: bool
    reason: str  # why the certificate holds or fails
    best_run_dir: str | None
    evaluations: list[GridPoint]


@dataclass
class DataScaling(Fit):
    """The baseline's best loss per token budget, and the token law fitted to them."""

    budgets: list[int] = field(default_factory=list)
    best_loss: list[float | None] = field(default_factory=list)


@dataclass
class TuningResult(StageResult):
    sizes: list[str]
    params: dict[str, int]  # the N of each size (total or non-embedding parameters, as fit.params says)
    recipes: list[RecipeConfig]
    tuned: list[TunedPoint]
    fits: dict[str, Fit]  # each recipe's L(N) at the world's budget
    standard_best: float | None  # the baseline recipe's best loss at the world's budget
    baseline_recipe: str
    seed_sigma: float | None  # seed noise of a tuned point's mean log loss, pooled (None: one seed)
    verdict: list[str]
    data_scaling: DataScaling | None = None
    multipliers: dict[str, Multiplier] = field(default_factory=dict)
    # Each recipe against the baseline, paired; and each recipe's E by profile likelihood.
    comparisons: list[Comparison] = field(default_factory=list)
    profiles: dict[str, ProfileResult] = field(default_factory=dict)
    seed_sigma_run: float | None = None  # the seed noise of one run's log loss
    seed_dof: int | None = None
    # The coverage study's row for this design (sizes × seeds): each method's share of intervals holding the truth.
    coverage: dict[str, float] | None = None

    def headline(self) -> list[str]:
        return self.verdict

    def data_efficiency(self) -> dict[str, Multiplier]:
        return self.multipliers

    def failures(self) -> list[Failure]:
        return [Failure(f"{t.recipe} / {t.size} / {count(t.budget)} tokens", e.values, e.run_dir, e.error)
                for t in self.tuned for e in t.evaluations if e.error or e.loss is None]

    def optimum(self, recipe: str, size: str, budget: int) -> TunedPoint:
        for t in self.tuned:
            if t.recipe == recipe and t.size == size and t.budget == budget:
                return t
        raise DataeffError(f"pipeline: recipe {recipe!r} was not tuned at size {size!r}")

    def seed_losses(self, recipe: str, size: str, budget: int) -> list[float]:
        """The per-seed losses of a tuned optimum, tuning seeds first, then confirmation seeds."""
        t = self.optimum(recipe, size, budget)
        return next((list(e.seed_losses) for e in t.evaluations if e.values == t.best), [])

    def at_budget(self, recipe: str, budget: int) -> list[TunedPoint]:
        """The recipe's tuned points at one budget, smallest model first."""
        return sorted((t for t in self.tuned if t.recipe == recipe and t.budget == budget), key=lambda t: t.params)


# ---------------------------------------------------------------------------------------------------------
# Tuning problems


@dataclass
class TuningProblem:
    """One tuning problem: a recipe at a model size and token budget."""

    recipe: RecipeConfig
    size: str
    budget: int
    tuner: Tuner
    gen: Iterator[list[dict[str, Any]]] = field(init=False)
    pending: list[dict[str, Any]] | None = None
    result: TuneResult | None = None

    def __post_init__(self) -> None:
        self.gen = self.tuner.run()
        self.pending = next(self.gen)

    def feed(self, evaluations: list[Evaluation]) -> None:
        try:
            self.pending = self.gen.send(evaluations)
        except StopIteration as stop:
            self.result, self.pending = stop.value, None


def recipes_of(cfg: Any) -> list[RecipeConfig]:
    recipes = cfg.recipes or builtin_recipes()
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise DataeffError(f"pipeline.recipes: duplicate recipe names {names}")
    return recipes


def plan_tasks(cfg: Any) -> list[TuningProblem]:
    """Every tuning problem of the pipeline config ``cfg``: recipes × sizes, and the data-scaling budgets."""
    recipes = recipes_of(cfg)
    world = world_budget(cfg)
    tasks = [TuningProblem(r, s, world, Tuner(r, max_extensions=cfg.max_extensions)) for r in recipes for s in cfg.sizes]
    ds = cfg.data_scaling
    if ds.budgets:
        by_name = {r.name: r for r in recipes}
        if ds.recipe not in by_name:
            raise DataeffError(f"pipeline.data_scaling.recipe: {ds.recipe!r} is not one of the recipes {list(by_name)}")
        for budget in sorted(set(ds.budgets) - {world}):
            for size in ds.sizes or cfg.sizes:
                tasks.append(TuningProblem(by_name[ds.recipe], size, budget,
                                           Tuner(by_name[ds.recipe], max_extensions=cfg.max_extensions)))
    return tasks


def _evaluate(ctx: Context, jobs: dict[str, JobResult], task: TuningProblem, values: dict[str, Any]) -> Evaluation:
    """The mean held-out loss over seeds of one grid point (inf if any seed failed)."""
    losses, run_dirs, errors = [], [], []
    for seed in ctx.cfg.seeds:
        job = jobs[run_hash(ctx.run_config(task.size, task.budget, values, seed, f"recipe {task.recipe.name}"))]
        run_dirs.append(str(job.run_dir))
        if job.status in ("done", "skipped") and job.result is not None:
            losses.append(float(job.result["val_loss"]))
        else:
            errors.append(job.error or job.status)
    loss = float(np.mean(losses)) if losses and not errors and all(map(math.isfinite, losses)) else math.inf
    return Evaluation(values=values, loss=loss, run_dir=run_dirs[0], error="; ".join(errors) or None, seed_losses=losses)


def _tune(ctx: Context, tasks: list[TuningProblem]) -> None:
    rounds = 0
    while active := [t for t in tasks if t.pending is not None]:
        rounds += 1
        configs = {}
        for t in active:
            for values in t.pending or []:
                for seed in ctx.cfg.seeds:
                    rc = ctx.run_config(t.size, t.budget, values, seed, f"recipe {t.recipe.name}")
                    configs.setdefault(run_hash(rc), rc)
        ctx.say(f"round {rounds}: {len(active)} tuners need {len(configs)} runs")
        jobs = {run_hash(r.config): r for r in ctx.run_jobs(list(configs.values()))}
        for t in active:
            t.feed([_evaluate(ctx, jobs, t, values) for values in t.pending or []])


def _confirm(ctx: Context, tasks: list[TuningProblem]) -> None:
    """Retrain each tuned optimum on the confirmation seeds: an unbiased loss (the tuning picked a minimum of
    noisy values) and a measured seed-to-seed noise for the fits' intervals."""
    seeds = [s for s in ctx.cfg.confirm_seeds if s not in ctx.cfg.seeds]
    if not seeds:
        return
    configs = {}
    for t in tasks:
        assert t.result is not None
        if math.isfinite(t.result.best_loss):
            for seed in seeds:
                rc = ctx.run_config(t.size, t.budget, t.result.best, seed, f"recipe {t.recipe.name}")
                configs[run_hash(rc)] = rc
    ctx.say(f"confirming {len(tasks)} optima on seeds {seeds}: {len(configs)} runs")
    jobs = {run_hash(r.config): r for r in ctx.run_jobs(list(configs.values()))}
    for t in tasks:
        assert t.result is not None
        best = next((e for e in t.result.evaluations if e.values == t.result.best), None)
        if best is None or not math.isfinite(best.loss):
            continue
        for seed in seeds:
            job = jobs[run_hash(ctx.run_config(t.size, t.budget, t.result.best, seed, "confirm"))]
            if job.result is not None:
                best.seed_losses.append(float(job.result["val_loss"]))
        best.loss = t.result.best_loss = float(np.mean(best.seed_losses))


# ---------------------------------------------------------------------------------------------------------
# The stage


def _check(ctx: Context, cfg: Any) -> None:
    plan_tasks(cfg)
    coverage.check(len(cfg.sizes), _n_seeds(cfg), cfg.fit.ci, cfg.fit.coverage)


def _n_seeds(cfg: Any) -> int:
    return len(dict.fromkeys([*cfg.seeds, *cfg.confirm_seeds]))


def _run(ctx: Context, cfg: Any) -> TuningResult:
    world = ctx.world
    # Prepared once up front: every run of every budget then finds its token store complete.
    stores = [prepare(dataclasses.replace(cfg.base.data, train_tokens=b), cfg.base.tokenizer, progress=ctx.progress)
              for b in sorted({world, *cfg.data_scaling.budgets})]
    tasks = plan_tasks(cfg)
    _tune(ctx, tasks)
    _confirm(ctx, tasks)
    return analyse(cfg, tasks, stores[0].tokenizer.vocab_size, world)


def _params(cfg: Any, size: str, vocab: int) -> int:
    counts = count_parameters(dataclasses.replace(cfg.base.model, preset=size, vocab_size=vocab))
    return counts["total"] if cfg.fit.params == "total" else counts["non_embedding"]


def _tuned_point(t: TuningProblem, params: int) -> TunedPoint:
    r = t.result
    assert r is not None
    return TunedPoint(
        recipe=r.recipe, size=t.size, params=params, budget=t.budget, best=r.best, best_loss=finite_or_none(r.best_loss),
        certified=r.certified, reason=r.reason, best_run_dir=r.best_run_dir,
        evaluations=[GridPoint(e.values, finite_or_none(e.loss), e.run_dir, e.error, list(e.seed_losses)) for e in r.evaluations],
    )


def _optimum_seed_losses(tasks: list[TuningProblem]) -> list[list[float]]:
    """The per-seed losses of every tuned optimum, the measurement of the seed noise."""
    out = []
    for t in tasks:
        assert t.result is not None
        best = next((e for e in t.result.evaluations if e.values == t.result.best), None)
        if best is not None:
            out.append(best.seed_losses)
    return out


def analyse(cfg: Any, tasks: list[TuningProblem], vocab: int, world: int) -> TuningResult:
    """Fits, multipliers and the verdict from finished tuning problems."""
    recipes = recipes_of(cfg)
    params = {s: _params(cfg, s, vocab) for s in sorted({t.size for t in tasks})}
    tuned = [_tuned_point(t, params[t.size]) for t in tasks]
    at_world = {(t.recipe, t.size): t for t in tuned if t.budget == world}
    noise = seed_noise(_optimum_seed_losses(tasks))
    sigma = cfg.fit.sigma or pooled_sigma(_optimum_seed_losses(tasks))
    n_seeds = _n_seeds(cfg)
    # fit.sigma is the noise of a point's mean; one run's is √seeds larger.
    sigma_run, sigma_dof = noise if noise is not None else (
        (cfg.fit.sigma * math.sqrt(n_seeds), None) if cfg.fit.sigma else (None, None))

    fits: dict[str, Fit] = {}
    for r in recipes:
        pts = [(params[s], at_world[(r.name, s)].best_loss) for s in cfg.sizes if at_world[(r.name, s)].best_loss is not None]
        fits[r.name] = fit_with_intervals([float(p) for p, _ in pts], [float(y) for _, y in pts], cfg.fit, sigma)  # type: ignore[arg-type]

    ds = cfg.data_scaling
    baseline = ds.recipe if ds.budgets else (recipes[0].name if recipes else "standard")
    std_at_world = [at_world[(baseline, s)].best_loss for s in cfg.sizes if (baseline, s) in at_world]
    standard_best = min((v if v is not None else math.inf) for v in std_at_world) if std_at_world else math.nan
    out = TuningResult(
        sizes=list(cfg.sizes), params=params, recipes=recipes, tuned=tuned, fits=fits,
        standard_best=finite_or_none(standard_best), baseline_recipe=baseline, seed_sigma=sigma,
        verdict=[], seed_sigma_run=sigma_run, seed_dof=sigma_dof)
    row = coverage.lookup(len(cfg.sizes), n_seeds) if cfg.fit.ci == 0.95 else None
    out.coverage = {m: float(row[m]) for m in coverage.METHODS} if row else None
    out.profiles = _profiles(cfg, out, vocab, world, sigma_run, sigma_dof)
    out.comparisons = [_compare(cfg, out, r.name, baseline, world, sigma_run) for r in recipes if r.name != baseline]

    if ds.budgets:
        budgets = sorted({world, *ds.budgets})
        best_by_budget = [min((t.best_loss if t.best_loss is not None else math.inf) for t in tuned
                              if t.recipe == ds.recipe and t.budget == b and (not ds.sizes or t.size in ds.sizes))
                          for b in budgets]
        fit = fit_with_intervals([float(b) for b in budgets], best_by_budget, cfg.fit, sigma)
        out.data_scaling = DataScaling(**dataclasses.asdict(fit), budgets=budgets,
                                       best_loss=[finite_or_none(v) for v in best_by_budget])
        targets: dict[str, tuple[float | None, np.ndarray | None]] = {
            f"{name} asymptote": (f.E, np.asarray(f.replicates["E"]) if f.replicates else None)
            for name, f in fits.items() if f.refused is None}
        for r in recipes:
            best = [at_world[(r.name, s)].best_loss for s in cfg.sizes]
            targets[f"{r.name} best"] = (min((v if v is not None else math.inf) for v in best), None)
        for label, (target, reps) in targets.items():
            if target is not None and math.isfinite(target):
                m = multiplier(target, out.data_scaling, [float(b) for b in budgets], best_by_budget, world, cfg.fit.ci,
                               reps, baseline_sigma=sigma, seed=cfg.fit.seed)
                decide(m, *_evidence(out, label, world))
                out.multipliers[label] = m
    out.verdict = _verdict(recipes, fits, standard_best, cfg.fit.ci) + [c.sentence for c in out.comparisons] + \
        [p.statement for p in out.profiles.values()]
    return out


def _profiles(cfg: Any, t: TuningResult, vocab: int, world: int, sigma_run: float | None,
              sigma_dof: int | None) -> dict[str, ProfileResult]:
    presets = list(PRESETS)
    largest = max(cfg.sizes, key=lambda s: t.params[s])
    after = presets[presets.index(largest) + 1:][:2] if largest in presets else []
    next_sizes = [(s, float(_params(cfg, s, vocab))) for s in after]
    out = {}
    for name in t.fits:
        pts = [p for p in t.at_budget(name, world) if p.best_loss is not None]
        out[name] = profile_result(name, [float(p.params) for p in pts], [float(p.best_loss) for p in pts],  # type: ignore[arg-type]
                                   [max(len(t.seed_losses(name, p.size, world)), 1) for p in pts], sigma_run, sigma_dof,
                                   cfg.fit, next_sizes)
    return out


def _compare(cfg: Any, t: TuningResult, a: str, b: str, world: int, sigma_run: float | None) -> Comparison:
    sizes = [s for s in cfg.sizes if t.optimum(a, s, world).best_loss is not None
             and t.optimum(b, s, world).best_loss is not None]
    return compare_recipes(a, b, sizes, [t.params[s] for s in sizes], [t.seed_losses(a, s, world) for s in sizes],
                           [t.seed_losses(b, s, world) for s in sizes], cfg.fit, sigma_run)


def decide(m: Multiplier, lower: bool | None, evidence: str) -> None:
    """Whether a multiplier is decided: the paired comparison (``evidence``, ``lower`` its verdict; None when
    there is none) says the target is lower than the baseline's, and the lower end of each interval that was
    measured exceeds 1. Always in words."""
    lows = {name: ci[0] for name, ci in (("power law", m.power_law_ci), ("interpolated", m.interpolated_ci))
            if ci is not None}
    if not lower:
        m.decision = f"not decided: {evidence}"
        return
    above = {k: v for k, v in lows.items() if v is not None and v > 1}
    if lows and len(above) == len(lows):
        m.decided = True
        m.decision = "decided: more than 1× (" + ", ".join(f"{k} ≥ {v:.2f}×" for k, v in above.items()) + ")"
    else:
        m.decision = (f"not decided: {evidence}, but the multiplier's interval reaches 1 (the token law's or the "
                      "baseline's uncertainty)")


def _evidence(t: TuningResult, label: str, world: int) -> tuple[bool | None, str]:
    """The paired verdict behind a multiplier's target: the asymptotes' difference, or the difference at the
    size where the recipe's best loss was reached."""
    name, kind = label.rsplit(" ", 1)
    if name == t.baseline_recipe:
        return None, f"the {name} recipe is the 1× reference"
    c = next((c for c in t.comparisons if c.a == f"{name} asymptote"), None)
    if c is None:
        return None, f"no paired comparison of {name} against the {t.baseline_recipe} recipe"
    if kind == "asymptote":
        if c.refused is not None:
            return None, f"no paired comparison ({c.refused})"
        return c.decided_lower, (f"the paired interval of {c.a} − {c.b} says {name} is lower" if c.decided_lower else
                                 f"the paired interval of {c.a} − {c.b} does not say {name} is lower")
    best = min((p for p in t.at_budget(name, world) if p.best_loss is not None), key=lambda p: p.best_loss or math.inf)
    d = next((d for d in c.at_sizes if d.size == best.size), None)
    if d is None or d.ci[1] is None:
        return None, f"no paired interval at {best.size} (one seed)"
    lower = d.verdict == "lower"
    return lower, (f"the paired interval at {best.size} says {name} is lower" if lower else
                   f"the paired interval at {best.size} does not say {name} is lower")


def _verdict(recipes: list[RecipeConfig], fits: dict[str, Fit], standard_best: float, ci: float) -> list[str]:
    lines = []
    for r in recipes:
        fit = fits.get(r.name)
        if fit is None or fit.refused is not None or fit.E is None or fit.E_ci is None:
            lines.append(f"{r.name}: no asymptote ({fit.refused if fit is not None and fit.refused else 'no fit'})")
            continue
        lo, hi = fit.E_ci
        rel = ("lies below" if hi is not None and hi < standard_best else
               "lies above" if lo is not None and lo > standard_best else "is not distinguishable from")
        lines.append(f"{r.name}: asymptote E = {fit.E:.4f} [{loss(lo)}, {loss(hi)}] ({ci:.0%} CI) {rel} the standard "
                     f"recipe's best loss {standard_best:.4f}")
    return lines


# ---------------------------------------------------------------------------------------------------------
# Report section


def _section(results: Any, root: Path) -> list[Block]:
    t: TuningResult = results["tuning"]
    ci = results.config.fit.ci
    world = results.world_tokens
    multipliers = results.multipliers()
    blocks: list[Block] = [
        Heading("Loss vs parameters"), _fig_loss_vs_params(t, world, ci),
        Heading("Scaling-law fits"),
        Para(f"L(x) = E + A·x^-α with {ci:.0%} bootstrap intervals; leave-largest-out refits without the largest x "
             "and predicts it (the honest test of an extrapolation)."),
        _fits_table(t, ci),
        *comparison_blocks(t.comparisons, ci),
        *_profile_blocks(t, ci),
        _coverage_para(t, ci),
        Heading("Data efficiency"), _fig_data_efficiency(t, multipliers, world, ci),
    ]
    if multipliers:
        blocks += [Para(f"Multiplier = tokens the {t.baseline_recipe} recipe needs to reach the loss, over the "
                        "world's budget: from its fitted token law (power law) or by interpolating its measured losses "
                        "(never extrapolated). A multiplier is decided when the paired comparison says its target is "
                        "lower than the baseline's and the lower end of its interval exceeds 1."),
                   Table(["target", "loss", f"power law [{ci:.0%} CI]", "interpolated", f"interpolated [{ci:.0%} CI]",
                          "decision"],
                         [[label, loss(m.loss), *multiplier_cells(m), interval(m.interpolated_ci, mult),
                           m.decision or MISSING] for label, m in multipliers.items()])]
    else:
        blocks.append(Para("No multipliers: the data-scaling baseline was not run."))
    blocks += [Heading("Tuned hyperparameters"),
               Para("Certified: every ±1-step grid neighbour of the optimum was trained and none is better."),
               *_tuned_tables(t, world),
               Heading("Training curves"), _fig_training_curves(t, world, root)]
    return blocks


def comparison_blocks(comparisons: list[Comparison], ci: float) -> list[Block]:
    """The paired differences: the verdict of each in words, the asymptotes' table and the matched sizes'."""
    if not comparisons:
        return []
    rows: list[list[str | Cell]] = []
    for c in comparisons:
        if c.refused is not None:
            rows.append([f"{c.a} − {c.b}", Cell("refused", c.refused), MISSING, MISSING, MISSING])
            continue
        noise = (f"σ {c.noise['sigma_a']:.4f} / {c.noise['sigma_b']:.4f}, ρ {c.noise['rho']:+.2f}, "
                 f"{c.noise['dof']:.0f} dof" if c.noise else MISSING)
        rows.append([f"{c.a} − {c.b}", f"{c.diff:+.4f} {interval(c.ci, _signed)}", Cell(c.method or MISSING,
                     method_text(c.method)), noise, c.verdict])
    blocks: list[Block] = [
        Heading("Paired comparisons", 3),
        Para("The difference of two asymptotes with a paired interval: the seeds of both recipes are resampled (or "
             "their noise drawn, with its measured correlation) together, so the verdict comes from the interval of "
             "the difference, not from two overlapping marginal intervals."),
        *(Para(c.sentence + ".") for c in comparisons),
        Table(["difference", f"asymptote [{ci:.0%} CI]", "method", "seed noise (one run's log loss)", "verdict"], rows),
    ]
    sized = [c for c in comparisons if c.at_sizes]
    if sized:
        sizes = list(dict.fromkeys(d.size for c in sized for d in c.at_sizes))
        table_rows: list[list[str | Cell]] = []
        for c in sized:
            by = {d.size: d for d in c.at_sizes}
            table_rows.append([f"{c.a.removesuffix(' asymptote')} − {c.b.removesuffix(' asymptote')}",
                               *(Cell(f"{by[s].diff:+.4f} {interval(by[s].ci, _signed)}", by[s].verdict)
                                 if s in by else MISSING for s in sizes)])
        dof = next((c.at_sizes_dof for c in sized if c.at_sizes_dof), None)
        blocks += [Para("Loss differences at each matched size, with paired t intervals on the seed-wise differences "
                        + (f"(variance pooled over sizes, {dof} dof)." if dof else "(none: one seed per point).")),
                   Table(["difference", *sizes], table_rows)]
    return blocks


def _coverage_para(t: TuningResult, ci: float) -> Para:
    n_seeds = max((len(t.seed_losses(p.recipe, p.size, p.budget)) for p in t.tuned), default=0)
    design = f"{len(t.sizes)} sizes and {n_seeds} seeds"
    if t.coverage is None:
        return Para(f"The coverage study (docs/intervals.md) did not measure {design} at a {ci:.0%} level: how often "
                    "these intervals hold the truth is unknown.")
    return Para(f"In the coverage study on the known-truth world (docs/intervals.md), {ci:.0%} intervals of a design "
                f"with {design} held the true value in " + ", ".join(f"{v:.0%} ({m})" for m, v in t.coverage.items())
                + " of simulated repetitions.")


def _signed(v: float | None) -> str:
    return MISSING if v is None else f"{v:+.4f}"


def _profile_blocks(t: TuningResult, ci: float) -> list[Block]:
    if not t.profiles:
        return []
    rows: list[list[str | Cell]] = []
    for name, p in t.profiles.items():
        if p.refused is not None:
            rows.append([name, Cell("refused", p.refused), MISSING, MISSING])
            continue
        lo = loss(p.ci[0]) if p.bounded_below and p.ci else Cell("not bounded", f"E = {p.floor:g} is within the cut")
        hi = loss(p.ci[1]) if p.ci and p.ci[1] is not None else Cell("not bounded", "within the cut 6σ above the smallest loss")
        rows.append([name, loss(p.E), lo, hi])
    return [Heading("Profile-likelihood intervals of E", 3),
            Para("E over a grid, A and α refitted at each, and a χ² cut (F(1, ν) when the seed noise was measured on "
                 "ν dof) from the measured seed noise. The lowest E considered is "
                 + ("the known entropy floor of the data." if any(p.floor_is_entropy for p in t.profiles.values())
                    else "0 (no entropy floor is known for this world).")),
            *(Para(p.statement + ".") for p in t.profiles.values()),
            Table(["recipe", "E (least squares)", f"lower end [{ci:.0%}]", "upper end"], rows)]


def multiplier_cells(m: Multiplier) -> list[str | Cell]:
    """A multiplier's power-law value with its interval, and its interpolated value (why it is missing as a note)."""
    pl = f"{mult(m.power_law)} {interval(m.power_law_ci, mult)}" if m.power_law_ci is not None else MISSING
    return [pl, Cell(mult(m.interpolated) if m.interpolated is not None else MISSING, m.interpolated_note)]


def _fig_loss_vs_params(t: TuningResult, world: int, ci: float) -> Fig:
    names = list(dict.fromkeys([*t.fits, *(p.recipe for p in t.tuned)]))
    at_world = {name: t.at_budget(name, world) for name in names}
    all_n = [p.params for entries in at_world.values() for p in entries]
    if not all_n:
        return Fig("loss_vs_params", "Loss-vs-parameters figure skipped: no tuned results at the world's token budget.", None)
    fig, ax = new_figure(8.0, 5.0)
    x = np.geomspace(min(all_n) / 1.5, max(all_n) * 100, 300)
    y_seen: list[float | None] = []
    notes = []
    for color, name in zip(colors(len(names)), names, strict=True):
        entries = at_world[name]
        ok = [p for p in entries if p.best_loss is not None]
        for certified in (True, False):
            pts = [p for p in ok if p.certified is certified]
            if pts:
                ax.plot([p.params for p in pts], [p.best_loss for p in pts], "o", ms=8, color=color,
                        mfc=color if certified else "none", mew=1.8, zorder=3)
        y_seen += [p.best_loss for p in ok]
        if len(ok) < len(entries):
            notes.append(f"{name}: {len(entries) - len(ok)} size(s) where every run failed are not drawn")
        fit = t.fits.get(name)
        if fit is None or not fit.fitted:
            ax.plot([], [], "o", color=color, label=f"{name} (no fit)")
            notes.append(f"{name}: points only, fit refused ({fit.refused if fit is not None and fit.refused else 'no fit'})")
            continue
        ax.plot(x, curve(fit, x), "-", color=color, label=f"{name}: E={fit.E:.4f} {interval(fit.E_ci)}, α={fit.alpha:.3g}")
        ax.axhline(fit.E, color=color, ls="--", lw=1)
        if fit.E_ci is not None and all(finite(v) for v in fit.E_ci):
            # Drawn but not used for the limits: a degenerate interval (E -> 0) would flatten the data.
            ax.axhspan(*fit.E_ci, color=color, alpha=0.08, lw=0)
        b = band(fit, x, ci)
        if b is not None:
            ax.fill_between(x, *b, color=color, alpha=0.2, lw=0)
        y_seen.append(fit.E)
    if finite(t.standard_best):
        ax.axhline(t.standard_best, color="0.4", ls=":", lw=1.2, label=f"{t.baseline_recipe} best {t.standard_best:.4f}")
        y_seen.append(t.standard_best)
    set_ylim(ax, y_seen)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N (log)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"Tuned loss vs parameters at {count(world)} tokens", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="o", ls="", color="0.3", mfc="none", mew=1.8))
    labels.append("uncertified optimum (hollow)")
    ax.legend(handles, labels, fontsize=8, loc="upper right")
    caption = (f"Best tuned loss per size with the fitted E + A·N^-α extended to 100× the largest N, the asymptote E "
               f"(dashed, shaded: its {ci:.0%} interval) and the {ci:.0%} bootstrap band of the curve. "
               "Hollow markers: the optimum is not certified.")
    if notes:
        caption += " " + "; ".join(notes) + "."
    return Fig("loss_vs_params", caption, png(fig))


def _is_limit(label: str) -> bool:
    """A multiplier target that is a fitted limit (dashed in the figure), not a measured loss."""
    return label.endswith(("asymptote", "limit"))


def _fig_data_efficiency(t: TuningResult, multipliers: dict[str, Multiplier], world: int, ci: float) -> Fig:
    ds = t.data_scaling
    pts = [(float(b), float(v)) for b, v in zip(ds.budgets, ds.best_loss, strict=True) if v is not None] if ds else []
    if ds is None or not pts:
        return Fig("data_efficiency", "Data-efficiency figure skipped: no data-scaling baseline was run (set "
                                      "data_scaling.budgets).", None)
    reach = [m.power_law for m in multipliers.values() if finite(m.power_law)]
    d_max = min(max([p[0] for p in pts] + [world * r for r in reach]) * 2, max(p[0] for p in pts) * 1e3)  # type: ignore[operator]
    x = np.geomspace(min(p[0] for p in pts) / 1.5, d_max, 300)
    fig, ax = new_figure(8.0, 5.0)
    ax.plot(*zip(*pts, strict=True), "o", color="k", ms=7, zorder=3, label=f"{t.baseline_recipe}: best loss per budget")
    y_seen: list[float | None] = [p[1] for p in pts]
    if ds.fitted:
        ax.plot(x, curve(ds, x), "-", color="k", lw=1.2, label=f"fit: E={ds.E:.4f} {interval(ds.E_ci)}, α={ds.alpha:.3g}")
        b = band(ds, x, ci)
        if b is not None:
            ax.fill_between(x, *b, color="k", alpha=0.12, lw=0)
    ax.axvline(world, color="0.5", lw=1, ls="-.", label=f"world budget {count(world)} tokens")
    for color, (label, m) in zip(colors(len(multipliers)), multipliers.items(), strict=True):
        text = f"{label} {m.loss:.4f}"
        if m.power_law_ci is not None:
            text += f": {mult(m.power_law)} {interval(m.power_law_ci, mult)} (power law)"
        if m.interpolated is not None:
            text += f", {mult(m.interpolated)} interpolated"
        ax.axhline(m.loss, color=color, ls="--" if _is_limit(label) else ":", lw=1.4, label=text)
        y_seen.append(m.loss)
        if finite(m.power_law):
            ax.plot([m.power_law * world], [m.loss], "D", color=color, ms=6, zorder=4)  # type: ignore[operator]
            ax.annotate(mult(m.power_law), (m.power_law * world, m.loss), textcoords="offset points", xytext=(5, 4),  # type: ignore[operator]
                        fontsize=8, color=color)
    set_ylim(ax, y_seen)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D (log)")
    ax.set_ylabel("held-out loss")
    ax.set_title("Data efficiency: tokens the baseline needs to reach each loss", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    limits = [label for label in multipliers if label.endswith("limit")]
    joint = f", {', '.join(limits)} (dashed)" if limits else ""
    caption = (f"The {t.baseline_recipe} recipe's best loss per token budget"
               + (f" with its fitted E + A·D^-α and {ci:.0%} bootstrap band" if ds.fitted else
                  f" (fit refused: {ds.refused or 'no fit'})")
               + f". Horizontal lines: each recipe's asymptote (dashed){joint} and best measured loss (dotted); diamonds "
               "mark where the baseline's law reaches them, at multiplier × the world budget (vertical line).")
    return Fig("data_efficiency", caption, png(fig))


def _fig_training_curves(t: TuningResult, world: int, root: Path) -> Fig:
    found = []
    for name in dict.fromkeys(p.recipe for p in t.tuned):
        entries = t.at_budget(name, world)
        if not entries:
            continue
        top = entries[-1]
        d = locate(root, top.best_run_dir)
        rows = read_jsonl(d / "metrics.jsonl") if d else []
        train = [(r["step"], r["train_loss"]) for r in rows if finite(r.get("train_loss")) and "step" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if finite(r.get("val_loss")) and "step" in r]
        if train or val:
            found.append((f"{name} ({top.size}, {knobs_text(top.best)})", train, val))
    if not found:
        return Fig("training_curves", "Training-curves figure skipped: no metrics.jsonl found for the best runs at the "
                                      "largest size.", None)
    fig, ax = new_figure()
    for color, (label, train, val) in zip(colors(len(found)), found, strict=True):
        if train:
            ax.plot(*zip(*train, strict=True), "-", color=color, alpha=0.6, lw=1, label=f"{label} train")
        if val:
            ax.plot(*zip(*val, strict=True), "o--", color=color, ms=4, label=f"{label} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training curves of each recipe's best run at the largest size", fontsize=10)
    ax.legend(fontsize=7)
    return Fig("training_curves", "Training (thin) and held-out (markers) loss of each recipe's best run at the largest "
                                  "size.", png(fig))


def _tuned_tables(t: TuningResult, world: int) -> list[Block]:
    blocks: list[Block] = []
    for name in dict.fromkeys(p.recipe for p in t.tuned):
        entries = sorted((p for p in t.tuned if p.recipe == name), key=lambda p: (p.budget != world, p.budget, p.params))
        knobs = knob_order(k for p in entries for k in p.best)
        several_budgets = len({p.budget for p in entries}) > 1
        headers = ["size", "params", *(["tokens"] if several_budgets else []), *map(knob_label, knobs), "loss", "certified"]
        rows: list[list[str | Cell]] = []
        for p in entries:
            cert = Cell("✓") if p.certified else Cell("✗", p.reason or "not certified")
            rows.append([p.size, count(p.params), *([count(p.budget)] if several_budgets else []),
                         *(knob(k, p.best[k]) if k in p.best else MISSING for k in knobs),
                         loss(p.best_loss) if p.best_loss is not None else "failed", cert])
        blocks += [Heading(f"Tuned hyperparameters: {name}", 3), Table(headers, rows)]
    return blocks


def _fit_row(label: str, axis: str, fit: Fit) -> list[str | Cell]:
    n = len(set(fit.x))
    if not fit.fitted:
        return [label, axis, str(n), Cell("refused", fit.refused or "no fit"), MISSING, MISSING, MISSING, MISSING]
    loo = fit.leave_largest_out
    if loo is not None and finite(loo.get("error")):
        held = f"{loss(loo.get('predicted'))} predicted vs {loss(loo.get('actual'))} measured (error {loo['error']:+.4f})"
    else:
        held = f"{MISSING} (needs ≥ 4 points)"
    boot = f"{fit.n_boot} {fit.method or ''} refits".replace("  ", " ")
    return [label, axis, str(n), f"{loss(fit.E)} {interval(fit.E_ci)}", f"{sig(fit.A)} {interval(fit.A_ci, sig)}",
            f"{sig(fit.alpha)} {interval(fit.alpha_ci, sig)}", boot, held]


def _fits_table(t: TuningResult, ci: float) -> Table:
    rows = [_fit_row(name, "N", fit) for name, fit in t.fits.items()]
    if t.data_scaling is not None:
        rows.append(_fit_row(f"{t.baseline_recipe} (data scaling)", "D", t.data_scaling))
    return Table(["recipe", "x", "points", f"E [{ci:.0%} CI]", "A", "α", "bootstrap", "leave-largest-out"], rows)


STAGE = Stage("tuning", config=lambda cfg: cfg, enabled=lambda cfg: True, result=TuningResult, run=_run,
              section=_section, check=_check)
