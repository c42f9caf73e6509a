"""Stage ``ensembles``: K members per size, every prefix ensemble K = 1..K scored, the K-law
``L(K) = E_N + A·K^-α`` fitted per size, and the joint limit (K → ∞, then N → ∞) with its data-efficiency
multiplier: the scaling axis that beats parameter scaling on fixed data.

Members take the tuned single model's hyperparameters by the paper's rule (2× the epochs, ½ the weight decay,
the same LR; Appendix C.2), the tuned ones, or explicit ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from dataeff.config import option
from dataeff.errors import DataeffError
from dataeff.eval.ensemble import EnsembleSpec, save_ensemble
from dataeff.experiment import scaling
from dataeff.experiment.comparison import Comparison, compare_samples
from dataeff.experiment.ensemble_train import member_config, score_ensemble
from dataeff.experiment.fitting import Fit, Interval, Multiplier, fit_with_intervals, multiplier
from dataeff.experiment.stage import Context, Stage, StageResult
from dataeff.experiment.stages.tuning import comparison_blocks, decide, multiplier_cells, recipes_of
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
    knobs_text,
    loss,
    mult,
    sig,
)
from dataeff.report.plots import band, colors, curve, new_figure, png, set_ylim, shown_path
from dataeff.train.identity import run_hash

_COMBINE = {"prob": "probability averaging", "logit": "logit averaging"}
_VARY = {"both": "initialisation and data order", "init": "initialisation only", "data": "data order only"}
_JOINT = "ensemble joint limit"
_JOINT_COLOR = "darkmagenta"


@dataclass
class EnsembleStageConfig:
    members: int = option(0, "K_max: members trained per size; prefix ensembles K = 1..K_max are scored and fitted "
                             "(0: no ensemble stage)", min=0)
    sizes: list[str] = option([], "sizes with ensembles (default: all; the joint limit needs at least 3)")
    recipe: str = option("regularized", "the recipe whose tuned single model the members' hyperparameters start from")
    rule: Literal["paper", "tuned", "explicit"] = option(
        "paper", "member hyperparameters: paper (epochs × epochs_factor, weight decay × weight_decay_factor, same "
        "LR), tuned (the single model's), or explicit (overrides only)")
    epochs_factor: float = option(2.0, "paper rule: members train this many times the tuned epochs", above=0.0)
    weight_decay_factor: float = option(0.5, "paper rule: members use this fraction of the tuned weight decay", min=0.0)
    overrides: dict[str, Any] = option({}, "knob values applied to every member after the rule")
    vary: Literal["both", "init", "data"] = option(
        "both", "what differs between members: both seeds, only the initialisation, or only the data order")
    combine: Literal["prob", "logit"] = option("prob", "the combination the K-laws and the joint limit are fitted on")
    fitness_tokens: int = option(
        16384, "held-out training-pool tokens (outside the budget, disjoint from validation) on which member "
               "weights are learned (0: no weighted ensemble)", min=0)


@dataclass
class SizeEnsemble:
    """One size's ensemble: its members, every prefix ensemble's loss, and its K-law."""

    params: int
    single_loss: float | None  # the tuned single model's loss
    member_values: dict[str, Any]
    members: list[str]
    error: str | None = None  # why there is no ensemble (members failed)
    ensemble_file: str | None = None
    K: list[int] = field(default_factory=list)
    prob: list[float | None] = field(default_factory=list)  # None: a prefix ensemble scored no finite loss
    logit: list[float | None] | None = None
    weighted: float | None = None  # all members, weights learned on the fitness slice
    weights: list[float] | None = None
    member_losses: list[float | None] = field(default_factory=list)
    k_fit: Fit | None = None

    def __post_init__(self) -> None:
        for name, losses in (("prob", self.prob), ("logit", self.logit)):
            if losses and len(losses) != len(self.K):
                raise ValueError(f"{len(losses)} {name} losses for {len(self.K)} values of K")


@dataclass
class JointLimitResult:
    """The N-law fitted to the sizes' K-law asymptotes E_N; its E is the loss with N and K taken to infinity."""

    refused: str | None = None
    E: float | None = None
    E_ci: Interval | None = None
    n_fit: dict[str, float] | None = None
    E_N: dict[str, float] = field(default_factory=dict)
    E_N_ci: dict[str, Interval] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    summary: str | None = None
    n_boot: int | None = None
    n_skipped: int | None = None


