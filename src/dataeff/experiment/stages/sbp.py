"""Stage ``sbp``: Synthetic Bootstrapped Pretraining at several world sizes, against repetition and an oracle.

For every world (the first ``W`` real tokens of the corpus in the budget's seeded order, so worlds are nested)
and one model size, at equal training tokens ``T``:

1. **repetition**: the world alone, repeated ``T / W`` times, with the tuned recipe's other knobs. Its first
   seed is also the **base model**;
2. **pairs**: the world's documents embedded and paired (``dataeff pairs``; an executor job);
3. **synthesizer**: the base model continued on the pairs as p(d2 | d1) (``dataeff synthesizer``; a run);
4. **synthesize**: seeds drawn uniformly from the world, d2 sampled from the synthesizer, deduplicated against
   the world and itself (``dataeff synthesize``; a job), enough for the largest share;
5. **SBP**: the world plus synthetic documents seen once (``data.synthetic_schedule=once``) at each synthetic
   share ``s`` of the ``T`` tokens, the world repeated ``(1 − s)·T / W`` times to fill the rest;
6. **oracle**: the same mix with fresh real documents of the same corpus, disjoint from the world, in place of
   the synthetic ones.

Gain closed = (L_rep − L_sbp) / (L_rep − L_oracle) per share, with a bootstrap interval over seeds
(:mod:`dataeff.experiment.gain`); the world size where it turns positive is the critical threshold. The
synthetic corpus's quality table (``dataeff quality``, the world as the real reference row) and the downstream
accuracy of every arm's first seed come with it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dataeff.config import option, section
from dataeff.data.config import DataConfig, TokenizerConfig
from dataeff.data.corpora import load_documents
from dataeff.data.tokens import load_prepared, prepare
from dataeff.errors import DataeffError
from dataeff.eval.tasks import TasksConfig, check_task
from dataeff.experiment.executor import Job, JobResult
from dataeff.experiment.gain import gain_closed, mean_interval
from dataeff.experiment.stage import Context, Failure, Stage, StageResult
from dataeff.fsutil import atomic_write_json, atomic_write_text
from dataeff.report.blocks import (
    MISSING,
    Block,
    Bullets,
    Cell,
    Fig,
    Heading,
    Para,
    Table,
    count,
    finite,
    interval,
    loss,
)
from dataeff.report.plots import colors, new_figure, png, shown_path
from dataeff.synth.embed import document_text, first_chunks, load_encoder, model_window, resolve_model
from dataeff.synth.neighbors import PairsConfig, pairs, read_pairs
from dataeff.synth.quality import Corpus, QualityConfig, quality_table, read_corpus
from dataeff.synth.synthesize import SynthesizeConfig
from dataeff.synth.synthesizer import SynthesizerConfig, pair_corpus, synthesizer_run
from dataeff.train.config import RunConfig

MIN_CONTEXT = 256
_PAPER = "SBP closed about 42% of the gap to the oracle at 200B training tokens and about half at 1T (3B model)"


@dataclass
class SBPStageConfig:
    worlds: list[int] = option([], "world sizes in unique real tokens (empty: no sbp stage)")
    training_tokens: int = option(0, "training tokens of every arm at every world (0: 16 × the largest world)", min=0)
    size: str | None = option(None, "model size of every arm, the base model and the synthesizer (default: the "
                                    "smallest of sizes)")
    recipe: str = option("standard", "the tuned recipe whose optimum (all but its epochs) every arm uses")
    seeds: list[int] = option([0, 1], "seeds of every arm (init and data order)")
    shares: list[float] = option([0.25, 0.111], "synthetic shares of the training tokens (1:3 and 1:8 synthetic:real)")
    pairs: PairsConfig = section(PairsConfig, "embedding and pairing of each world (embed.store, out are set per world)")
    synthesizer: dict[str, Any] = option({"train.epochs": 2}, "knob values of the synthesizer's run, over the "
                                                              "arms' tuned ones")
    prompt_share: float = option(0.5, "share of the context a seed (d1) fills in training and sampling",
                                 above=0.0, below=1.0)
    synthesize: SynthesizeConfig = section(SynthesizeConfig, "sampling (synthesizer, store, tokens, out are set per "
                                                             "world)")
    slack: float = option(1.15, "synthetic tokens sampled per token the largest share needs (text is re-tokenized)",
                          min=1.0)
    quality_sample: int = option(500, "documents of each corpus the quality table measures", min=1)
    quality_encoder: bool = option(True, "measure pair-irrelevance with the pairing's embedding model")
    shown_samples: int = option(3, "(seed, synthetic) pairs shown per world", min=0)
    tasks: list[str] = option([], "downstream tasks scored on every arm's first seed (default: none)")
    task_limit: int | None = option(200, "items per task at most", min=1)
    n_boot: int = option(2000, "bootstrap resamples of the intervals", min=100)


# ---------------------------------------------------------------------------------------------------------
# results


@dataclass
class Arm:
    name: str  # repetition, sbp 1:3, oracle 1:3
    kind: str  # repetition, sbp or oracle
    share: float  # of the training tokens that are not the world's (0 for repetition)
    epochs: float  # passes over the world
    losses: list[float | None]
    run_dirs: list[str | None]
    errors: list[str | None]
    mean: float | None = None
    low: float | None = None
    high: float | None = None
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class GainRow:
    share: float
    value: float | None
    low: float | None
    high: float | None


@dataclass
class WorldResult:
    world: int
    docs: int
    store: str
    arms: list[Arm] = field(default_factory=list)
    gains: list[GainRow] = field(default_factory=list)
    pairs: dict[str, Any] = field(default_factory=dict)
    synthesizer: str | None = None
    synthesizer_loss: float | None = None
    synthetic: dict[str, Any] = field(default_factory=dict)
    quality: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # the SBP step that failed (pairs, synthesizer, synthesize), if one did


@dataclass
class SBPResult(StageResult):
    size: str
    training_tokens: int
    shares: list[float]
    seeds: list[int]
    values: dict[str, Any]
    worlds: list[WorldResult] = field(default_factory=list)

    def threshold(self, share: float) -> int | None:
        """The smallest world from which on every gain interval at ``share`` lies above 0 (None: none does)."""
        found = None
        for w in reversed(self.worlds):
            g = next((g for g in w.gains if g.share == share), None)
            if g is None or g.low is None or g.low <= 0:
                break
            found = w.world
        return found

    def headline(self) -> list[str]:
        lines = []
        for share in self.shares:
            gains = [(w.world, next((g for g in w.gains if g.share == share), None)) for w in self.worlds]
            text = ", ".join(f"{count(world)}: {_pct(g.value if g else None)}" for world, g in gains)
            at = self.threshold(share)
            where = (f"its interval is above 0 from {count(at)} world tokens on" if at is not None else
                     "no world size here has its interval above 0")
            lines.append(f"SBP {_ratio(share)}: gain closed by world size {text}; {where}")
        return lines

    def failures(self) -> list[Failure]:
        out = []
        for w in self.worlds:
            for arm in w.arms:
                for seed, run_dir, error in zip(self.seeds, arm.run_dirs, arm.errors, strict=True):
                    if error is not None:
                        out.append(Failure(f"sbp {count(w.world)} {arm.name}", {"seed": seed}, run_dir, error))
            if w.error is not None:
                out.append(Failure(f"sbp {count(w.world)}", {}, None, w.error))
        return out


def _ratio(share: float) -> str:
    return f"1:{(1 - share) / share:.3g}"


def _pct(v: float | None) -> str:
    return f"{v:.0%}" if finite(v) else MISSING


# ---------------------------------------------------------------------------------------------------------
# jobs


def pairs_job(cfg: PairsConfig, out_dir: Path) -> dict[str, Any]:
    """Embed and pair one world into ``out_dir/pairs``."""
    out = pairs(dataclasses.replace(cfg, out=str(out_dir / "pairs"), progress=False,
                                    embed=dataclasses.replace(cfg.embed, progress=False)))
    _, stats = read_pairs(out)
    keys = ("n_docs", "n_pairable", "n_docs_with_pair", "n_pairs", "n_mutual_pairs", "near_duplicates",
            "pair_similarity", "best_neighbour_quantiles", "k", "alpha")
    return {"dir": str(out), **{k: stats[k] for k in keys}}


@dataclass
class QualityJob:
    synthetic: str  # a synthetic.jsonl
    store: str  # the world's token store: its training documents are the real reference row
    sample: int
    alpha: float
    encoder: str | None  # an embedding model for pair-irrelevance, or None
    device: str = "auto"


def quality_job(cfg: QualityJob, out_dir: Path) -> dict[str, Any]:
    """The quality table of one synthetic corpus beside its world (``quality.json``)."""
    prepared = load_prepared(cfg.store)
    split = prepared.split("train")
    world = Corpus("world", [document_text(split, prepared.tokenizer, d) for d in range(split.n_docs)])
    encode = None
    if cfg.encoder is not None:
        ref = resolve_model(cfg.encoder)
        encoder, window = load_encoder(ref, cfg.device), model_window(ref)

        def encode(texts: Any) -> np.ndarray:
            return encoder.encode(first_chunks(list(texts), encoder, window)[0], window, 64)

    qcfg = QualityConfig(sample=cfg.sample, alpha=cfg.alpha, progress=False)
    report = quality_table([read_corpus(cfg.synthetic, name="synthetic")], world, qcfg, encode=encode)
    atomic_write_text(out_dir / "quality.json", json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    return {"rows": [r.to_dict() for r in report.rows]}


# ---------------------------------------------------------------------------------------------------------
# the stage


def _size(ctx: Context, s: SBPStageConfig) -> str:
    return s.size or ctx.cfg.sizes[0]


def _tokens(s: SBPStageConfig) -> int:
    return s.training_tokens or 16 * max(s.worlds)


def _check(ctx: Context, s: SBPStageConfig) -> None:
    if any(w < 1 for w in s.worlds) or len(set(s.worlds)) != len(s.worlds):
        raise DataeffError(f"pipeline.sbp.worlds={s.worlds}: world sizes must be distinct positive token counts")
    if _tokens(s) < max(s.worlds):
        raise DataeffError(f"pipeline.sbp.training_tokens={s.training_tokens} is below the largest world "
                           f"{max(s.worlds)}: every arm sees the world at least once")
    if _size(ctx, s) not in ctx.cfg.sizes:
        raise DataeffError(f"pipeline.sbp.size={s.size!r} is not among sizes {ctx.cfg.sizes}: its recipe is tuned there")
    recipes = [r.name for r in ctx.cfg.recipes] or ["standard", "regularized"]
    if s.recipe not in recipes:
        raise DataeffError(f"pipeline.sbp.recipe={s.recipe!r} is not a tuned recipe ({', '.join(recipes)})")
    if not s.seeds or not s.shares or not all(0 < x < 1 for x in s.shares):
        raise DataeffError(f"pipeline.sbp: seeds={s.seeds} and shares={s.shares} need at least one seed and shares "
                           "in (0, 1)")
    if ctx.cfg.base.model.seq_len < MIN_CONTEXT:
        raise DataeffError(f"pipeline.sbp needs base.model.seq_len of at least {MIN_CONTEXT} (it is "
                           f"{ctx.cfg.base.model.seq_len}): a seed and its neighbour share one context")
    for name in s.tasks:
        check_task(name)


def _world_data(ctx: Context, world: int) -> DataConfig:
    return dataclasses.replace(ctx.cfg.base.data, train_tokens=world, synthetic=None, synthetic_share=0.0)


def fresh_documents(data: DataConfig, tokenizer: TokenizerConfig, world_docs: int, tokens: int, out: Path) -> dict[str, Any]:
    """Write training-pool documents the world left out (the budget's order after the world's first
    ``world_docs``) to ``out`` as JSONL until they hold ``tokens`` tokens with the store's tokenizer."""
    prepared = prepare(data, tokenizer, progress=False)
    docs = load_documents(dataclasses.replace(data, train_tokens=None))["train"]
    order = np.random.default_rng(data.budget_seed).permutation(len(docs))
    have, lines = 0, []
    for i in order[world_docs:]:
        text = docs[int(i)]
        assert isinstance(text, str)
        have += len(prepared.tokenizer.encode(text)) + 1
        lines.append(json.dumps({"text": text}, ensure_ascii=False))
        if have >= tokens:
            break
    if have < tokens:
        raise DataeffError(f"pipeline.sbp oracle: the corpus holds {have} tokens beyond a world of {world_docs} "
                           f"documents; its oracle needs {tokens}; lower sbp.training_tokens, the shares or the worlds")
    atomic_write_text(out, "\n".join(lines) + "\n")
    return {"documents": len(lines), "tokens": have}


