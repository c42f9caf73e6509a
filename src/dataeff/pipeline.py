"""``dataeff run PIPELINE.yaml``: the compute-for-data experiment as one declarative, resumable job.

A world (corpus + token budget) and a list of model sizes and recipes. For every recipe and size it tunes
hyperparameters with the local-optimality certificate, for several token budgets it tunes the standard recipe
(the data-scaling baseline), then fits ``L = E + A·x^-α`` over parameters and over tokens with bootstrap
intervals and turns losses into data-efficiency multipliers. All training goes through the executor, every
run lives in a directory named by its config hash, so a rerun after an interruption, or after adding a size,
trains only what is missing.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dataeff import scaling
from dataeff.config import from_dict, merge, option, section, to_dict, unflatten
from dataeff.errors import DataeffError
from dataeff.executor import ExecutorConfig, run_jobs
from dataeff.fsutil import atomic_write_json
from dataeff.model import count_parameters
from dataeff.tokens import prepare
from dataeff.train import RunConfig, run_hash
from dataeff.tune import Evaluation, RecipeConfig, Tuner, TuneResult, builtin_recipes


@dataclass
class DataScalingConfig:
    budgets: list[int] = option([], "token budgets for the standard recipe's L(D) baseline (the world's own is added)")
    recipe: str = option("standard", "the recipe whose data scaling is the 1x reference")
    sizes: list[str] = option([], "model sizes tuned at every budget; the best of them counts (default: all sizes)")


@dataclass
class OverfittingConfig:
    size: str | None = option(None, "model size of the loss-vs-epochs figure (default: none, no extra runs)")
    weight_decays: list[float] = option([0.1, 0.8, 3.2], "weight decays, one curve each")
    epochs: list[float] = option([1, 2, 4, 8, 16, 32], "epochs along each curve")
    lr: float | None = option(None, "learning rate (default: the regularized recipe's tuned LR at that size)")


@dataclass
class FitConfig:
    n_boot: int = option(1000, "bootstrap replicates for every interval")
    ci: float = option(0.95, "confidence level of the intervals")
    seed: int = option(0, "bootstrap seed")
    method: Literal["auto", "pairs", "residual", "parametric"] = option(
        "auto", "bootstrap: resample runs (pairs), log residuals, or draw seed noise (parametric); auto picks by "
        "point count, and uses seed noise when there are several seeds")
    sigma: float | None = option(None, "seed-to-seed noise of log loss for the parametric bootstrap (default: "
                                       "measured from the seeds when there are several)")
    params: Literal["total", "non_embedding"] = option("total", "which parameter count is the N of L(N)")


@dataclass
class PipelineConfig:
    name: str = option("experiment", "experiment name (report title)")
    root: str = option("runs/experiment", "directory of the runs, results.json and the report")
    base: RunConfig = section(RunConfig, "the world and every setting the recipes do not tune")
    sizes: list[str] = option(["micro", "mini", "small"], "model presets, smallest first")
    recipes: list[RecipeConfig] = option([], "recipes to tune (default: the paper's standard and regularized)")
    seeds: list[int] = option([0], "seeds per grid point (init and data order); their mean loss is what is tuned")
    confirm_seeds: list[int] = option([], "extra seeds on which every tuned optimum is trained again: its loss "
                                          "becomes the mean over all seeds, and their spread sets the fit intervals")
    max_extensions: int = option(2, "how far a ladder may grow past its end when the optimum sits on it")
    data_scaling: DataScalingConfig = section(DataScalingConfig, "data-scaling baseline for the multipliers")
    overfitting: OverfittingConfig = section(OverfittingConfig, "the loss-vs-epochs-per-weight-decay figure")
    executor: ExecutorConfig = section(ExecutorConfig, "where and how the runs execute")
    fit: FitConfig = section(FitConfig, "scaling-law fits and intervals")


@dataclass
class Task:
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


def recipes_of(cfg: PipelineConfig) -> list[RecipeConfig]:
    recipes = cfg.recipes or builtin_recipes()
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise DataeffError(f"pipeline.recipes: duplicate recipe names {names}")
    return recipes


def run_config(cfg: PipelineConfig, size: str, budget: int, values: dict[str, Any], seed: int, source: str) -> RunConfig:
    """The base config with a size, budget, seed and the recipe's knob values applied (keys are validated)."""
    data = to_dict(cfg.base)
    merge(data, unflatten({"model.preset": size, "data.train_tokens": budget, "train.init_seed": seed,
                           "train.data_seed": seed, "run_dir": None, **values}))
    return from_dict(RunConfig, data, source=source)


def _world_budget(cfg: PipelineConfig) -> int:
    if not cfg.base.data.train_tokens:
        raise DataeffError("pipeline: base.data.train_tokens (the world's token budget) must be set")
    return cfg.base.data.train_tokens