@dataclass
class EnsemblesResult(StageResult):
    combine: str
    rule: str
    vary: str
    recipe: str
    per_size: dict[str, SizeEnsemble]
    joint_limit: JointLimitResult | None = None
    joint_multiplier: Multiplier | None = None
    verdict: list[str] = field(default_factory=list)
    # The joint limit against the single-model asymptotes (the recipe's, then the baseline's).
    comparisons: list[Comparison] = field(default_factory=list)

    def headline(self) -> list[str]:
        return self.verdict

    def data_efficiency(self) -> dict[str, Multiplier]:
        return {_JOINT: self.joint_multiplier} if self.joint_multiplier is not None else {}

    def by_params(self) -> dict[str, SizeEnsemble]:
        """The sizes smallest model first (the pipeline keeps its own order)."""
        return dict(sorted(self.per_size.items(), key=lambda item: item[1].params))


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


def _check(ctx: Context, e: EnsembleStageConfig) -> None:
    if e.recipe not in [r.name for r in recipes_of(ctx.cfg)]:
        raise DataeffError(f"pipeline.ensembles.recipe: {e.recipe!r} is not one of the recipes")
    if e.fitness_tokens < 0:
        raise DataeffError(f"pipeline.ensembles.fitness_tokens={e.fitness_tokens} must be 0 or more")


def _run(ctx: Context, e: EnsembleStageConfig) -> EnsemblesResult:
    """Train K_max members per size, save each size's ensemble, score every prefix ensemble K = 1..K_max by
    probability and logit averaging plus learned weights on the fitness slice, then fit."""
    cfg, world = ctx.cfg, ctx.world
    tuning = ctx.results["tuning"]
    sizes = e.sizes or cfg.sizes
    plan = {s: member_values(e, ctx.tuned(e.recipe, s).best) for s in sizes}
    configs = {s: [member_config(ctx.run_config(s, world, plan[s], 0, "ensemble member"), i, e.vary)
                   for i in range(e.members)] for s in sizes}
    ctx.say(f"ensembles: {e.members} members at {len(sizes)} sizes")
    jobs = {run_hash(r.config): r for r in ctx.run_jobs([c for s in sizes for c in configs[s]])}
    per_size: dict[str, SizeEnsemble] = {}
    per_n: dict[float, tuple[list[int], list[float]]] = {}
    sigma = tuning.seed_sigma
    for s in sizes:
        results = [jobs[run_hash(c)] for c in configs[s]]
        row = SizeEnsemble(params=tuning.params[s], single_loss=ctx.tuned(e.recipe, s).best_loss, member_values=plan[s],
                           members=[str(r.run_dir) for r in results])
        per_size[s] = row
        failed = [r for r in results if r.result is None]
        if failed:
            row.error = f"{len(failed)} of {e.members} members failed: {failed[0].error}"
            continue
        name = f"{cfg.name}: {s} x{e.members}"
        path = save_ensemble(EnsembleSpec(name=name, members=row.members, combine=e.combine),
                             ctx.root / "ensembles" / s / "ensemble.json")
        d = score_ensemble(name, row.members, cfg.base, e.fitness_tokens, path.parent, progress=ctx.progress)
        row.ensemble_file, row.K = str(path), d["k"]
        row.prob = [r["loss"] for r in d["prob"]]
        row.logit = [r["loss"] for r in d["logit"]] if d["logit"] else None
        row.weighted, row.weights = (d["weighted"]["loss"] if d["weighted"] else None), d["weights"]
        row.member_losses = [r["loss"] for r in d["members"]]
        k_curve = (row.logit if e.combine == "logit" else None) or row.prob
        row.k_fit = fit_with_intervals([float(k) for k in row.K], k_curve, cfg.fit, sigma)
        per_n[float(row.params)] = (row.K, k_curve)
    out = EnsemblesResult(combine=e.combine, rule=e.rule, vary=e.vary, recipe=e.recipe, per_size=per_size)
    if not per_n and not per_size:
        return out
    try:
        jl = scaling.joint_limit(per_n, n_boot=cfg.fit.n_boot, seed=cfg.fit.seed, ci=cfg.fit.ci, sigma=sigma,
                                 method=None if cfg.fit.method == "auto" else cfg.fit.method)
    except DataeffError as err:
        out.joint_limit = JointLimitResult(refused=str(err))
        return out
    by_n = {float(row.params): s for s, row in per_size.items()}
    out.joint_limit = JointLimitResult(
        E=jl.E, E_ci=jl.interval, n_fit=dict(jl.n_fit.to_dict()), E_N={by_n[n]: f.E for n, f in jl.k_fits.items()},
        E_N_ci={by_n[n]: ci for n, ci in jl.E_N_intervals.items()}, params={by_n[n]: int(n) for n in jl.k_fits},
        summary=scaling.fit_summary(jl), n_boot=jl.n_boot, n_skipped=jl.n_skipped)
    for name in dict.fromkeys([e.recipe, tuning.baseline_recipe]):
        single = tuning.fits.get(name)
        if single is not None and single.fitted and single.replicates:
            out.comparisons.append(compare_samples(_JOINT, f"{name} asymptote", jl.E - single.E, jl.E_samples,
                                                   np.asarray(single.replicates["E"]), cfg.fit.ci))
    ds = tuning.data_scaling
    if ds is not None:
        best = [v if v is not None else math.inf for v in ds.best_loss]
        out.joint_multiplier = multiplier(jl.E, ds, [float(b) for b in ds.budgets], best, world, cfg.fit.ci, jl.E_samples,
                                          baseline_sigma=tuning.seed_sigma, seed=cfg.fit.seed)
        vs_baseline = next((c for c in out.comparisons if c.b == f"{tuning.baseline_recipe} asymptote"), None)
        if vs_baseline is None:
            decide(out.joint_multiplier, None, f"no comparison with the {tuning.baseline_recipe} asymptote")
        else:
            decide(out.joint_multiplier, vs_baseline.decided_lower,
                   f"the interval of {vs_baseline.a} − {vs_baseline.b} "
                   + ("says it is lower" if vs_baseline.decided_lower else "does not say it is lower"))
    lo, hi = jl.interval
    single = tuning.fits.get(e.recipe)
    versus = f" vs the {e.recipe} recipe's asymptote {single.E:.4f}" if single is not None and single.refused is None else ""
    out.verdict = [f"ensembles: joint limit (K → ∞, then N → ∞) E = {jl.E:.4f} [{lo:.4f}, {hi:.4f}]{versus}",
                   *(c.sentence for c in out.comparisons)]
    return out


