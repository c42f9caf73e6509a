"""Stage ``cpt``: synthetic continued pretraining, the EntiGraph paper's experiment at the world's scale.

A base model (the tuning stage's best run at one size, pretrained on the world's corpus, or any dataeff run
or Hugging Face Llama/Qwen3 checkpoint) is continued on the QuALITY articles (raw CPT) and on synthetic
corpora made from them (rephrase and EntiGraph), each synthetic corpus subsampled to several token counts.
Every model is asked the QuALITY questions closed-book (answer log-likelihood, optionally chain-of-thought
generation); accuracy against synthetic tokens is fitted by the mixture-of-exponentials law
(:mod:`dataeff.synth.expfit`) with its bootstrap band, K seeds at the largest EntiGraph count form a CPT
ensemble, open-book retrieval gives the RAG reference, and the random-graph model
(:mod:`dataeff.synth.theory`) draws the curve the law comes from.

The synthetic corpora are JSONL files (field ``text``): given by path, or, with ``generate``, made here by
``dataeff entigraph`` / ``dataeff rephrase`` jobs on the articles through the generator endpoint (a vLLM or
hosted API, or the model ``serve`` names behind ``dataeff serve`` while they run). All training goes through
``dataeff cpt``'s run configs (:mod:`dataeff.experiment.cpt`), so every CPT run is an ordinary run in
``<root>/runs``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch

from dataeff.config import from_dict, option, section, to_dict
from dataeff.data.config import DataConfig
from dataeff.data.corpora import data_root, default_tokenizer_kind, file_sha256
from dataeff.data.tokenizer import Tokenizer, resolve_kind
from dataeff.errors import DataeffError
from dataeff.eval.ensemble import EnsembleSpec, load_ensemble, save_ensemble
from dataeff.eval.quality import QAItem, read_articles, read_quality, split_items
from dataeff.eval.tasks import QUALITY_FILE, evaluate_qa, log_prob_fn, subset
from dataeff.experiment import executor
from dataeff.experiment.cpt import CPTConfig, run_configs
from dataeff.experiment.executor import Job
from dataeff.experiment.stage import Context, Failure, Stage, StageResult
from dataeff.fsutil import atomic_write_text
from dataeff.generate.llm import LLMConfig
from dataeff.generate.qa import QAGenConfig
from dataeff.generate.serve import ServeConfig
from dataeff.generate.served import serving
from dataeff.model.config import ModelConfig
from dataeff.model.hf import from_hf
from dataeff.report.blocks import Block, Fig, Heading, Para, Table, count
from dataeff.report.plots import colors, new_figure, png
from dataeff.synth.entigraph import EntiGraphConfig
from dataeff.synth.expfit import PAPER_LAW, PAPER_LAW_SOURCE, fit_exponentials
from dataeff.synth.rephrase import RephraseConfig
from dataeff.synth.retrieval import OpenBookConfig
from dataeff.synth.theory import TheoryConfig, run_theory
from dataeff.train.config import OptimConfig, RunConfig, TrainConfig
from dataeff.train.dist import pick_device
from dataeff.train.rundir import load_model, status

KINDS = ("rephrase", "entigraph")


@dataclass
class CPTStageConfig:
    token_counts: list[int] = option([], "synthetic tokens each synthetic corpus is subsampled to, one CPT run each "
                                         "(at least 3 for a scaling curve; empty: the stage is off)")
    base: str = option("tuned", "the model continued: tuned (the tuning stage's best run at `size`, pretrained on "
                                "the world), or a dataeff run directory or Hugging Face Llama/Qwen3 checkpoint")
    size: str | None = option(None, "base=tuned: the size (default: the largest)")
    recipe: str | None = option(None, "base=tuned: the recipe (default: the first)")
    articles: str | None = option(None, "the QuALITY file (default: quality_leval_subset/quality.jsonl in "
                                        "DATAEFF_DATA_DIR); its articles are the raw CPT corpus")
    rephrase: str | None = option(None, "the rephrase corpus (JSONL, field text) made from the articles (null "
                                        "with generate: made here)")
    entigraph: str | None = option(None, "the EntiGraph corpus (JSONL, field text) made from the articles (null "
                                         "with generate: made here)")
    generate: bool = option(False, "make the corpora not given by path: dataeff entigraph and dataeff rephrase on "
                                   "the articles, through the generator endpoint")
    serve: str | None = option(None, "generate: serve this model with `dataeff serve` for the generation (base: the "
                                     "base model; a run, ensemble.json or HF directory; test); null: use "
                                     "generator.base_url as it is (vLLM, a hosted API)")
    serve_port: int = option(8765, "generate with serve: the server's port (fixed, so a rerun's generation jobs are "
                                   "the same jobs and resume)", min=1, max=65535)
    generator: LLMConfig = section(LLMConfig, "generate: the generation client (endpoint, model, limits, budget); "
                                              "its cache defaults to ROOT/cpt_llm_cache.sqlite")
    entigraph_settings: dict[str, Any] = option({}, "generate: further EntiGraphConfig fields (split_words, "
                                                    "triples, max_entities, ...)")
    rephrase_settings: dict[str, Any] = option({}, "generate: further RephraseConfig fields (styles, samples, "
                                                   "chunk_words, ...)")
    text_field: str = option("text", "the text field of the synthetic corpora")
    subsample_seed: int = option(0, "seed of the subsamples (one seed: each count's documents hold the smaller's)")
    epochs: float = option(2.0, "epochs over each synthetic subsample (the paper: 2)", above=0.0)
    raw_epochs: float = option(4.0, "epochs over the raw articles (the paper's tuned raw CPT: 4)", above=0.0)
    lr: float = option(5e-6, "peak learning rate (the paper's for an 8B model; a small model needs far more)", min=0.0)
    warmup: float = option(0.05, "warmup fraction, then cosine decay", min=0.0, max=1.0)
    weight_decay: float = option(0.01, "weight decay", min=0.0)
    replay: str | None = option("world", "the replayed general corpus: world (the pipeline's base.data.corpus), a "
                                         "named corpus or a file, or null for none")
    replay_rate: float = option(0.1, "share of sequences replaced by replay", above=0.0, below=1.0)
    replay_tokens: int | None = option(None, "tokens read from the replay corpus at most", min=1)
    seq_len: int | None = option(None, "context of the CPT runs (default: the base's)", min=1)
    seed: int = option(0, "seed of every CPT run (data order, replay coins)", min=0)
    ensemble_seeds: list[int] = option([], "further seeds at the largest EntiGraph count (rephrase's when there is "
                                           "no EntiGraph corpus); with the first they form the CPT ensemble (empty: "
                                           "no ensemble)")
    split: Literal["test", "validation", "all"] = option("test", "QuALITY articles asked about")
    limit: int | None = option(None, "QA questions at most (a seeded random subset)", min=1)
    generation: bool = option(False, "also answer by few-shot chain-of-thought generation (slow; a small model's "
                                     "context may not hold the prompt, which counts as not attempted)")
    n_shots: int = option(1, "generation: worked examples before the question", min=0, max=5)
    max_tokens: int = option(64, "generation: tokens per answer at most", min=1)
    open_book_k: int = option(0, "open book: chunks retrieved per question for the base model (0: no RAG reference)",
                              min=0)
    chunk_words: int = option(200, "open book: words per chunk", min=1)
    fit_terms: int = option(1, "exponential terms of the fitted law (a fit needs 2·terms + 2 distinct token "
                               "counts, the base's 0 included)", min=1)
    theory: TheoryConfig = section(TheoryConfig, "the random-graph model drawn beside the measured curve")


@dataclass
class QAScore:
    acc: float | None = None
    acc_low: float | None = None
    acc_high: float | None = None
    acc_norm: float | None = None  # by log-likelihood per answer byte (long answers are not penalised)
    acc_norm_low: float | None = None
    acc_norm_high: float | None = None
    n: int = 0
    chance: float | None = None
    gen_acc: float | None = None  # generation: unattempted questions count as wrong
    gen_acc_low: float | None = None
    gen_acc_high: float | None = None
    attempt_rate: float | None = None
    error: str | None = None


@dataclass
class CPTPoint:
    corpus: str  # base, raw, rephrase, entigraph, or "<kind> ensemble"
    tokens: int  # tokens of the CPT corpus trained on (synthetic: the subsample; base: 0)
    run_dirs: list[str]
    articles_loss: float | None = None  # held-out loss on the QuALITY articles (for raw CPT: its own data)
    qa: QAScore = field(default_factory=QAScore)
    error: str | None = None


@dataclass
class LawFit:
    corpus: str
    terms: int
    a: float | None = None  # the plateau, accuracy in %
    a_low: float | None = None
    a_high: float | None = None
    b: list[float] = field(default_factory=list)
    r: list[float] = field(default_factory=list)  # per token
    x: list[float] = field(default_factory=list)
    pred: list[float] = field(default_factory=list)
    pred_low: list[float] = field(default_factory=list)
    pred_high: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class TheorySummary:
    V: int
    lam: float
    steps: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    closed: list[float] | None  # None: no closed form for these settings
    plateau: float
    p: float
    inside_fraction: float | None
    figure: str  # theory.png, relative to the pipeline root


@dataclass
class CPTResult(StageResult):
    base: str
    corpora: dict[str, str]  # kind -> path
    corpus_tokens: dict[str, int]  # kind -> tokens with the base's tokenizer
    points: list[CPTPoint] = field(default_factory=list)
    fits: list[LawFit] = field(default_factory=list)
    open_book: dict[str, Any] | None = None
    theory: TheorySummary | None = None
    skipped: list[str] = field(default_factory=list)  # token counts left out, with why

    def headline(self) -> list[str]:
        base = next((p for p in self.points if p.corpus == "base"), None)
        if base is None or base.qa.acc is None:
            return []
        lines = []
        for kind in KINDS:
            best = max((p for p in self.points if p.corpus == kind and p.qa.acc is not None), key=lambda p: p.tokens,
                       default=None)
            if best is not None:
                lines.append(f"cpt: QuALITY closed-book accuracy {_pct(base.qa.acc)} (base) -> {_pct(best.qa.acc)} "
                             f"after {count(best.tokens)} {kind} tokens (chance {_pct(base.qa.chance)})")
        return lines

    def failures(self) -> list[Failure]:
        return [Failure(f"cpt / {p.corpus} / {count(p.tokens)} tokens", {}, p.run_dirs[0] if p.run_dirs else None,
                        p.error) for p in self.points if p.error]


def _pct(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


# ---------------------------------------------------------------------------------------------------------
# the work


def _articles(c: CPTStageConfig) -> Path:
    return Path(c.articles) if c.articles else data_root() / QUALITY_FILE


def _base(ctx: Context, c: CPTStageConfig) -> str:
    if c.base != "tuned":
        return c.base
    recipe = c.recipe or ctx.results["tuning"].recipes[0].name
    run = ctx.tuned(recipe, c.size or ctx.cfg.sizes[-1]).best_run_dir
    if run is None:
        raise DataeffError(f"cpt.base=tuned: recipe {recipe} has no finished run at size {c.size or ctx.cfg.sizes[-1]}")
    return run


def _check(ctx: Context, c: CPTStageConfig) -> None:
    if len(set(c.token_counts)) != len(c.token_counts) or any(n < 1 for n in c.token_counts):
        raise DataeffError(f"cpt.token_counts={c.token_counts}: give distinct positive token counts")
    if not (c.rephrase or c.entigraph or c.generate):
        raise DataeffError("cpt: give cpt.entigraph and/or cpt.rephrase, the synthetic corpora (JSONL) to train on, "
                           "or cpt.generate=true to make them")
    for name, settings, cls in (("entigraph", c.entigraph_settings, EntiGraphConfig),
                                ("rephrase", c.rephrase_settings, RephraseConfig)):
        owned = {"input", "llm", "out"} & set(settings)
        if owned:
            raise DataeffError(f"cpt.{name}_settings: {sorted(owned)} are set by the stage (the articles, the "
                               "generator, the artifact directory)")
        from_dict(cls, {**settings, "input": "quality"}, source=f"cpt.{name}_settings")
    for name in ("rephrase", "entigraph"):
        path = getattr(c, name)
        if path is not None and not Path(path).is_file():
            raise DataeffError(f"cpt.{name}={path}: no such file")
    if not _articles(c).is_file():
        raise DataeffError(f"cpt.articles={_articles(c)}: no such file")
    if c.base == "tuned" and c.size is not None and c.size not in ctx.cfg.sizes:
        raise DataeffError(f"cpt.size={c.size} is not among the pipeline's sizes {ctx.cfg.sizes}")
    kind = resolve_kind(ctx.cfg.base.tokenizer, default_tokenizer_kind(ctx.cfg.base.data))
    if (c.generate and c.entigraph is None and c.serve == "base" and c.base == "tuned" and kind == "word"
            and c.generator.json_mode != "off"):
        # Refused now: guided decoding would refuse every entity call, but only after the tuning has run.
        raise DataeffError("cpt: the served base has a word-level tokenizer, which guided JSON decoding cannot "
                           "use for EntiGraph's entity calls; set base.tokenizer.kind=bpe or "
                           "cpt.generator.json_mode=off")


def _raw_corpus(ctx: Context, articles: Path) -> Path:
    """The articles as a JSONL corpus (one document each), kept under the hash of the file."""
    path = ctx.artifact("cpt_corpus", {"articles": file_sha256(articles)}) / "raw.jsonl"
    if not path.is_file():
        atomic_write_text(path, "".join(json.dumps({"text": a.text.strip()}) + "\n" for a in read_articles(articles)))
    return path


def _corpus_tokens(path: Path, field_name: str, tokenizer: Tokenizer) -> int:
    """Tokens the corpus holds with the base's tokenizer, an end-of-document token each as the store counts."""
    texts = [json.loads(line)[field_name] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sum(len(ids) + 1 for ids in tokenizer.encode_batch([t.strip() for t in texts if t.strip()]))


def _run_section(base: RunConfig) -> RunConfig:
    """The pipeline's base settings a CPT run keeps (batch, device, evaluation), minus what CPT sets itself."""
    t, o = base.train, base.optim
    d = TrainConfig()
    return RunConfig(
        data=DataConfig(cache_dir=base.data.cache_dir),
        model=ModelConfig(dropout=base.model.dropout),
        optim=dataclasses.replace(o, lr=OptimConfig().lr, warmup=OptimConfig().warmup, weight_decay=OptimConfig().weight_decay,
                                  min_lr_ratio=OptimConfig().min_lr_ratio, schedule=OptimConfig().schedule),
        train=dataclasses.replace(t, epochs=d.epochs, init_from=d.init_from, init_seed=d.init_seed, data_seed=d.data_seed,
                                  progress=False))


def _cpt_config(ctx: Context, c: CPTStageConfig, base: str, corpus: Path, raw: Path, tokens: int | None,
                epochs: float, seeds: list[int], field_name: str = "text") -> CPTConfig:
    """A CPT run's config; its held-out split is the raw articles, so its val_loss is their loss."""
    replay = ctx.cfg.base.data.corpus if c.replay == "world" else c.replay
    return CPTConfig(base=base, corpus=str(corpus), text_field=field_name, tokens=tokens,
                     subsample_seed=c.subsample_seed, val=str(raw), epochs=epochs, lr=c.lr, warmup=c.warmup,
                     weight_decay=c.weight_decay, replay=replay, replay_rate=c.replay_rate,
                     replay_tokens=c.replay_tokens, seq_len=c.seq_len, seeds=seeds, run=_run_section(ctx.cfg.base))


def theory_job(cfg: TheoryConfig, out_dir: Path) -> dict[str, Any]:
    """The executor's job of the random-graph model: its figure and numbers in ``out_dir``."""
    result = run_theory(dataclasses.replace(cfg, out=str(out_dir), progress=False))
    sim, closed = result.simulation, result.closed
    return {"V": cfg.V, "lam": cfg.lam, "steps": [int(s) for s in sim.steps], "mean": sim.mean.tolist(),
            "low": sim.low.tolist(), "high": sim.high.tolist(),
            "closed": None if closed.accuracy is None else closed.accuracy.tolist(),
            "plateau": closed.p + closed.C, "p": closed.p,
            "inside_fraction": None if result.agreement is None else result.agreement.inside_fraction,
            "figure": str(result.png_path)}


@dataclass
class QALoglik:
    members: list[str]  # one model (a dataeff run or an HF checkpoint), or an ensemble's runs
    file: str
    split: Literal["test", "validation", "all"]
    limit: int | None
    device: str


def qa_loglik_job(cfg: QALoglik, out_dir: Path) -> dict[str, Any]:
    """QuALITY accuracy by answer log-likelihood of one model or an ensemble, with its bootstrap interval."""
    items = cast(list[QAItem], subset(split_items(read_quality(cfg.file), cfg.split), cfg.limit))
    device = str(pick_device(cfg.device))
    first = Path(cfg.members[0])
    if len(cfg.members) > 1:
        fn = log_prob_fn(load_ensemble(cfg.members, device=device))
    elif (first / "manifest.json").is_file():
        fn = log_prob_fn(load_model(first, device=device))
    else:
        fn = log_prob_fn(from_hf(first).to(device).eval())
    with torch.inference_mode():
        return evaluate_qa(fn, Tokenizer.load(first / "tokenizer.json"), items)


def _generate(ctx: Context, c: CPTStageConfig, base: str, raw: Path, kinds: list[str]) -> dict[str, str | None]:
    """Each kind's generated corpus.jsonl (None if its job failed, the reason in the report), made from the raw
    articles through the generator; with ``serve`` the model is served by `dataeff serve` while they run."""
    llm = dataclasses.replace(c.generator, progress=False,
                              cache=c.generator.cache if c.generator.cache != LLMConfig().cache
                              else str(ctx.root / "cpt_llm_cache.sqlite"))
    served = None
    if c.serve is not None:
        served = base if c.serve == "base" else c.serve
        name = "test" if served == "test" else Path(served).name
        llm = dataclasses.replace(llm, backend="openai", base_url=f"http://127.0.0.1:{c.serve_port}/v1", model=name,
                                  api_key_env="")
    jobs = []
    for kind in kinds:
        cls, fn, settings = ((EntiGraphConfig, "dataeff.synth.entigraph:entigraph_job", c.entigraph_settings)
                             if kind == "entigraph" else
                             (RephraseConfig, "dataeff.synth.rephrase:rephrase_job", c.rephrase_settings))
        job_cfg = from_dict(cls, {**settings, "input": str(raw), "llm": to_dict(llm)}, source=f"cpt.{kind}_settings")
        jobs.append(Job(fn, job_cfg, ctx.artifact(f"cpt_{kind}", job_cfg)))
    pending = [j for j in jobs if status(j.out_dir) != "done"]
    # A failed generation is retried on every run: the client's cache keeps what it had, so it resumes.
    retry = dataclasses.replace(ctx.cfg.executor, retry_failed=True)
    ctx.say(f"cpt: generating {', '.join(kinds)}" + (f" with `dataeff serve {served}`" if served and pending else ""))
    if served is not None and pending:
        with serving(ServeConfig(model=served, port=c.serve_port, device=ctx.cfg.base.train.device)):
            done = executor.run(jobs, retry, progress=ctx.progress)
    else:
        done = executor.run(jobs, retry, progress=ctx.progress)
    out: dict[str, str | None] = {}
    for kind, j, r in zip(kinds, jobs, done, strict=True):
        corpus = j.out_dir / "corpus.jsonl"
        ok = r.result is not None and corpus.is_file() and corpus.stat().st_size > 0
        out[kind] = str(corpus) if ok else None
        if not ok:
            ctx.say(f"cpt: {kind} generation gave no corpus ({r.error or 'no text'})")
    return out


def _qa_jobs(ctx: Context, c: CPTStageConfig, points: list[CPTPoint], articles: Path) -> None:
    """Score every point's model on QuALITY (log-likelihood; generation too when asked), in place."""
    jobs, owners = [], []
    for i, p in enumerate(points):
        if p.error or not p.run_dirs:
            continue
        single = len(p.run_dirs) == 1
        ensemble = None if single else str(ctx.artifact("cpt_ensemble", p.run_dirs) / "ensemble.json")
        if ensemble is not None and not Path(ensemble).is_file():
            save_ensemble(EnsembleSpec(name=f"cpt {p.corpus} x{len(p.run_dirs)}", members=p.run_dirs), ensemble)
        qa = QALoglik(members=p.run_dirs, file=str(articles), split=c.split, limit=c.limit,
                      device=ctx.cfg.base.train.device)
        jobs.append(Job(f"{__name__}:qa_loglik_job", qa, ctx.artifact("cpt_qa", qa)))
        owners.append((i, "loglik"))
        if c.generation:
            llm = LLMConfig(backend="local", model=p.run_dirs[0] if single else str(ensemble), temperature=0.0,
                            max_tokens=c.max_tokens, device=ctx.cfg.base.train.device, progress=False,
                            cache=str(ctx.root / "cpt_llm_cache.sqlite"), max_retries=0, max_error_rate=1.0)
            gen = QAGenConfig(llm=llm, split=c.split, file=str(articles), limit=c.limit, n_shots=c.n_shots)
            jobs.append(Job("dataeff.generate.qa:qa_generation_job", gen, ctx.artifact("cpt_qa_gen", gen)))
            owners.append((i, "generation"))
    for (i, kind), r in zip(owners, ctx.run(jobs), strict=True):
        qa = points[i].qa
        if r.result is None:
            qa.error = r.error
            continue
        if kind == "loglik":
            res = r.result
            qa.acc, (qa.acc_low, qa.acc_high), qa.n, qa.chance = res["acc"], res["acc_ci"], res["n"], res["chance"]
            qa.acc_norm, (qa.acc_norm_low, qa.acc_norm_high) = res["acc_norm"], res["acc_norm_ci"]
        else:
            qa.gen_acc, (qa.gen_acc_low, qa.gen_acc_high) = r.result["acc"], r.result["acc_ci"]
            qa.attempt_rate = r.result["attempt_rate"]


def _fits(c: CPTStageConfig, points: list[CPTPoint]) -> list[LawFit]:
    base = next((p for p in points if p.corpus == "base"), None)
    out = []
    for kind in KINDS:
        pts = sorted((p.tokens, p.qa.acc) for p in points if p.corpus == kind and p.qa.acc is not None)
        if not pts:
            continue
        if base is not None and base.qa.acc is not None:
            pts = [(0, base.qa.acc), *pts]
        fit = LawFit(kind, c.fit_terms)
        x, y = np.array([p[0] for p in pts], dtype=float), 100 * np.array([p[1] for p in pts])
        grid = np.unique(np.concatenate([[0.0], np.geomspace(max(1.0, x[x > 0].min() / 2), x.max() * 10, 60)]))
        try:
            f = fit_exponentials(x, y, c.fit_terms, x_pred=grid, bootstrap=500)
        except DataeffError as e:
            fit.error = str(e)
        else:
            fit.a, fit.a_low, fit.a_high = f.law.a, f.a_low, f.a_high
            fit.b, fit.r = list(f.law.b), list(f.law.r)
            fit.x, fit.pred = grid.tolist(), f.pred.tolist()
            fit.pred_low, fit.pred_high = np.asarray(f.pred_low).tolist(), np.asarray(f.pred_high).tolist()
        out.append(fit)
    return out


def _run(ctx: Context, c: CPTStageConfig) -> CPTResult:
    base = _base(ctx, c)
    articles = _articles(c)
    raw = _raw_corpus(ctx, articles)
    corpora = {"raw": str(raw), **{k: getattr(c, k) for k in KINDS if getattr(c, k)}}
    missing: list[str] = []
    if c.generate and (wanted := [k for k in KINDS if k not in corpora]):
        for kind, path in _generate(ctx, c, base, raw, wanted).items():
            if path is None:
                missing.append(f"{kind}: its generation gave no corpus (see {ctx.root / ('cpt_' + kind)})")
            else:
                corpora[kind] = path
    probe = run_configs(_cpt_config(ctx, c, base, raw, raw, None, c.raw_epochs, [c.seed]))[0]
    assert probe.tokenizer.path is not None
    tokenizer = Tokenizer.load(probe.tokenizer.path)
    sizes = {k: _corpus_tokens(Path(p), "text" if k == "raw" else c.text_field, tokenizer) for k, p in corpora.items()}
    result = CPTResult(base=base, corpora=corpora, corpus_tokens=sizes, skipped=missing)

    plan: list[tuple[CPTPoint, CPTConfig]] = [
        (CPTPoint("raw", sizes["raw"], []), _cpt_config(ctx, c, base, raw, raw, None, c.raw_epochs, [c.seed]))]
    for kind in KINDS:
        if kind not in corpora:
            continue
        for n in sorted(c.token_counts):
            # Whole documents fill a subsample, so one within a document of the corpus's size may not fit.
            if n > 0.98 * sizes[kind]:
                result.skipped.append(f"{kind} at {count(n)} tokens: the corpus holds {count(sizes[kind])}")
                continue
            plan.append((CPTPoint(kind, n, []), _cpt_config(ctx, c, base, Path(corpora[kind]), raw, n, c.epochs,
                                                             [c.seed], c.text_field)))
    kind = next((k for k in ("entigraph", "rephrase") if any(p.corpus == k for p, _ in plan)), None)
    if c.ensemble_seeds and kind is not None:
        largest = max(p.tokens for p, _ in plan if p.corpus == kind)
        seeds = [c.seed, *(s for s in c.ensemble_seeds if s != c.seed)]
        plan.append((CPTPoint(f"{kind} ensemble", largest, []),
                     _cpt_config(ctx, c, base, Path(corpora[kind]), raw, largest, c.epochs, seeds, c.text_field)))
    configs = [run_configs(cfg) for _, cfg in plan]
    ctx.say(f"cpt: {sum(len(x) for x in configs)} CPT runs from {base}")
    flat = ctx.run_jobs([r for x in configs for r in x])
    at = 0
    for (point, _), runs in zip(plan, configs, strict=True):
        done = flat[at : at + len(runs)]
        at += len(runs)
        point.run_dirs = [str(j.run_dir) for j in done]
        failed = next((j for j in done if j.result is None), None)
        if failed is not None:
            point.error = failed.error or "failed"
        else:
            point.articles_loss = float(np.mean([j.result["val_loss"] for j in done if j.result is not None]))
    result.points = [CPTPoint("base", 0, [base]), *(p for p, _ in plan)]
    _qa_jobs(ctx, c, result.points, articles)
    result.fits = _fits(c, result.points)

    extra = []
    if c.open_book_k and Path(base, "manifest.json").is_file():
        ob = OpenBookConfig(model=base, split=c.split, file=str(articles), limit=c.limit, k=c.open_book_k,
                            chunk_words=c.chunk_words, device=ctx.cfg.base.train.device)
        extra.append(("open_book", Job("dataeff.synth.retrieval:open_book_job", ob, ctx.artifact("cpt_open_book", ob))))
    extra.append(("theory", Job(f"{__name__}:theory_job", c.theory, ctx.artifact("cpt_theory", c.theory))))
    for (name, _), r in zip(extra, ctx.run([j for _, j in extra]), strict=True):
        if name == "open_book":
            result.open_book = r.result if r.result is not None else {"error": r.error}
        elif r.result is not None:
            # Kept relative to the root, so the report finds it from any working directory.
            result.theory = TheorySummary(**{**r.result, "figure": os.path.relpath(r.result["figure"], ctx.root)})
    return result


# ---------------------------------------------------------------------------------------------------------
# the report


def _cell(acc: float | None, lo: float | None, hi: float | None) -> str:
    if acc is None:
        return "—"
    return f"{100 * acc:.1f} [{100 * (lo or 0):.1f}, {100 * (hi or 0):.1f}]"


def _curve_figure(r: CPTResult) -> Fig:
    fig, ax = new_figure()
    base = next((p for p in r.points if p.corpus == "base"), None)
    raw = next((p for p in r.points if p.corpus == "raw"), None)
    chance = base.qa.chance if base is not None else None
    xs_all = [p.tokens for p in r.points if p.corpus in KINDS]
    if not xs_all:
        return Fig("cpt_scaling", "No synthetic CPT run finished: nothing to plot.", None)
    for i, (color, kind) in enumerate(zip(colors(len(KINDS)), KINDS, strict=True)):
        pts = sorted((p for p in r.points if p.corpus == kind and p.qa.acc is not None), key=lambda p: p.tokens)
        if not pts:
            continue
        # Kinds share token counts: a small multiplicative dodge keeps their markers apart on the log axis.
        x = [p.tokens * (1 + 0.04 * (i - 0.5)) for p in pts]
        y = [100 * (p.qa.acc or 0) for p in pts]
        err = [[100 * ((p.qa.acc or 0) - (p.qa.acc_low or 0)) for p in pts],
               [100 * ((p.qa.acc_high or 0) - (p.qa.acc or 0)) for p in pts]]
        ax.errorbar(x, y, yerr=err, fmt="o", color=color, capsize=3, label=f"{kind} CPT (95% bootstrap)")
        fit = next((f for f in r.fits if f.corpus == kind and f.a is not None), None)
        if fit is not None:
            fx = np.array(fit.x)
            keep = fx > 0
            ax.plot(fx[keep], np.array(fit.pred)[keep], "-", color=color, linewidth=1,
                    label=f"{kind}: fitted law, plateau {fit.a:.1f}%")
            ax.fill_between(fx[keep], np.array(fit.pred_low)[keep], np.array(fit.pred_high)[keep], color=color,
                            alpha=0.15, linewidth=0)
    ens = next((p for p in r.points if p.corpus.endswith(" ensemble") and p.qa.acc is not None), None)
    if ens is not None:
        ax.plot([ens.tokens], [100 * (ens.qa.acc or 0)], "*", color="black", markersize=12,
                label=f"{ens.corpus.removesuffix(' ensemble')} CPT ensemble ×{len(ens.run_dirs)}")
    for p, style, label in ((base, "--", "base model"), (raw, "-.", "raw CPT")):
        if p is not None and p.qa.acc is not None:
            ax.axhline(100 * p.qa.acc, linestyle=style, color="0.35", linewidth=1, label=f"{label} {100 * p.qa.acc:.1f}%")
    if chance:
        ax.axhline(100 * chance, linestyle=":", color="0.6", linewidth=1, label=f"chance {100 * chance:.0f}%")
    ax.set_xscale("log")
    ax.set_xlabel("synthetic tokens of continued pretraining (log)")
    ax.set_ylabel("QuALITY closed-book accuracy (%)")
    ax.set_title("Closed-book QA accuracy against synthetic CPT tokens", fontsize=10)
    ax.legend(fontsize=7)
    return Fig("cpt_scaling", "Closed-book QuALITY accuracy (answer log-likelihood) of each CPT model against the "
                              "synthetic tokens it was continued on, log axis, with 95% bootstrap intervals over "
                              "questions; lines: the mixture-of-exponentials law fitted to base + synthetic points, "
                              "with its residual-bootstrap 95% band.", png(fig))


def _theory_figure(r: CPTResult, root: Path) -> Fig:
    t = r.theory
    if t is None:
        return Fig("cpt_theory", "The random-graph model did not run.", None)
    path = root / t.figure
    caption = (f"EntiGraph's random-graph model (V={t.V}, λ={t.lam:g}): simulated Acc(M_t) against synthesis steps "
               f"with Monte Carlo intervals and the closed form; it rises as a mixture of exponentials and "
               f"saturates at the reachable fraction {t.plateau:.3f}"
               + (f"; the closed form lies inside the simulation's interval at {100 * t.inside_fraction:.0f}% of "
                  "the steps." if t.inside_fraction is not None else "."))
    return Fig("cpt_theory", caption, path.read_bytes() if path.is_file() else None)


def _section(results: Any, root: Path) -> list[Block]:
    r: CPTResult | None = results.stages.get("cpt")
    if r is None:
        return []
    rows: list[list[Any]] = []
    for p in r.points:
        rows.append([p.corpus, count(p.tokens) if p.tokens else "0", _cell(p.qa.acc, p.qa.acc_low, p.qa.acc_high),
                     _cell(p.qa.acc_norm, p.qa.acc_norm_low, p.qa.acc_norm_high),
                     _cell(p.qa.gen_acc, p.qa.gen_acc_low, p.qa.gen_acc_high) if p.qa.gen_acc is not None else "—",
                     _pct(p.qa.attempt_rate) if p.qa.attempt_rate is not None else "—",
                     f"{p.articles_loss:.3f}" if p.articles_loss is not None else "—",
                     p.error or p.qa.error or ""])
    base = next((p for p in r.points if p.corpus == "base"), None)
    n = base.qa.n if base is not None else 0
    blocks: list[Block] = [
        Heading("Synthetic continued pretraining (QuALITY)"),
        Para(f"Base {r.base}, continued on the raw QuALITY articles ({count(r.corpus_tokens.get('raw', 0))} tokens) "
             "and on subsamples of " + ", ".join(f"{k} ({count(v)} tokens)" for k, v in r.corpus_tokens.items()
                                                 if k != "raw")
             + f". Accuracy on {n} closed-book questions, each prefixed with its article's title and author, in % "
               "with 95% bootstrap intervals over questions; generation accuracy counts unparseable answers as "
               "wrong. The articles' loss is the CPT runs' held-out loss on the articles (raw CPT trained on them)."),
        Table(["corpus", "CPT tokens", "QA acc (loglik)", "QA acc_norm (loglik per byte)", "QA acc (CoT generation)", "attempted", "articles loss",
               "error"], rows),
        _curve_figure(r),
    ]
    for f in r.fits:
        if f.a is None:
            blocks.append(Para(f"{f.corpus}: no law fitted ({f.error})."))
        else:
            terms = " − ".join(f"{b:.2f}·{rr:.6g}^x" for b, rr in zip(f.b, f.r, strict=True))
            blocks.append(Para(f"{f.corpus}: fitted y(x) = {f.a:.2f} − {terms} (x: synthetic tokens, y: accuracy %), "
                               f"plateau a = {f.a:.1f}% [{f.a_low:.1f}, {f.a_high:.1f}] (95% residual bootstrap)."))
    if r.fits:
        blocks.append(Para(f"For comparison, the paper's law for Llama 3 8B has plateau a = {PAPER_LAW.a}% "
                           f"({PAPER_LAW_SOURCE})."))
    if r.open_book:
        ob = r.open_book
        blocks.append(Para("Open book (the base model with retrieved chunks before the question): "
                           + (f"accuracy {_cell(ob.get('acc'), *(ob.get('acc_ci') or [None, None]))}, article "
                              f"recall@{ob.get('k')} {_pct(ob.get('recall_at_k'))}." if "acc" in ob
                              else f"failed: {ob.get('error')}")))
    blocks.append(_theory_figure(r, root))
    if r.skipped:
        blocks.append(Para("Token counts left out: " + "; ".join(r.skipped) + "."))
    chance = base.qa.chance if base is not None else None
    scored = [p for p in r.points if p.qa.acc is not None]

    def containing(lo: str, hi: str) -> int:
        return sum(chance is not None and getattr(p.qa, lo) is not None and getattr(p.qa, lo) <= chance <= getattr(p.qa, hi)
                   for p in scored)

    attempted = [p.qa.attempt_rate for p in scored if p.qa.attempt_rate is not None]
    blocks.append(Para(
        f"Closing note: chance is {_pct(chance)}. The 95% interval of acc contains it for {containing('acc_low', 'acc_high')} "
        f"of {len(scored)} models, that of acc_norm for {containing('acc_norm_low', 'acc_norm_high')}; acc below chance "
        "is the log-likelihood's preference for short options (QuALITY's right answers tend to be long), not "
        "knowledge, which acc_norm removes. "
        + (f"Chain-of-thought generation was attempted on at most {_pct(max(attempted))} of the questions. "
           if attempted else "")
        + "A model this small knows next to nothing of the articles' facts and answers at chance whatever it was "
          "continued on; these figures test the machinery, and the scaling claim is tested only at the paper's "
          "scale (docs/cpt.md)."))
    return blocks


STAGE = Stage("cpt", config=lambda cfg: cfg.cpt, enabled=lambda c: bool(c.token_counts), result=CPTResult, run=_run,
              section=_section, check=_check)