def _arm_config(ctx: Context, s: SBPStageConfig, world: int, values: dict[str, Any], seed: int, epochs: float,
                extra: dict[str, Any]) -> RunConfig:
    return ctx.run_config(_size(ctx, s), world, {**values, "train.epochs": epochs, **extra}, seed, "sbp")


def _losses(jobs: list[JobResult]) -> tuple[list[float | None], list[str | None], list[str | None]]:
    return ([float(j.result["val_loss"]) if j.result else None for j in jobs], [str(j.run_dir) for j in jobs],
            [j.error for j in jobs])


def _run(ctx: Context, s: SBPStageConfig) -> SBPResult:
    size = _size(ctx, s)
    T = _tokens(s)
    values = {k: v for k, v in ctx.tuned(s.recipe, size).best.items() if k != "train.epochs"}
    out = SBPResult(size=size, training_tokens=T, shares=list(s.shares), seeds=list(s.seeds), values=values)
    base_tok = ctx.cfg.base.tokenizer
    worlds = sorted(s.worlds)
    stores = {w: prepare(_world_data(ctx, w), base_tok, progress=False) for w in worlds}
    for w in worlds:
        out.worlds.append(WorldResult(world=w, docs=stores[w].split("train").n_docs, store=str(stores[w].path)))
    by_world = {r.world: r for r in out.worlds}
    seq_len = ctx.cfg.base.model.seq_len

    # Phase 1: repetition (and the base model), the oracles, and the pairs: none needs another's output.
    rep = {w: [_arm_config(ctx, s, w, values, seed, T / w, {}) for seed in s.seeds] for w in worlds}
    oracle: dict[tuple[int, float], list[RunConfig]] = {}
    for w in worlds:
        data = _world_data(ctx, w)
        for share in s.shares:
            need = math.ceil(share * T * s.slack) + seq_len
            key = {"data": dataclasses.asdict(data), "tokenizer": dataclasses.asdict(base_tok), "world_docs":
                   by_world[w].docs, "tokens": need}
            directory = ctx.artifact("sbp-oracle", key)
            path = directory / "fresh.jsonl"
            if not path.exists():
                directory.mkdir(parents=True, exist_ok=True)
                atomic_write_json(directory / "fresh.json", fresh_documents(data, base_tok, by_world[w].docs, need, path))
            oracle[(w, share)] = [_arm_config(ctx, s, w, values, seed, (1 - share) * T / w, {
                "data.synthetic": str(path), "data.synthetic_share": share, "data.synthetic_schedule": "once"})
                for seed in s.seeds]
    pair_jobs = []
    for w in worlds:
        pcfg = dataclasses.replace(s.pairs, embed=dataclasses.replace(
            s.pairs.embed, store=str(stores[w].path), cache_dir=str(ctx.root / "embeddings")))
        pair_jobs.append(Job(f"{__name__}:pairs_job", pcfg, ctx.artifact("sbp-pairs", pcfg)))
    ctx.say(f"sbp: {len(worlds)} worlds × {len(s.seeds)} seeds: repetition and oracle runs, pairs")
    flat = [c for w in worlds for c in rep[w]] + [c for k in oracle for c in oracle[k]]
    done = iter(ctx.run_jobs(flat))
    rep_jobs = {w: [next(done) for _ in s.seeds] for w in worlds}
    oracle_jobs = {k: [next(done) for _ in s.seeds] for k in oracle}
    paired = dict(zip(worlds, ctx.run(pair_jobs), strict=True))
    for w in worlds:
        if paired[w].result is None:
            by_world[w].error = f"pairs: {paired[w].error}"
        else:
            by_world[w].pairs = paired[w].result
        if rep_jobs[w][0].result is None and by_world[w].error is None:
            by_world[w].error = f"base model: {rep_jobs[w][0].error}"

    # Phase 2: a synthesizer per world, from its base model.
    synth_cfgs: dict[int, RunConfig] = {}
    for w in worlds:
        if by_world[w].error is not None:
            continue
        base = str(rep_jobs[w][0].run_dir)
        scfg = SynthesizerConfig(base=base, pairs=by_world[w].pairs["dir"], prompt_share=s.prompt_share,
                                 run=ctx.run_config(size, w, {**values, **s.synthesizer}, s.seeds[0], "sbp.synthesizer"))
        directory = ctx.artifact("sbp-synthesizer-corpus", {"base": base, "pairs": scfg.pairs,
                                                            "prompt_share": s.prompt_share, "seq_len": seq_len})
        corpus = directory / "pairs.jsonl"
        if not corpus.exists():
            directory.mkdir(parents=True, exist_ok=True)
            info = pair_corpus(scfg.pairs, load_prepared(by_world[w].store).tokenizer, seq_len, s.prompt_share, corpus)
            atomic_write_json(directory / "pairs.json", info)
        synth_cfgs[w] = synthesizer_run(scfg, corpus)
    ctx.say(f"sbp: {len(synth_cfgs)} synthesizers")
    for w, job in zip(synth_cfgs, ctx.run_jobs(list(synth_cfgs.values())), strict=True):
        by_world[w].synthesizer = str(job.run_dir)
        if job.result is None:
            by_world[w].error = f"synthesizer: {job.error}"
        else:
            by_world[w].synthesizer_loss = float(job.result["val_loss"])

    # Phase 3: the synthetic corpora, enough for the largest share.
    need = math.ceil(max(s.shares) * T * s.slack) + seq_len
    syn_jobs = {}
    for w in worlds:
        if by_world[w].error is None:
            cfg = dataclasses.replace(s.synthesize, synthesizer=by_world[w].synthesizer, store=by_world[w].store,
                                      tokens=need, prompt_share=s.prompt_share, progress=False,
                                      device=ctx.cfg.base.train.device)
            syn_jobs[w] = Job("dataeff.synth.synthesize:synthesize_job", cfg, ctx.artifact("sbp-synthetic", cfg))
    ctx.say(f"sbp: sampling {len(syn_jobs)} synthetic corpora of {count(need)} tokens")
    for w, job in zip(syn_jobs, ctx.run(list(syn_jobs.values())), strict=True):
        if job.result is None:
            by_world[w].error = f"synthesize: {job.error}"
        else:
            by_world[w].synthetic = {k: v for k, v in job.result.items() if k != "identity"}

    # Phase 4: the SBP arms and the quality tables.
    sbp: dict[tuple[int, float], list[RunConfig]] = {}
    quality_jobs = {}
    for w in worlds:
        if by_world[w].error is not None:
            continue
        file = by_world[w].synthetic["file"]
        for share in s.shares:
            sbp[(w, share)] = [_arm_config(ctx, s, w, values, seed, (1 - share) * T / w, {
                "data.synthetic": file, "data.synthetic_share": share, "data.synthetic_schedule": "once"})
                for seed in s.seeds]
        q = QualityJob(synthetic=file, store=by_world[w].store, sample=s.quality_sample, alpha=s.pairs.alpha,
                       encoder=s.pairs.embed.model if s.quality_encoder else None, device=ctx.cfg.base.train.device)
        quality_jobs[w] = Job(f"{__name__}:quality_job", q, ctx.artifact("sbp-quality", q))
        records = [json.loads(line) for line in Path(file).read_text(encoding="utf-8").splitlines()[: s.shown_samples]]
        by_world[w].samples = [{"seed": r["seed"], "seed_text": r.get("seed_text", ""), "text": r["text"]}
                               for r in records]
    ctx.say(f"sbp: {sum(len(v) for v in sbp.values())} SBP runs")
    done = iter(ctx.run_jobs([c for k in sbp for c in sbp[k]]))
    sbp_jobs = {k: [next(done) for _ in s.seeds] for k in sbp}
    for w, job in zip(quality_jobs, ctx.run(list(quality_jobs.values())), strict=True):
        by_world[w].quality = job.result["rows"] if job.result else []

    # The arms, their intervals and the gains.
    for w in worlds:
        arms = [_arm("repetition", "repetition", 0.0, T / w, rep_jobs[w], s.n_boot)]
        for share in s.shares:
            if (w, share) in sbp_jobs:
                arms.append(_arm(f"sbp {_ratio(share)}", "sbp", share, (1 - share) * T / w, sbp_jobs[(w, share)], s.n_boot))
            arms.append(_arm(f"oracle {_ratio(share)}", "oracle", share, (1 - share) * T / w, oracle_jobs[(w, share)],
                             s.n_boot))
        by_world[w].arms = arms
        for share in s.shares:
            r, m, o = (_finite(next((a for a in arms if a.kind == kind and a.share == sh), None))
                       for kind, sh in (("repetition", 0.0), ("sbp", share), ("oracle", share)))
            if r and m and o:
                g = gain_closed(r, m, o, n_boot=s.n_boot)
                by_world[w].gains.append(GainRow(share, g.value, g.low, g.high))
    if s.tasks:
        _score_tasks(ctx, s, out)
    return out