# ---------------------------------------------------------------------------------------------------------
# Report section


def _combine_text(combine: str) -> str:
    return _COMBINE.get(combine, f"{combine} averaging")


def _rule_text(ens: EnsemblesResult, e: EnsembleStageConfig) -> str:
    single = f"the tuned {ens.recipe} model"
    rule = {
        "paper": f"the paper's rule ({e.epochs_factor:g}× the epochs and {e.weight_decay_factor:g}× the weight decay of "
                 f"{single}, its other knobs)",
        "tuned": f"the hyperparameters of {single}",
        "explicit": "explicitly configured hyperparameters",
    }.get(ens.rule, f"the member rule {ens.rule!r}")
    return rule + f", seeds differing in {_VARY.get(ens.vary, ens.vary)}"


def _drawn(ens: EnsemblesResult) -> dict[str, SizeEnsemble]:
    """The sizes that have at least one finite loss to draw."""
    return {s: row for s, row in ens.by_params().items() if any(map(finite, row.prob))}


def _section(results: Any, root: Path) -> list[Block]:
    ens: EnsemblesResult | None = results.stages.get("ensembles")
    if ens is None:
        return []
    e = results.config.ensembles
    ci = results.config.fit.ci
    return [Heading("Ensemble scaling"), _fig_loss_vs_k(ens, e, ci), *_tables(ens, e, ci, root),
            Heading("Single models vs ensembles"), _fig_loss_vs_total_params(ens, results["tuning"], ci),
            *_joint_limit_blocks(ens, results["tuning"].baseline_recipe, ci)]