def plan_tasks(cfg: PipelineConfig) -> list[Task]:
    recipes = recipes_of(cfg)
    world = _world_budget(cfg)
    tasks = [Task(r, s, world, Tuner(r, max_extensions=cfg.max_extensions)) for r in recipes for s in cfg.sizes]
    ds = cfg.data_scaling
    if ds.budgets:
        by_name = {r.name: r for r in recipes}
        if ds.recipe not in by_name:
            raise DataeffError(f"pipeline.data_scaling.recipe: {ds.recipe!r} is not one of the recipes {list(by_name)}")
        for budget in sorted(set(ds.budgets) - {world}):
            for size in ds.sizes or cfg.sizes:
                tasks.append(Task(by_name[ds.recipe], size, budget, Tuner(by_name[ds.recipe], max_extensions=cfg.max_extensions)))
    return tasks


def _evaluate(cfg: PipelineConfig, jobs: dict[str, Any], task: Task, values: dict[str, Any]) -> Evaluation:
    """The mean held-out loss over seeds of one grid point (inf if any seed failed)."""
    losses, run_dirs, errors = [], [], []
    for seed in cfg.seeds:
        job = jobs[_job_key(cfg, task, values, seed)]
        run_dirs.append(str(job.run_dir))
        if job.status in ("done", "skipped") and job.result is not None:
            losses.append(float(job.result["val_loss"]))
        else:
            errors.append(job.error or job.status)
    loss = float(np.mean(losses)) if losses and not errors and all(map(math.isfinite, losses)) else math.inf
    return Evaluation(values=values, loss=loss, run_dir=run_dirs[0], error="; ".join(errors) or None, seed_losses=losses)


def _job_key(cfg: PipelineConfig, task: Task, values: dict[str, Any], seed: int) -> str:
    return run_hash(run_config(cfg, task.size, task.budget, values, seed, f"recipe {task.recipe.name}"))


def run_pipeline(cfg: PipelineConfig, *, progress: bool = True) -> dict[str, Any]:
    """Tune, fit and write ``results.json`` and the report under ``cfg.root``. Returns the results."""
    root = Path(cfg.root)
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    world = _world_budget(cfg)
    # Prepared once up front: every run of every budget then finds its token store complete.
    stores = [prepare(dataclasses.replace(cfg.base.data, train_tokens=b), cfg.base.tokenizer, progress=progress)
              for b in sorted({world, *cfg.data_scaling.budgets})]
    tasks = plan_tasks(cfg)
    rounds = 0
    while active := [t for t in tasks if t.pending is not None]:
        rounds += 1
        configs: dict[str, RunConfig] = {}
        for t in active:
            for values in t.pending or []:
                for seed in cfg.seeds:
                    rc = run_config(cfg, t.size, t.budget, values, seed, f"recipe {t.recipe.name}")
                    configs.setdefault(_job_key(cfg, t, values, seed), rc)
        if progress:
            print(f"[dataeff run] round {rounds}: {len(active)} tuners need {len(configs)} runs", flush=True)
        results = run_jobs(list(configs.values()), cfg.executor, root / "runs", progress=progress)
        jobs = {run_hash(r.config): r for r in results}
        for t in active:
            t.feed([_evaluate(cfg, jobs, t, values) for values in t.pending or []])
    _confirm(cfg, tasks, root, progress)
    overfit = _overfitting_runs(cfg, tasks, root, progress)
    results_doc = analyse(cfg, tasks, overfit, stores[0].tokenizer.vocab_size)
    results_doc["seconds"] = time.time() - started
    atomic_write_json(root / "results.json", results_doc)
    from dataeff.report import write_report

    write_report(root)
    return results_doc


def _confirm(cfg: PipelineConfig, tasks: list[Task], root: Path, progress: bool) -> None:
    """Retrain each tuned optimum on the confirmation seeds: an unbiased loss (the tuning picked a minimum of
    noisy values) and a measured seed-to-seed noise for the fits' intervals."""
    seeds = [s for s in cfg.confirm_seeds if s not in cfg.seeds]
    if not seeds:
        return
    configs = {}
    for t in tasks:
        assert t.result is not None
        if math.isfinite(t.result.best_loss):
            for seed in seeds:
                rc = run_config(cfg, t.size, t.budget, t.result.best, seed, f"recipe {t.recipe.name}")
                configs[run_hash(rc)] = rc
    if progress:
        print(f"[dataeff run] confirming {len(tasks)} optima on seeds {seeds}: {len(configs)} runs", flush=True)
    jobs = {run_hash(r.config): r for r in run_jobs(list(configs.values()), cfg.executor, root / "runs", progress=progress)}
    for t in tasks:
        assert t.result is not None
        best = next((e for e in t.result.evaluations if e.values == t.result.best), None)
        if best is None or not math.isfinite(best.loss):
            continue
        for seed in seeds:
            job = jobs[run_hash(run_config(cfg, t.size, t.budget, t.result.best, seed, "confirm"))]
            if job.result is not None:
                best.seed_losses.append(float(job.result["val_loss"]))
        best.loss = t.result.best_loss = float(np.mean(best.seed_losses))