def _finite(arm: Arm | None) -> list[float]:
    return [v for v in (arm.losses if arm else []) if v is not None and math.isfinite(v)]


def _arm(name: str, kind: str, share: float, epochs: float, jobs: list[JobResult], n_boot: int) -> Arm:
    losses, dirs, errors = _losses(jobs)
    arm = Arm(name, kind, share, epochs, losses, dirs, errors)
    ok = _finite(arm)
    if ok:
        arm.mean, arm.low, arm.high = mean_interval(ok, n_boot=n_boot)
    return arm


def _score_tasks(ctx: Context, s: SBPStageConfig, out: SBPResult) -> None:
    targets = [(arm, arm.run_dirs[0]) for w in out.worlds for arm in w.arms if arm.errors[0] is None and arm.run_dirs[0]]
    jobs = []
    for _, run_dir in targets:
        t = TasksConfig(run_dir=str(run_dir), tasks=list(s.tasks), limit=s.task_limit, device=ctx.cfg.base.train.device,
                        progress=False)
        jobs.append(Job("dataeff.eval.tasks:tasks_job", t, ctx.artifact("downstream", t)))
    ctx.say(f"sbp: downstream tasks of {len(jobs)} runs")
    for (arm, _), job in zip(targets, ctx.run(jobs), strict=True):
        arm.tasks = (job.result or {}).get("tasks", {})


