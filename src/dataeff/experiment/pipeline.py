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
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from dataeff.config import config_hash, from_dict, merge, option, section, to_dict, unflatten
from dataeff.data.tokenizer import Tokenizer
from dataeff.data.tokens import prepare, synthetic_tokens
from dataeff.errors import DataeffError
from dataeff.eval.ensemble import EnsembleSpec, load_ensemble, resolve_members, save_ensemble
from dataeff.eval.tasks import check_task, evaluate_task, load_task, log_prob_fn
from dataeff.experiment import scaling
from dataeff.experiment.ensemble_train import member_config, score_ensemble
from dataeff.experiment.executor import ExecutorConfig, JobResult, run_jobs
from dataeff.experiment.tune import Evaluation, RecipeConfig, Tuner, TuneResult, builtin_recipes
from dataeff.fsutil import atomic_write_json, atomic_write_text
from dataeff.generate.sample import generate
from dataeff.model.config import count_parameters
from dataeff.train.config import RunConfig, run_hash
from dataeff.train.dist import pick_device
from dataeff.train.rundir import load_model


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
class EnsembleStageConfig:
    members: int = option(0, "K_max: members trained per size; prefix ensembles K = 1..K_max are scored and fitted "
                             "(0: no ensemble stage)")
    sizes: list[str] = option([], "sizes with ensembles (default: all; the joint limit needs at least 3)")
    recipe: str = option("regularized", "the recipe whose tuned single model the members' hyperparameters start from")
    rule: Literal["paper", "tuned", "explicit"] = option(
        "paper", "member hyperparameters: paper (epochs × epochs_factor, weight decay × weight_decay_factor, same "
        "LR), tuned (the single model's), or explicit (overrides only)")
    epochs_factor: float = option(2.0, "paper rule: members train this many times the tuned epochs")
    weight_decay_factor: float = option(0.5, "paper rule: members use this fraction of the tuned weight decay")
    overrides: dict[str, Any] = option({}, "knob values applied to every member after the rule")
    vary: Literal["both", "init", "data"] = option(
        "both", "what differs between members: both seeds, only the initialisation, or only the data order")
    combine: Literal["prob", "logit"] = option("prob", "the combination the K-laws and the joint limit are fitted on")
    fitness_tokens: int = option(
        16384, "held-out training-pool tokens (outside the budget, disjoint from validation) on which member "
               "weights are learned (0: no weighted ensemble)")