def _overfitting_runs(cfg: PipelineConfig, tasks: list[Task], root: Path, progress: bool) -> list[dict[str, Any]]:
    """Loss vs epochs at several weight decays for one size: the figure that shows why regularisation wins."""
    o = cfg.overfitting
    if o.size is None:
        return []
    lr = o.lr
    if lr is None:
        tuned = [t.result for t in tasks if t.size == o.size and t.budget == _world_budget(cfg) and t.result
                 and "optim.weight_decay" in t.recipe.grid]
        lr = tuned[0].best.get("optim.lr", cfg.base.optim.lr) if tuned else cfg.base.optim.lr
    points = [{"optim.lr": lr, "optim.weight_decay": wd, "train.epochs": ep} for wd in o.weight_decays for ep in o.epochs]
    configs = [run_config(cfg, o.size, _world_budget(cfg), p, cfg.seeds[0], "overfitting") for p in points]
    results = run_jobs(configs, cfg.executor, root / "runs", progress=progress)
    return [
        {**p, "size": o.size, "loss": (r.result or {}).get("val_loss", math.inf) if r.status in ("done", "skipped") else math.inf,
         "run_dir": str(r.run_dir), "error": r.error}
        for p, r in zip(points, results, strict=True)
    ]


def _params(cfg: PipelineConfig, size: str, vocab: int) -> int:
    counts = count_parameters(dataclasses.replace(cfg.base.model, preset=size, vocab_size=vocab))
    return counts["total"] if cfg.fit.params == "total" else counts["non_embedding"]


def _fit_with_intervals(x: list[float], y: list[float], f: FitConfig, sigma: float | None) -> tuple[dict[str, Any], scaling.BootstrapResult | None]:
    """A fit with bootstrap intervals, or the reason it was refused (too few points)."""
    method = None if f.method == "auto" else f.method
    use_sigma = sigma if method in (None, "parametric") else None
    try:
        boot = scaling.bootstrap_fit(x, y, n_boot=f.n_boot, seed=f.seed, ci=f.ci, method=method, sigma=use_sigma)
    except DataeffError as e:
        return {"refused": str(e), "x": x, "y": y}, None
    out: dict[str, Any] = {
        "x": x, "y": y, **boot.fit.to_dict(), "E_ci": list(boot.E_interval), "A_ci": list(boot.A_interval),
        "alpha_ci": list(boot.alpha_interval), "method": boot.method, "n_boot": boot.n_boot, "n_skipped": boot.n_skipped,
        "summary": scaling.fit_summary(boot), "sigma": use_sigma,
        # Kept so the report can draw interval bands around the fitted curve.
        "replicates": {"E": boot.E.tolist(), "A": boot.A.tolist(), "alpha": boot.alpha.tolist()},
    }
    if len(set(x)) >= 4:
        out["leave_largest_out"] = scaling.leave_largest_out(x, y)
    return out, boot


def seed_sigma(tasks: list[Task]) -> float | None:
    """The noise of a tuned point's mean log loss, pooled over every tuned optimum that has several seeds."""
    deviations, dof, n_seeds = 0.0, 0, 0
    for t in tasks:
        assert t.result is not None
        best = next((e for e in t.result.evaluations if e.values == t.result.best), None)
        if best is None or len(best.seed_losses) < 2:
            continue
        logs = np.log(best.seed_losses)
        deviations += float(((logs - logs.mean()) ** 2).sum())
        dof += len(logs) - 1
        n_seeds = len(logs)
    if dof == 0 or deviations == 0:
        return None
    return math.sqrt(deviations / dof) / math.sqrt(n_seeds)