# ---------------------------------------------------------------------------------------------------------
# the report


def _mean_cell(arm: Arm | None) -> str:
    if arm is None or arm.mean is None:
        return MISSING
    return f"{loss(arm.mean)} {interval((arm.low, arm.high))}" if len(_finite(arm)) > 1 else loss(arm.mean)


def _share_cell(v: dict[str, Any] | None) -> str:
    if not v:
        return MISSING
    low, high = v["ci95"]
    return f"{100 * v['share']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] of {v['total']}"


def _gain_figure(r: SBPResult) -> Fig:
    fig, _ = new_figure(11, 4.2)
    fig.clear()
    ax_loss, ax_gain = fig.subplots(1, 2)
    for ax in (ax_loss, ax_gain):
        ax.grid(True, which="major", alpha=0.3)
    worlds = [w.world for w in r.worlds]
    kinds = [("repetition", 0.0)] + [(k, sh) for sh in r.shares for k in ("sbp", "oracle")]
    for (kind, share), color in zip(kinds, colors(len(kinds)), strict=True):
        arms = [next((a for a in w.arms if a.kind == kind and a.share == share), None) for w in r.worlds]
        xs = [x for x, a in zip(worlds, arms, strict=True) if a is not None and a.mean is not None]
        ys = [a.mean for a in arms if a is not None and a.mean is not None]
        if xs:
            err = [[a.mean - a.low for a in arms if a and a.mean is not None], [a.high - a.mean for a in arms if a and a.mean is not None]]
            label = "repetition" if kind == "repetition" else f"{kind} {_ratio(share)}"
            ax_loss.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=color, label=label,
                             linestyle="-" if kind != "oracle" else "--")
    ax_loss.set_xscale("log")
    ax_loss.set_xlabel("world (unique real tokens)")
    ax_loss.set_ylabel("held-out loss (nats/token)")
    ax_loss.legend(fontsize="small")
    for share, color in zip(r.shares, colors(len(r.shares)), strict=True):
        rows = [(w.world, g) for w in r.worlds for g in w.gains if g.share == share and g.value is not None]
        if rows:
            xs, gs = [x for x, _ in rows], [g for _, g in rows]
            ax_gain.plot(xs, [g.value for g in gs], marker="o", color=color, label=f"SBP {_ratio(share)}")
            for x, g in rows:
                if g.low is not None and g.high is not None:
                    ax_gain.vlines(x, g.low, g.high, color=color, alpha=0.6)
    ax_gain.axhline(0.0, color="k", linewidth=0.8)
    ax_gain.axhline(1.0, color="k", linewidth=0.8, linestyle=":")
    ax_gain.set_xscale("log")
    ax_gain.set_xlabel("world (unique real tokens)")
    ax_gain.set_ylabel("gain closed")
    ax_gain.legend(fontsize="small")
    return Fig("sbp_gain", "Left: held-out loss of the three arms by world size (bars: bootstrap 95% over seeds). "
               "Right: gain closed (L_rep − L_sbp)/(L_rep − L_oracle); 0 = no better than repetition, 1 = as good as "
               "fresh real data. Bars: bootstrap 95% over seeds (omitted where unbounded).", png(fig))