@dataclass
class DistillStageConfig:
    size: str | None = option(None, "student (and teacher member) size (default: none, no distillation stage)")
    synthetic_share: float = option(0.75, "sequence-level student: share of its tokens sampled from the ensemble "
                                          "(0: no sequence-level student)")
    sequence_overrides: dict[str, Any] = option({"optim.weight_decay": 0.1},
                                                "knob values of the sequence-level student (the paper: WD 0.1)")
    sample_tokens: int = option(256, "tokens per sampled document at most (capped at the teacher's context)")
    sample_temperature: float = option(1.0, "sampling temperature of the synthetic corpus")
    sample_batch: int = option(64, "documents sampled together")
    sample_seed: int = option(0, "sampling seed")
    kl_weight: float = option(0.5, "token-level and chain students: α of (1-α)·CE + α·T²·KL (0: none)")
    temperature: float = option(1.0, "token-level and chain students: KL temperature")
    teacher_cache: Literal["online", "topk"] = option("topk", "teacher log-probs online or from a top-k cache")
    top_k: int = option(64, "top-k cache: teacher log-probs kept per position")
    chain: int = option(2, "self-distillation chain length: link 1 distils one member, each next link its "
                           "predecessor (0: none)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.synthetic_share < 1.0:
            raise ValueError(f"synthetic_share must be in [0, 1), got {self.synthetic_share}")
        if not 0.0 <= self.kl_weight <= 1.0:
            raise ValueError(f"kl_weight must be in [0, 1], got {self.kl_weight}")
        if self.chain < 0:
            raise ValueError(f"chain must be 0 or more, got {self.chain}")


@dataclass
class DownstreamStageConfig:
    tasks: list[str] = option([], "downstream tasks for the single model, the ensemble and the students (default: "
                                  "none)")
    limit: int | None = option(500, "items per task at most (a seeded random subset)")
    size: str | None = option(None, "the size scored (default: the distillation size, else the largest)")


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
    ensembles: EnsembleStageConfig = section(EnsembleStageConfig, "ensembles of every size: K-laws and the joint limit")
    distillation: DistillStageConfig = section(DistillStageConfig, "distilling an ensemble into one model")
    downstream: DownstreamStageConfig = section(DownstreamStageConfig, "downstream tasks of the models of one size")


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
    _check_stages(cfg)
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
    ensembles = _ensemble_stage(cfg, tasks, root, progress)
    distillation = _distillation_stage(cfg, tasks, ensembles, root, progress)
    downstream = _downstream_stage(cfg, tasks, ensembles, distillation, root, progress)
    results_doc = analyse(cfg, tasks, overfit, stores[0].tokenizer.vocab_size, ensembles, distillation, downstream)
    results_doc["seconds"] = time.time() - started
    atomic_write_json(root / "results.json", results_doc)
    from dataeff.report.write import write_report

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


def analyse(cfg: PipelineConfig, tasks: list[Task], overfit: list[dict[str, Any]], vocab: int,
            ensembles: dict[str, Any] | None = None, distillation: dict[str, Any] | None = None,
            downstream: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tables, fits, multipliers and the verdict, from finished tuning tasks and the later stages."""
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

    ensemble_doc = _analyse_ensembles(cfg, ensembles or {}, params, at_world, sigma)
    joint = ensemble_doc.get("joint_limit", {})
    joint_samples = joint.pop("E_samples", None)
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
        if "E" in joint:
            targets["ensemble joint limit"] = joint["E"]
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
                if (label == "ensemble joint limit" and joint_samples is not None) or (
                        label.endswith("asymptote") and recipe_name in boots):
                    # Both fits' uncertainty: pair the replicates of the N-law (or joint limit) and the D-law.
                    e_reps = joint_samples if label == "ensemble joint limit" else boots[recipe_name].E
                    d_fits = boot_d.fits()
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
    if "E" in joint:
        lo, hi = joint["E_ci"]
        single = fits.get(cfg.ensembles.recipe, {})
        versus = f" vs the {cfg.ensembles.recipe} recipe's asymptote {single['E']:.4f}" if "E" in single else ""
        verdict.append(f"ensembles: joint limit (K → ∞, then N → ∞) E = {joint['E']:.4f} [{lo:.4f}, {hi:.4f}]{versus}")
    return {
        "name": cfg.name, "world_tokens": world, "sizes": cfg.sizes, "params": params, "recipes": [to_dict(r) for r in recipes],
        "config": to_dict(cfg), "tuned": tuned, "fits": fits, "standard_best": standard_best,
        "baseline_recipe": baseline_name, "data_scaling": data_scaling, "multipliers": multipliers,
        "overfitting": overfit, "verdict": verdict, "seed_sigma": sigma,
        **({"ensembles": ensemble_doc} if ensemble_doc else {}),
        **({"distillation": _analyse_distillation(distillation, ensemble_doc, params)} if distillation else {}),
        **({"downstream": downstream} if downstream else {}),
    }


def _analyse_ensembles(cfg: PipelineConfig, ensembles: dict[str, Any], params: dict[str, int],
                       at_world: dict[tuple[str, str], dict[str, Any]], sigma: float | None) -> dict[str, Any]:
    """K-law per size (x = K) and the joint limit (K → ∞, then N → ∞) with bootstrap intervals."""
    if not ensembles:
        return {}
    e = cfg.ensembles
    per_size: dict[str, Any] = {}
    per_n: dict[float, tuple[list[int], list[float]]] = {}
    for size, entry in ensembles.items():
        row = {"params": params[size], "single_loss": at_world[(e.recipe, size)]["best_loss"], **entry}
        if "prob" in entry:
            curve = entry[e.combine] or entry["prob"]
            row["k_fit"], _ = _fit_with_intervals([float(k) for k in entry["K"]], curve, cfg.fit, sigma)
            per_n[float(params[size])] = (entry["K"], curve)
        per_size[size] = row
    doc: dict[str, Any] = {"combine": e.combine, "rule": e.rule, "vary": e.vary, "per_size": per_size}
    try:
        jl = scaling.joint_limit(per_n, n_boot=cfg.fit.n_boot, seed=cfg.fit.seed, ci=cfg.fit.ci, sigma=sigma,
                                 method=None if cfg.fit.method == "auto" else cfg.fit.method)
    except DataeffError as err:
        doc["joint_limit"] = {"refused": str(err)}
        return doc
    by_n = {float(params[s]): s for s in per_size}
    doc["joint_limit"] = {
        "E": jl.E, "E_ci": list(jl.interval), "n_fit": jl.n_fit.to_dict(),
        "E_N": {by_n[n]: f.E for n, f in jl.k_fits.items()},
        "E_N_ci": {by_n[n]: list(ci) for n, ci in jl.E_N_intervals.items()},
        "params": {by_n[n]: int(n) for n in jl.k_fits}, "summary": scaling.fit_summary(jl),
        "n_boot": jl.n_boot, "n_skipped": jl.n_skipped, "E_samples": jl.E_samples,
    }
    return doc


def _analyse_distillation(distillation: dict[str, Any], ensembles: dict[str, Any], params: dict[str, int]) -> dict[str, Any]:
    """The share of the ensemble's gain each student keeps: (L_single − L_student) / (L_single − L_ensemble)."""
    size = distillation["size"]
    row = ensembles["per_size"][size]
    combine = ensembles["combine"]
    ensemble_loss = (row.get(combine) or row["prob"])[-1]
    single = row["single_loss"]
    gain = single - ensemble_loss
    students = [{**s, "retained": (single - s["loss"]) / gain if gain > 0 and math.isfinite(s["loss"]) else None}
                for s in distillation["students"]]
    return {"size": size, "params": params[size], "single_loss": single, "ensemble_loss": ensemble_loss,
            "teacher": {"K": len(row["members"]), "loss": ensemble_loss, "combine": combine,
                        "ensemble_file": distillation["teacher_file"]},
            "synthetic_file": distillation.get("synthetic_file"), "students": students}


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


# ---------------------------------------------------------------------------------------------------------
# Ensembles, distillation and downstream tasks: the stages after tuning


def _check_stages(cfg: PipelineConfig) -> None:
    """Refuse, before anything trains, settings the later stages would fail on after hours of tuning."""
    e, d = cfg.ensembles, cfg.distillation
    if e.members and e.recipe not in [r.name for r in recipes_of(cfg)]:
        raise DataeffError(f"pipeline.ensembles.recipe: {e.recipe!r} is not one of the recipes")
    if e.fitness_tokens < 0:
        raise DataeffError(f"pipeline.ensembles.fitness_tokens={e.fitness_tokens} must be 0 or more")
    if d.size is not None:
        if e.members < 1 or d.size not in (e.sizes or cfg.sizes):
            raise DataeffError(f"pipeline.distillation.size={d.size!r} needs an ensemble of that size: set "
                               "ensembles.members and include the size in ensembles.sizes")
        if (d.kl_weight > 0 or d.chain) and d.teacher_cache == "topk" and cfg.base.train.shuffle != "sequence":
            raise DataeffError("pipeline.distillation.teacher_cache=topk needs base.train.shuffle=sequence; use "
                               "teacher_cache=online with document shuffling")
    for name in cfg.downstream.tasks:
        check_task(name)


def _tuned(cfg: PipelineConfig, tasks: list[Task], recipe: str, size: str) -> TuneResult:
    world = _world_budget(cfg)
    for t in tasks:
        if t.recipe.name == recipe and t.size == size and t.budget == world:
            assert t.result is not None
            return t.result
    raise DataeffError(f"pipeline: recipe {recipe!r} was not tuned at size {size!r}")


def member_values(e: EnsembleStageConfig, tuned: dict[str, Any]) -> dict[str, Any]:
    """A member's knob values from the tuned single model's: the paper's rule (more epochs, less weight decay,
    the same LR; Appendix C.2), the tuned values themselves, or explicit ones; ``overrides`` apply last."""
    values = dict(tuned)
    if e.rule == "paper":
        values["train.epochs"] = float(values.get("train.epochs", 1.0)) * e.epochs_factor
        values["optim.weight_decay"] = float(values.get("optim.weight_decay", 0.1)) * e.weight_decay_factor
    elif e.rule == "explicit" and not e.overrides:
        raise DataeffError("pipeline.ensembles.rule=explicit needs ensembles.overrides, the members' knob values")
    return {**values, **e.overrides}


def _ensemble_stage(cfg: PipelineConfig, tasks: list[Task], root: Path, progress: bool) -> dict[str, Any]:
    """Train Kmax members per size through the executor, save each size's ensemble, and score every prefix
    ensemble K = 1..Kmax by probability and logit averaging, plus learned weights on the fitness slice."""
    e = cfg.ensembles
    if e.members < 1:
        return {}
    sizes = e.sizes or cfg.sizes
    plan = {s: member_values(e, _tuned(cfg, tasks, e.recipe, s).best) for s in sizes}
    configs = {s: [member_config(run_config(cfg, s, _world_budget(cfg), plan[s], 0, "ensemble member"), i, e.vary)
                   for i in range(e.members)] for s in sizes}
    if progress:
        print(f"[dataeff run] ensembles: {e.members} members at {len(sizes)} sizes", flush=True)
    flat = [c for s in sizes for c in configs[s]]
    jobs = {run_hash(r.config): r for r in run_jobs(flat, cfg.executor, root / "runs", progress=progress)}
    out: dict[str, Any] = {}
    for s in sizes:
        results = [jobs[run_hash(c)] for c in configs[s]]
        failed = [r for r in results if r.result is None]
        entry: dict[str, Any] = {"member_values": plan[s], "members": [str(r.run_dir) for r in results]}
        if failed:
            entry["error"] = f"{len(failed)} of {e.members} members failed: {failed[0].error}"
            out[s] = entry
            continue
        name = f"{cfg.name}: {s} x{e.members}"
        path = save_ensemble(EnsembleSpec(name=name, members=entry["members"], combine=e.combine),
                             root / "ensembles" / s / "ensemble.json")
        d = score_ensemble(name, entry["members"], cfg.base, e.fitness_tokens, path.parent, progress=progress)
        out[s] = {
            **entry, "ensemble_file": str(path), "K": d["k"], "prob": [r["loss"] for r in d["prob"]],
            "logit": [r["loss"] for r in d["logit"]] if d["logit"] else None,
            "weighted": d["weighted"]["loss"] if d["weighted"] else None, "weights": d["weights"],
            "member_losses": [r["loss"] for r in d["members"]],
        }
    return out


def _distill_configs(cfg: PipelineConfig, tasks: list[Task], ensembles: dict[str, Any], synthetic: Path | None
                     ) -> list[tuple[dict[str, Any], RunConfig]]:
    """(student description, its config) for every student of the distillation stage but the chain's later
    links, whose teachers are earlier students."""
    d = cfg.distillation
    assert d.size is not None
    base_values = _tuned(cfg, tasks, cfg.ensembles.recipe, d.size).best
    teacher = ensembles[d.size]["ensemble_file"]
    seed = cfg.ensembles.members  # a seed no member used
    students = []
    if synthetic is not None:
        values = {**base_values, **d.sequence_overrides, "data.synthetic": str(synthetic),
                  "data.synthetic_share": d.synthetic_share}
        students.append(({"name": "sequence-level", "kind": "sequence",
                          "details": {"synthetic_share": d.synthetic_share, **d.sequence_overrides}},
                         run_config(cfg, d.size, _world_budget(cfg), values, seed, "distillation")))
    if d.kl_weight > 0:
        students.append(({"name": "token-level", "kind": "token",
                          "details": {"kl_weight": d.kl_weight, "temperature": d.temperature}},
                         _kl_student(cfg, d.size, base_values, [teacher], seed)))
    return students


def _kl_student(cfg: PipelineConfig, size: str, values: dict[str, Any], teachers: list[str], seed: int) -> RunConfig:
    d = cfg.distillation
    return run_config(cfg, size, _world_budget(cfg), {
        **values, "distill.teachers": teachers, "distill.weight": d.kl_weight, "distill.temperature": d.temperature,
        "distill.teacher_cache": d.teacher_cache, "distill.top_k": d.top_k, "distill.combine": cfg.ensembles.combine,
    }, seed, "distillation")


def _synthetic_corpus(cfg: PipelineConfig, ensemble_file: str, root: Path, progress: bool) -> Path:
    """Sample the teacher ensemble's mixture unconditionally until the student's mixture has enough synthetic
    tokens; written once (atomically) and reused, since the teacher and the seed fix it."""
    d = cfg.distillation
    world = prepare(cfg.base.data, cfg.base.tokenizer, progress=False)
    real = world.split("train").n_tokens
    # Named by everything the samples depend on, so a changed teacher or setting never reuses old samples.
    key = {"teacher": resolve_members(ensemble_file)[0], "combine": cfg.ensembles.combine, "real_tokens": real,
           **{f: getattr(d, f) for f in ("synthetic_share", "sample_tokens", "sample_temperature", "sample_batch",
                                         "sample_seed")}}
    out = root / "distill" / f"{d.size}-synthetic-{config_hash(key)}.jsonl"
    if out.exists():
        return out
    # Slack: samples are re-tokenized from text, which need not give back the same number of tokens.
    need = math.ceil(synthetic_tokens(real, d.synthetic_share) * 1.1)
    teacher = load_ensemble(ensemble_file, cfg.ensembles.combine, device=cfg.base.train.device)
    tokenizer = world.tokenizer
    max_new = min(d.sample_tokens, teacher.seq_len)
    device = teacher.members[0].embed.weight.device
    generator = torch.Generator(device=device).manual_seed(d.sample_seed)
    rows: list[str] = []
    have = 0
    with tqdm(total=need, desc="sampling the teacher", unit="tok", disable=not progress) as bar:
        for _ in range(100 * math.ceil(need / (d.sample_batch * max_new))):
            if have >= need:
                break
            outs = generate(teacher, [[tokenizer.eos_id]] * d.sample_batch, max_new_tokens=max_new,
                            temperature=d.sample_temperature, eos_id=tokenizer.eos_id, generator=generator,
                            batch_size=d.sample_batch, dtype=cfg.base.train.dtype)
            for tokens in outs:
                kept = tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_id else tokens
                if kept:
                    rows.append(json.dumps({"text": tokenizer.decode(kept)}, ensure_ascii=False))
                    have += len(kept) + 1
                    bar.update(len(kept) + 1)
    if have < need:
        raise DataeffError(f"distillation: the teacher {ensemble_file} sampled {have} of {need} synthetic tokens "
                           "(it mostly ends documents at once); lower distillation.synthetic_share")
    atomic_write_text(out, "\n".join(rows) + "\n")
    return out


def _distillation_stage(cfg: PipelineConfig, tasks: list[Task], ensembles: dict[str, Any], root: Path,
                        progress: bool) -> dict[str, Any]:
    """Students of one size taught by that size's ensemble (sequence- and token-level), and a chain of
    self-distillation from one member: each link distils its predecessor while training on the real data."""
    d = cfg.distillation
    if d.size is None:
        return {}
    if "ensemble_file" not in ensembles[d.size]:
        raise DataeffError(f"pipeline.distillation: the {d.size} ensemble has no teacher: {ensembles[d.size]['error']}")
    ens = ensembles[d.size]
    synthetic = _synthetic_corpus(cfg, ens["ensemble_file"], root, progress) if d.synthetic_share > 0 else None
    students = _distill_configs(cfg, tasks, ensembles, synthetic)
    if progress:
        print(f"[dataeff run] distillation: {len(students)} students of size {d.size}", flush=True)
    results = run_jobs([c for _, c in students], cfg.executor, root / "runs", progress=progress)
    rows = [{**desc, "loss": _loss_of(r), "run_dir": str(r.run_dir), "error": r.error}
            for (desc, _), r in zip(students, results, strict=True)]
    # The chain runs one link at a time: each teacher is the previous link's finished run.
    base_values = _tuned(cfg, tasks, cfg.ensembles.recipe, d.size).best
    teacher = ens["members"][0]
    for step in range(1, d.chain + 1):
        rc = _kl_student(cfg, d.size, base_values, [teacher], cfg.ensembles.members + step)
        [r] = run_jobs([rc], cfg.executor, root / "runs", progress=progress)
        rows.append({"name": "self-distillation" if step == 1 else f"chain step {step}", "kind": "self" if step == 1 else "chain",
                     "details": {"step": step, "teacher": teacher, "kl_weight": d.kl_weight, "temperature": d.temperature},
                     "loss": _loss_of(r), "run_dir": str(r.run_dir), "error": r.error})
        if r.result is None:
            break
        teacher = str(r.run_dir)
    return {"size": d.size, "teacher_file": ens["ensemble_file"], "students": rows,
            "synthetic_file": str(synthetic) if synthetic else None}


def _loss_of(job: JobResult) -> float:
    return float(job.result["val_loss"]) if job.result is not None else math.inf


def _downstream_stage(cfg: PipelineConfig, tasks: list[Task], ensembles: dict[str, Any], distillation: dict[str, Any],
                      root: Path, progress: bool) -> dict[str, Any]:
    """Downstream accuracy of the single model, the ensemble and the students of one size."""
    ds = cfg.downstream
    if not ds.tasks:
        return {}
    size = ds.size or cfg.distillation.size or cfg.sizes[-1]
    single = _tuned(cfg, tasks, cfg.ensembles.recipe, size).best_run_dir
    models: list[tuple[str, str, list[str]]] = [(f"single {size}", "single", [single] if single else [])]
    ens = ensembles.get(size, {})
    if "ensemble_file" in ens:
        models.append((f"ensemble {size} ×{len(ens['members'])}", "ensemble", ens["members"]))
    for s in distillation.get("students", []):
        if s.get("error") is None:
            models.append((f"student: {s['name']}", "student", [s["run_dir"]]))
    out = []
    for label, kind, members in models:
        if members:
            out.append({"label": label, "kind": kind, "members": members,
                        "results": _score_tasks(cfg, root, members, progress)})
    return {"size": size, "tasks": list(ds.tasks), "limit": ds.limit, "models": out}


def _score_tasks(cfg: PipelineConfig, root: Path, members: list[str], progress: bool) -> dict[str, Any]:
    ds = cfg.downstream
    key = {"members": members, "tasks": list(ds.tasks), "limit": ds.limit, "combine": cfg.ensembles.combine}
    cache = root / "downstream" / f"{config_hash(key)}.json"
    if cache.exists():
        return json.loads(cache.read_text())["results"]
    device = str(pick_device(cfg.base.train.device))
    model = load_model(members[0], device=device) if len(members) == 1 else load_ensemble(members, cfg.ensembles.combine, device)
    fn = log_prob_fn(model)
    tokenizer = Tokenizer.load(Path(members[0]) / "tokenizer.json")
    results = {name: evaluate_task(fn, tokenizer, name, load_task(name, limit=ds.limit), progress=progress)
               for name in ds.tasks}
    atomic_write_json(cache, {"key": key, "results": results})
    return results