def analyse(cfg: PipelineConfig, tasks: list[Task], overfit: list[dict[str, Any]], vocab: int) -> dict[str, Any]:
    """Tables, fits, multipliers and the verdict, from finished tuning tasks."""
    world = _world_budget(cfg)
    recipes = recipes_of(cfg)
    params = {s: _params(cfg, s, vocab) for s in sorted({t.size for t in tasks})}
    tuned: list[dict[str, Any]] = []
    for t in tasks:
        assert t.result is not None
        tuned.append({"recipe": t.recipe.name, "size": t.size, "params": params[t.size], "budget": t.budget,
                      **t.result.to_dict()})
    at_world = {(r["recipe"], r["size"]): r for r in tuned if r["budget"] == world}

    sigma = cfg.fit.sigma or seed_sigma(tasks)
    fits: dict[str, Any] = {}
    boots: dict[str, scaling.BootstrapResult] = {}
    for r in recipes:
        pts = [(params[s], at_world[(r.name, s)]["best_loss"]) for s in cfg.sizes if math.isfinite(at_world[(r.name, s)]["best_loss"])]
        fits[r.name], boot = _fit_with_intervals([p for p, _ in pts], [loss for _, loss in pts], cfg.fit, sigma)
        if boot is not None:
            boots[r.name] = boot

    ds = cfg.data_scaling
    baseline_name = ds.recipe if ds.budgets else (recipes[0].name if recipes else "standard")
    std_at_world = [at_world[(baseline_name, s)]["best_loss"] for s in cfg.sizes if (baseline_name, s) in at_world]
    standard_best = min(std_at_world) if std_at_world else math.nan

    data_scaling: dict[str, Any] = {}
    multipliers: dict[str, Any] = {}
    if ds.budgets:
        budgets = sorted({world, *ds.budgets})
        best_by_budget = []
        for b in budgets:
            losses = [r["best_loss"] for r in tuned if r["recipe"] == ds.recipe and r["budget"] == b and (not ds.sizes or r["size"] in ds.sizes)]
            best_by_budget.append(min(losses))
        data_scaling, boot_d = _fit_with_intervals([float(b) for b in budgets], best_by_budget, cfg.fit, sigma)
        data_scaling["budgets"], data_scaling["best_loss"] = budgets, best_by_budget
        targets = {f"{name} asymptote": fits[name].get("E") for name in fits if "E" in fits[name]}
        targets.update({f"{r.name} best": min(at_world[(r.name, s)]["best_loss"] for s in cfg.sizes) for r in recipes})
        for label, loss in targets.items():
            if loss is None or not math.isfinite(loss):
                continue
            entry: dict[str, Any] = {"loss": loss}
            try:
                interp = scaling.multiplier_interpolated(loss, budgets, best_by_budget, world)
                entry["interpolated"] = interp.value if interp.in_range else None
                entry["interpolated_note"] = "" if interp.in_range else "outside the measured budgets (not extrapolated)"
            except DataeffError as e:
                entry["interpolated"], entry["interpolated_note"] = None, str(e)
            if boot_d is not None:
                recipe_name = label.rsplit(" ", 1)[0]
                entry["power_law"] = float(scaling.multiplier_power_law(loss, boot_d.fit, world))
                if label.endswith("asymptote") and recipe_name in boots:
                    # Both fits' uncertainty: pair the replicates of the N-law and the D-law.
                    e_reps, d_fits = boots[recipe_name].E, boot_d.fits()
                    n = min(len(e_reps), len(d_fits))
                    reps = np.array([scaling.multiplier_power_law(e_reps[i], d_fits[i], world) for i in range(n)], dtype=float)
                else:
                    reps = np.array([scaling.multiplier_power_law(loss, f, world) for f in boot_d.fits()], dtype=float)
                # Replicates whose loss lies below the D-law's asymptote are infinite multipliers: order
                # statistics keep them (as +inf) where interpolating percentiles would turn them into nan.
                reps = np.sort(np.where(np.isnan(reps), np.inf, reps))
                q = [(1 - cfg.fit.ci) / 2, (1 + cfg.fit.ci) / 2]
                entry["power_law_ci"] = [float(reps[round(p * (len(reps) - 1))]) for p in q]
            multipliers[label] = entry

    verdict = _verdict(recipes, fits, standard_best, cfg.fit.ci)
    return {
        "name": cfg.name, "world_tokens": world, "sizes": cfg.sizes, "params": params, "recipes": [to_dict(r) for r in recipes],
        "config": to_dict(cfg), "tuned": tuned, "fits": fits, "standard_best": standard_best,
        "baseline_recipe": baseline_name, "data_scaling": data_scaling, "multipliers": multipliers,
        "overfitting": overfit, "verdict": verdict, "seed_sigma": sigma,
    }


def _verdict(recipes: list[RecipeConfig], fits: dict[str, Any], standard_best: float, ci: float) -> list[str]:
    lines = []
    for r in recipes:
        fit = fits.get(r.name, {})
        if "E" not in fit:
            lines.append(f"{r.name}: no asymptote ({fit.get('refused', 'no fit')})")
            continue
        lo, hi = fit["E_ci"]
        rel = "below" if hi < standard_best else "above" if lo > standard_best else "not distinguishable from"
        lines.append(f"{r.name}: asymptote E = {fit['E']:.4f} [{lo:.4f}, {hi:.4f}] ({ci:.0%} CI) lies {rel} the standard "
                     f"recipe's best loss {standard_best:.4f}")
    return lines