def _section(results: Any, root: Path) -> list[Block]:
    r: SBPResult | None = results.stages.get("sbp")
    if r is None:
        return []
    blocks: list[Block] = [Heading("Synthetic Bootstrapped Pretraining"), Para(
        f"Every arm is a {r.size} model trained on {count(r.training_tokens)} tokens ({len(r.seeds)} seeds; the tuned "
        f"{', '.join(f'{k}={v}' for k, v in r.values.items()) or 'defaults'}). Repetition repeats the world; SBP adds "
        "synthetic documents, each seen once, at a share of the training tokens (ratio synthetic:real), the world "
        "repeated to fill the rest; the oracle adds fresh real documents of the same corpus instead. The synthesizer "
        "is the repetition arm's first seed continued on the world's nearest-neighbour pairs as p(d2 | d1). Losses "
        f"are on the corpus's held-out split. For reference: {_PAPER}.")]
    shares = r.shares
    head = ["world", "docs", "repetition", *(f"{kind} {_ratio(sh)}" for sh in shares for kind in ("SBP", "oracle"))]
    rows: list[list[str | Cell]] = []
    for w in r.worlds:
        cells: list[str | Cell] = [count(w.world), str(w.docs),
                                   _mean_cell(next((a for a in w.arms if a.kind == "repetition"), None))]
        for sh in shares:
            for kind in ("sbp", "oracle"):
                arm = next((a for a in w.arms if a.kind == kind and a.share == sh), None)
                cells.append(Cell(_mean_cell(arm), w.error or "") if arm is None and kind == "sbp" else _mean_cell(arm))
        rows.append(cells)
    blocks += [Heading("Held-out loss per world size", 3), Para("Mean over seeds [bootstrap 95% interval]."),
               Table(head, rows)]
    gain_rows: list[list[str | Cell]] = []
    for w in r.worlds:
        cells = [count(w.world)]
        for sh in shares:
            g = next((g for g in w.gains if g.share == sh), None)
            if g is None:
                cells.append(Cell(MISSING, w.error or "an arm failed"))
            elif g.value is None:
                cells.append(Cell(MISSING, "the oracle is not better than repetition"))
            else:
                bounds = f"[{_pct(g.low)}, {_pct(g.high)}]" if g.low is not None else "[unbounded]"
                cells.append(f"{_pct(g.value)} {bounds}")
        gain_rows.append(cells)
    notes = []
    for sh in shares:
        at = r.threshold(sh)
        notes.append(f"SBP {_ratio(sh)}: " + (f"the gain interval lies above 0 from {count(at)} world tokens on (the "
                                              "critical threshold at this scale)" if at is not None else
                                              "no world size here has a gain interval above 0: below the critical "
                                              "threshold, or no gain at this scale"))
    blocks += [Heading("Gain closed", 3), Table(["world", *(f"SBP {_ratio(sh)}" for sh in shares)], gain_rows),
               Bullets(notes), _gain_figure(r)]
    pair_rows: list[list[str | Cell]] = []
    for w in r.worlds:
        p = w.pairs
        if not p:
            pair_rows.append([count(w.world), Cell(MISSING, w.error or ""), "", "", "", "", ""])
            continue
        q = p.get("pair_similarity", {}).get("quantiles", {})
        dups = p.get("near_duplicates", {})
        pair_rows.append([count(w.world), f"{p['n_pairable']} of {p['n_docs']}", str(p["n_docs_with_pair"]),
                          str(p["n_pairs"]), str(p["n_mutual_pairs"]),
                          f"{dups.get('similarity', 0)} / {dups.get('text', 0)}",
                          f"{q.get('p50', MISSING)} [{q.get('p05', MISSING)}, {q.get('p95', MISSING)}]"])
    k, alpha = (r.worlds[0].pairs.get("k"), r.worlds[0].pairs.get("alpha")) if r.worlds and r.worlds[0].pairs else ("", "")
    blocks += [Heading("Pairs", 3), Para(f"Top-{k} neighbours by embedding cosine, kept above α={alpha}; "
                                         "near-duplicates dropped by similarity / by text Jaccard."),
               Table(["world", "pairable", "with a pair", "pairs", "mutual", "near-duplicates", "pair similarity p50 [p5, p95]"],
                     pair_rows)]
    syn_rows: list[list[str | Cell]] = []
    for w in r.worlds:
        sy = w.synthetic
        syn_rows.append([count(w.world), Cell(loss(w.synthesizer_loss), shown_path(root, w.synthesizer or "")),
                         str(sy.get("documents", MISSING)), count(sy["tokens"]) if "tokens" in sy else MISSING,
                         str(sy.get("seeds", MISSING)), str(sy.get("empty", MISSING)),
                         f"{sy.get('exact', MISSING)} / {sy.get('near', MISSING)} / {sy.get('world', MISSING)}"])
    blocks += [Heading("Synthesizer and synthetic corpus", 3),
               Para("Synthesizer loss: held-out p(d2 | d1) on pairs it did not train on (nats per d2 token). Dropped: "
                    "exact / near duplicates within the synthetic set / copies of world documents."),
               Table(["world", "synthesizer loss", "documents", "tokens", "seeds", "empty", "dropped"], syn_rows)]
    q_rows: list[list[str | Cell]] = []
    for w in r.worlds:
        for row in w.quality:
            notes_ = row.get("notes", {})
            q_rows.append([count(w.world), f"{row['name']} ({row['kind']})", f"{row['sampled']} of {row['docs']}",
                           *(Cell(_share_cell(row.get(key)), notes_.get(key, "")) for key in
                             ("repetition", "duplicates", "reference_copies", "pair_copying", "pair_irrelevance"))])
    if q_rows:
        blocks += [Heading("Quality of the synthetic text", 3),
                   Para("docs/synthetic_quality.md defines the metrics; the world is the real reference row "
                        "(the SBP paper: 4.3% / 0.8% / 25.6% / 0.1% synthetic repetition / duplicates / irrelevance / "
                        "copying at 200B, 1.8% / 0.7% real). Non-factuality needs an LLM judge: not measured."),
                   Table(["world", "corpus", "sampled", "repetition", "duplicates", "world copies", "pair-copying",
                          "pair-irrelevance"], q_rows)]
    shown = [f"world {count(w.world)}, seed {x['seed']}: «{_clip(x['seed_text'])}» → «{_clip(x['text'])}»"
             for w in r.worlds for x in w.samples]
    if shown:
        blocks += [Heading("Sample (seed, synthetic) pairs", 3), Bullets(shown)]
    tasks = sorted({t for w in r.worlds for a in w.arms for t in a.tasks})
    if tasks:
        t_rows: list[list[str | Cell]] = []
        for w in r.worlds:
            for a in w.arms:
                if a.tasks:
                    t_rows.append([count(w.world), a.name, *(_acc(a.tasks.get(t)) for t in tasks)])
        blocks += [Heading("Downstream accuracy (first seed)", 3), Table(["world", "arm", *tasks], t_rows)]
    return blocks


def _acc(r: dict[str, Any] | None) -> str:
    if not r or not finite(r.get("acc")):
        return MISSING
    return f"{100 * r['acc']:.1f}" + (f" ± {100 * r['acc_stderr']:.1f}" if finite(r.get("acc_stderr")) else "")


def _clip(text: str, n: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + " …"


STAGE = Stage("sbp", config=lambda cfg: cfg.sbp, enabled=lambda s: bool(s.worlds), result=SBPResult, run=_run,
              section=_section, check=_check)