def _k_ticks(ax: Axes, ks: list[float], k_top: float) -> None:
    """Integer ticks on a log2 axis: the measured K, if few, and the powers of two out to the curves' end."""
    measured = set(ks)
    ticks = sorted({*(measured if len(measured) <= 8 else ()), *(2.0**i for i in range(int(math.log2(k_top)) + 1))})
    ax.set_xticks(ticks, [f"{k:g}" for k in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _fig_loss_vs_k(ens: EnsemblesResult, e: EnsembleStageConfig, ci: float) -> Fig:
    sizes = _drawn(ens)
    if not sizes:
        return Fig("loss_vs_k", "Ensemble-scaling figure skipped: no ensemble has a finite loss.", None)
    k_max = max(max(row.K) for row in sizes.values())
    x = np.geomspace(1, 4 * k_max, 200)
    fig, ax = new_figure(8.0, 5.0)
    y_seen: list[float | None] = []
    notes = [f"{s} not drawn ({row.error or 'no finite loss'})" for s, row in ens.by_params().items() if s not in sizes]
    refused: dict[str, list[str]] = {}  # reason -> sizes, since one reason (too few K) usually holds for all
    fitted = logit_drawn = weighted_drawn = False
    for color, (size, row) in zip(colors(len(sizes)), sizes.items(), strict=True):
        fit = row.k_fit
        label = f"{size} (N={count(row.params)})"
        if fit is not None and fit.fitted:
            fitted = True
            label += f": E_N={fit.E:.4f} {interval(fit.E_ci)}, α={fit.alpha:.3g}"
            ax.plot(x, curve(fit, x), "-", color=color, lw=1.2)
            b = band(fit, x, ci)
            if b is not None:
                ax.fill_between(x, *b, color=color, alpha=0.15, lw=0)
            ax.axhline(fit.E, color=color, ls=":", lw=1.4)
            y_seen.append(fit.E)
        else:
            label += " (no K-law)"
            refused.setdefault(fit.refused if fit is not None and fit.refused else "no fit", []).append(size)
        pts = [(k, v) for k, v in zip(row.K, row.prob, strict=True) if finite(v)]
        ax.plot(*zip(*pts, strict=True), "o", color=color, ms=7, zorder=3, label=label)
        y_seen += [v for _, v in pts]
        logit = [(k, v) for k, v in zip(row.K, row.logit or [], strict=False) if finite(v)]
        if logit:
            ax.plot(*zip(*logit, strict=True), "s--", color=color, mfc="none", ms=6, lw=0.8, mew=1.4, zorder=3)
            y_seen += [v for _, v in logit]
            logit_drawn = True
        if finite(row.weighted):
            ax.plot([max(row.K)], [row.weighted], "*", color=color, mec="k", mew=0.5, ms=12, zorder=4)
            y_seen.append(row.weighted)
            weighted_drawn = True
    set_ylim(ax, y_seen)
    ax.set_xscale("log", base=2)
    # Without a K-law nothing extends past the measured K, so neither does the axis.
    k_top = x[-1] if fitted else k_max * 1.2
    if not fitted:
        ax.set_xlim(0.9, k_top)
    _k_ticks(ax, [k for row in sizes.values() for k in row.K], k_top)
    ax.set_xlabel("ensemble members K (log2)")
    ax.set_ylabel("held-out loss")
    ax.set_title("Ensemble scaling: loss vs members per model size", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    for drawn, marker, ls, mfc, text in (
        (True, "o", "", "0.3", _combine_text("prob")),
        (fitted, "", "-", "0.3", f"K-law fitted on {_combine_text(ens.combine)}, {ci:.0%} band"),
        (logit_drawn, "s", "--", "none", _combine_text("logit")),
        (weighted_drawn, "*", "", "0.3", "weighted probability averaging at the largest K"),
        (fitted, "", ":", "0.3", "asymptote E_N (K → ∞)"),
    ):
        if drawn:
            handles.append(Line2D([], [], marker=marker, ls=ls, color="0.3", mfc=mfc, mew=1.4))
            labels.append(text)
    ax.legend(handles, labels, fontsize=7, loc="best")
    caption = (f"Loss of the ensemble of the first K members by {_combine_text('prob')} (filled)"
               + (f" and {_combine_text('logit')} (hollow, dashed)" if logit_drawn else "")
               + f", with the K-law E + A·K^-α fitted on {_combine_text(ens.combine)} extended to 4× the largest K, "
               f"its {ci:.0%} bootstrap band and each size's asymptote E_N (dotted). Members: {_rule_text(ens, e)}.")
    notes += [f"{', '.join(names)}: K-law refused ({reason})" for reason, names in refused.items()]
    if notes:
        caption += " " + "; ".join(notes) + "."
    return Fig("loss_vs_k", caption, png(fig))


def _fig_loss_vs_total_params(ens: EnsemblesResult, tuning: Any, ci: float) -> Fig:
    sizes = _drawn(ens)
    if not sizes:
        return Fig("loss_vs_total_params", "Single-models-vs-ensembles figure skipped: no ensemble has a finite loss.", None)
    totals = [k * row.params for row in sizes.values() for k in row.K]
    x = np.geomspace(min(row.params for row in sizes.values()) / 1.5, max(totals) * 4, 300)
    fig, ax = new_figure(8.0, 5.0)
    single = [(row.params, row.single_loss) for row in sizes.values() if finite(row.single_loss)]
    y_seen: list[float | None] = [v for _, v in single]
    if single:
        ax.plot(*zip(*single, strict=True), "o", color="k", ms=8, zorder=4, label=f"tuned single models ({ens.recipe})")
    fit = tuning.fits.get(ens.recipe)
    has_fit = fit is not None and fit.fitted
    if has_fit:
        ax.plot(x, curve(fit, x), "-", color="k", lw=1.2, label=f"{ens.recipe} N-law, α={fit.alpha:.3g}")
        b = band(fit, x, ci)
        if b is not None:
            ax.fill_between(x, *b, color="k", alpha=0.08, lw=0)
        ax.axhline(fit.E, color="k", ls="--", lw=1, label=f"{ens.recipe} asymptote {fit.E:.4f} {interval(fit.E_ci)}")
        y_seen.append(fit.E)
    for color, (size, row) in zip(colors(len(sizes)), sizes.items(), strict=True):
        pts = [(k * row.params, v) for k, v in zip(row.K, row.prob, strict=True) if finite(v)]
        ks = [k for k, v in zip(row.K, row.prob, strict=True) if finite(v)]
        ax.plot(*zip(*pts, strict=True), "o-", color=color, ms=5, lw=1.2, zorder=3,
                label=f"{size} ensembles, K = {min(ks):g}–{max(ks):g}")
        ax.annotate(f"K={max(ks):g}", pts[-1], textcoords="offset points", xytext=(6, -12), fontsize=7, color=color,
                    zorder=5)
        y_seen += [v for _, v in pts]
    joint = ens.joint_limit
    if joint is not None and joint.E is not None:
        ax.axhline(joint.E, color=_JOINT_COLOR, ls="-.", lw=1.4,
                   label=f"joint limit (N, K → ∞) {joint.E:.4f} {interval(joint.E_ci)}")
        if joint.E_ci is not None and all(finite(v) for v in joint.E_ci):
            ax.axhspan(*joint.E_ci, color=_JOINT_COLOR, alpha=0.12, lw=0)
        y_seen.append(joint.E)
    set_ylim(ax, y_seen)
    ax.set_xscale("log")
    ax.set_xlabel("total parameters K·N (log)")
    ax.set_ylabel("held-out loss")
    ax.set_title("Single models vs ensembles at equal total parameters", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    caption = (f"Loss against total parameters: the tuned single models ({ens.recipe}, black)"
               + (f" with their fitted N-law, its {ci:.0%} band and asymptote (dashed)" if has_fit else "")
               + f", and per size the ensembles of K members ({_combine_text('prob')}) at K·N parameters.")
    if joint is not None and joint.E is not None:
        caption += f" Dash-dotted, shaded: the joint limit with both N and K taken to infinity and its {ci:.0%} interval."
    return Fig("loss_vs_total_params", caption, png(fig))


def _tables(ens: EnsemblesResult, e: EnsembleStageConfig, ci: float, root: Path) -> list[Block]:
    rows: list[list[str | Cell]] = []
    for size, row in ens.by_params().items():
        head: list[str | Cell] = [Cell(size, shown_path(root, row.ensemble_file or "")), count(row.params),
                                  knobs_text(row.member_values), loss(row.single_loss)]
        if not row.prob:
            rows.append([*head, Cell("failed", row.error or ""), *[MISSING] * 6])
            continue
        top = row.K.index(max(row.K))
        members = row.member_losses
        member = Cell(loss(float(np.mean(members))), "members: " + ", ".join(map(loss, members))) if members else Cell(MISSING)
        weighted = Cell(loss(row.weighted), "weights " + ", ".join(f"{w:.3f}" for w in row.weights) if row.weights else "")
        fit = row.k_fit
        if fit is not None and fit.fitted:
            asymptote: list[str | Cell] = [f"{loss(fit.E)} {interval(fit.E_ci)}", f"{sig(fit.alpha)} {interval(fit.alpha_ci, sig)}"]
        else:
            asymptote = [Cell("refused", fit.refused if fit is not None and fit.refused else "no fit"), MISSING]
        rows.append([*head, member, f"{row.K[top]:g}", loss(row.prob[top]), loss(row.logit[top]) if row.logit else MISSING,
                     weighted, *asymptote])
    headers = ["size", "N", "member knobs", "single (tuned)", "member (mean)", "max K", "prob", "logit", "weighted",
               f"E_N [{ci:.0%} CI]", "α"]
    blocks: list[Block] = [
        Para(f"Each size's ensemble: members trained with {_rule_text(ens, e)}; the loss of all max K members by "
             "probability, logit and weighted probability averaging (weights learned on a held-out slice), and the "
             f"K-law L(K) = E_N + A·K^-α fitted on {_combine_text(ens.combine)}, whose E_N is the loss of "
             "infinitely many members of that size."),
        Table(headers, rows),
    ]
    with_logit = {size: row for size, row in ens.by_params().items() if row.logit}
    if not with_logit:
        return [*blocks, Para("Logit averaging was not evaluated.")]
    ks = sorted({k for row in with_logit.values() for k in row.K})
    diff_rows: list[list[str | Cell]] = []
    for size, row in with_logit.items():
        # + 0.0 turns the -0.0 of rounding noise (K = 1, where both are the one member) into 0.
        diffs = {k: round(p - q, 4) + 0.0 for k, p, q in zip(row.K, row.prob, row.logit or [], strict=True)
                 if finite(p) and finite(q)}
        diff_rows.append([size, *(f"{diffs[k]:+.4f}" if k in diffs else MISSING for k in ks)])
    return [*blocks,
            Heading("Probability vs logit averaging", 3),
            Para("Loss with probability averaging minus loss with logit averaging, for the ensemble of the first K "
                 "members: negative where averaging probabilities is better."),
            Table(["size", *(f"K={k:g}" for k in ks)], diff_rows)]


def _joint_limit_blocks(ens: EnsemblesResult, baseline: str, ci: float) -> list[Block]:
    joint = ens.joint_limit
    if joint is None:
        return [Para("No joint limit was fitted.")]
    if joint.refused is not None:
        return [Para(f"No joint limit: {joint.refused}.")]
    n_fit = joint.n_fit or {}
    m = ens.joint_multiplier
    row: list[str | Cell] = [f"{loss(joint.E)} {interval(joint.E_ci)}", sig(n_fit.get("A")), sig(n_fit.get("alpha")),
                             *(multiplier_cells(m) if m else [MISSING, MISSING])]
    return [Para("Joint limit: the N-law E + A·N^-α fitted to the sizes' K-law asymptotes E_N; its E is the loss with "
                 "both the model size N and the member count K taken to infinity. The multiplier is the tokens the "
                 f"{baseline} recipe needs to reach it, over the world's budget."),
            Table([f"E (N, K → ∞) [{ci:.0%} CI]", "A", "α", f"multiplier, power law [{ci:.0%} CI]", "interpolated",
                   f"interpolated [{ci:.0%} CI]", "decision"],
                  [[*row, interval(m.interpolated_ci, mult) if m else MISSING, (m.decision or MISSING) if m else MISSING]]),
            *comparison_blocks(ens.comparisons, ci)]


STAGE = Stage("ensembles", config=lambda cfg: cfg.ensembles, enabled=lambda e: e.members >= 1,
              result=EnsemblesResult, run=_run, section=_section, check=_check)
