"""Stage ``distillation``: students of one size taught by that size's ensemble, at sequence level (a corpus
sampled from the ensemble, mixed into training) and at token level (KL to its predictions), and a chain of
self-distillation from one member; reported as the share of the ensemble's gain each student keeps.

Sampling the teacher is an executor job like any run, so under Ray it runs on the cluster; its corpus is an
artifact named by everything it depends on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from dataeff.config import option
from dataeff.data.tokenizer import Tokenizer
from dataeff.data.tokens import prepare, synthetic_tokens
from dataeff.errors import DataeffError
from dataeff.eval.ensemble import load_ensemble
from dataeff.experiment.executor import Job, JobResult
from dataeff.experiment.stage import Context, Stage, StageResult
from dataeff.fsutil import atomic_write_text
from dataeff.generate.sample import generate
from dataeff.report.blocks import MISSING, Block, Cell, Heading, Para, Table, count, knob, loss
from dataeff.report.plots import shown_path
from dataeff.train.config import RunConfig
from dataeff.train.dist import pick_device

SAMPLES = "samples.jsonl"
_PAPER_RETAINED = 0.83  # Kim et al.: an 8x smaller distilled student keeps 83% of the ensembling gain


@dataclass
class DistillStageConfig:
    size: str | None = option(None, "student (and teacher member) size (default: none, no distillation stage)")
    synthetic_share: float = option(0.75, "sequence-level student: share of its tokens sampled from the ensemble "
                                          "(0: no sequence-level student)", min=0.0, below=1.0)
    sequence_overrides: dict[str, Any] = option({"optim.weight_decay": 0.1},
                                                "knob values of the sequence-level student (the paper: WD 0.1)")
    sample_tokens: int = option(256, "tokens per sampled document at most; past the teacher's context its window "
                                     "slides (dataeff.generate.sample.generate(slide=True))", min=1)
    sample_temperature: float = option(1.0, "sampling temperature of the synthetic corpus", min=0.0)
    sample_batch: int = option(64, "documents sampled together", min=1)
    sample_seed: int = option(0, "sampling seed", min=0)
    kl_weight: float = option(0.5, "token-level and chain students: α of (1-α)·CE + α·T²·KL (0: none)", min=0.0, max=1.0)
    temperature: float = option(1.0, "token-level and chain students: KL temperature", above=0.0)
    teacher_cache: Literal["online", "topk"] = option("topk", "teacher log-probs online or from a top-k cache")
    top_k: int = option(64, "top-k cache: teacher log-probs kept per position", min=1)
    chain: int = option(2, "self-distillation chain length: link 1 distils one member, each next link its "
                           "predecessor (0: none)", min=0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.synthetic_share < 1.0:
            raise ValueError(f"synthetic_share must be in [0, 1), got {self.synthetic_share}")
        if not 0.0 <= self.kl_weight <= 1.0:
            raise ValueError(f"kl_weight must be in [0, 1], got {self.kl_weight}")
        if self.chain < 0:
            raise ValueError(f"chain must be 0 or more, got {self.chain}")


@dataclass
class TeacherSampleConfig:
    """A corpus sampled unconditionally from a teacher: the job that feeds a sequence-level student."""

    members: list[str]  # the teacher's run directories
    combine: Literal["prob", "logit"]
    tokens: int  # sample at least this many tokens (EOS included)
    max_tokens: int  # per document; past the teacher's context its window slides
    temperature: float
    batch: int
    seed: int
    device: str = "auto"
    dtype: str = "auto"
    # Part of the artifact's key: corpora sampled before documents could outgrow the context were cut at it.
    slide: bool = True


def sample_teacher(cfg: TeacherSampleConfig, out_dir: Path) -> dict[str, Any]:
    """Sample the teacher's mixture until ``cfg.tokens`` tokens are in ``out_dir/samples.jsonl`` (written
    atomically, one ``{"text": ...}`` per line)."""
    teacher = load_ensemble(cfg.members, cfg.combine, device=str(pick_device(cfg.device)))
    tokenizer = Tokenizer.load(Path(cfg.members[0]) / "tokenizer.json")
    max_new = cfg.max_tokens if cfg.slide else min(cfg.max_tokens, teacher.seq_len)
    device = teacher.members[0].embed.weight.device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    rows: list[str] = []
    have = 0
    with tqdm(total=cfg.tokens, desc="sampling the teacher", unit="tok") as bar:
        for _ in range(100 * math.ceil(cfg.tokens / (cfg.batch * max_new))):
            if have >= cfg.tokens:
                break
            outs = generate(teacher, [[tokenizer.eos_id]] * cfg.batch, max_new_tokens=max_new,
                            temperature=cfg.temperature, eos_id=tokenizer.eos_id, generator=generator,
                            batch_size=cfg.batch, dtype=cfg.dtype, slide=cfg.slide)  # type: ignore[arg-type]
            for tokens in outs:
                kept = tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_id else tokens
                if kept:
                    rows.append(json.dumps({"text": tokenizer.decode(kept)}, ensure_ascii=False))
                    have += len(kept) + 1
                    bar.update(len(kept) + 1)
    if have < cfg.tokens:
        raise DataeffError(f"distillation: the teacher {cfg.members} sampled {have} of {cfg.tokens} synthetic tokens "
                           "(it mostly ends documents at once); lower distillation.synthetic_share")
    atomic_write_text(out_dir / SAMPLES, "\n".join(rows) + "\n")
    return {"file": str(out_dir / SAMPLES), "documents": len(rows), "tokens": have}


@dataclass
class Student:
    name: str
    kind: str  # sequence, token, self or chain
    details: dict[str, Any]
    loss: float | None  # None: it failed (error says why)
    run_dir: str | None = None
    error: str | None = None
    retained: float | None = None  # (L_single − L_student) / (L_single − L_ensemble); None without a gain


@dataclass
class TeacherInfo:
    K: int
    loss: float
    combine: str
    ensemble_file: str


@dataclass
class DistillationResult(StageResult):
    size: str
    params: int
    single_loss: float | None
    ensemble_loss: float
    teacher: TeacherInfo
    synthetic_file: str | None = None
    students: list[Student] = field(default_factory=list)


def _check(ctx: Context, d: DistillStageConfig) -> None:
    e = ctx.cfg.ensembles
    if e.members < 1 or d.size not in (e.sizes or ctx.cfg.sizes):
        raise DataeffError(f"pipeline.distillation.size={d.size!r} needs an ensemble of that size: set "
                           "ensembles.members and include the size in ensembles.sizes")
    if (d.kl_weight > 0 or d.chain) and d.teacher_cache == "topk" and ctx.cfg.base.train.shuffle != "sequence":
        raise DataeffError("pipeline.distillation.teacher_cache=topk needs base.train.shuffle=sequence; use "
                           "teacher_cache=online with document shuffling")


def _kl_student(ctx: Context, d: DistillStageConfig, values: dict[str, Any], teachers: list[str], seed: int) -> RunConfig:
    assert d.size is not None
    return ctx.run_config(d.size, ctx.world, {
        **values, "distill.teachers": teachers, "distill.weight": d.kl_weight, "distill.temperature": d.temperature,
        "distill.teacher_cache": d.teacher_cache, "distill.top_k": d.top_k, "distill.combine": ctx.cfg.ensembles.combine,
    }, seed, "distillation")


def _synthetic_corpus(ctx: Context, d: DistillStageConfig, members: list[str]) -> Path:
    """Sample the teacher ensemble until the student's mixture has enough synthetic tokens; a job whose output
    is reused while the teacher and the settings are the same."""
    base = ctx.cfg.base
    real = prepare(base.data, base.tokenizer, progress=False).split("train").n_tokens
    # Slack: samples are re-tokenized from text, which need not give back the same number of tokens.
    job_cfg = TeacherSampleConfig(members=members, combine=ctx.cfg.ensembles.combine,
                                  tokens=math.ceil(synthetic_tokens(real, d.synthetic_share) * 1.1),
                                  max_tokens=d.sample_tokens, temperature=d.sample_temperature, batch=d.sample_batch,
                                  seed=d.sample_seed, device=base.train.device, dtype=base.train.dtype)
    out = ctx.artifact("distill", job_cfg)
    [done] = ctx.run([Job(f"{__name__}:sample_teacher", job_cfg, out)])
    if done.result is None:
        raise DataeffError(f"pipeline.distillation: sampling the teacher failed: {done.error}")
    return out / SAMPLES


def _loss_of(job: JobResult) -> float | None:
    return float(job.result["val_loss"]) if job.result is not None else None


def _run(ctx: Context, d: DistillStageConfig) -> DistillationResult:
    assert d.size is not None
    ens = ctx.results["ensembles"]
    row = ens.per_size[d.size]
    if row.ensemble_file is None:
        raise DataeffError(f"pipeline.distillation: the {d.size} ensemble has no teacher: {row.error}")
    base_values = ctx.tuned(ctx.cfg.ensembles.recipe, d.size).best
    seed = ctx.cfg.ensembles.members  # a seed no member used
    synthetic = _synthetic_corpus(ctx, d, row.members) if d.synthetic_share > 0 else None
    students: list[tuple[Student, RunConfig]] = []
    if synthetic is not None:
        values = {**base_values, **d.sequence_overrides, "data.synthetic": str(synthetic),
                  "data.synthetic_share": d.synthetic_share}
        students.append((Student("sequence-level", "sequence", {"synthetic_share": d.synthetic_share,
                                                                **d.sequence_overrides}, None),
                         ctx.run_config(d.size, ctx.world, values, seed, "distillation")))
    if d.kl_weight > 0:
        students.append((Student("token-level", "token", {"kl_weight": d.kl_weight, "temperature": d.temperature}, None),
                         _kl_student(ctx, d, base_values, [row.ensemble_file], seed)))
    ctx.say(f"distillation: {len(students)} students of size {d.size}")
    jobs = ctx.run_jobs([c for _, c in students])
    rows = []
    for (s, _), r in zip(students, jobs, strict=True):
        s.loss, s.run_dir, s.error = _loss_of(r), str(r.run_dir), r.error
        rows.append(s)
    # The chain runs one link at a time: each teacher is the previous link's finished run.
    teacher = row.members[0]
    for step in range(1, d.chain + 1):
        [r] = ctx.run_jobs([_kl_student(ctx, d, base_values, [teacher], ctx.cfg.ensembles.members + step)])
        rows.append(Student("self-distillation" if step == 1 else f"chain step {step}", "self" if step == 1 else "chain",
                            {"step": step, "teacher": teacher, "kl_weight": d.kl_weight, "temperature": d.temperature},
                            _loss_of(r), str(r.run_dir), r.error))
        if r.result is None:
            break
        teacher = str(r.run_dir)
    ensemble_loss = ((row.logit if ens.combine == "logit" else None) or row.prob)[-1]
    single = row.single_loss
    gain = single - ensemble_loss if single is not None else math.nan
    for s in rows:
        s.retained = (single - s.loss) / gain if gain > 0 and s.loss is not None and single is not None else None
    return DistillationResult(size=d.size, params=row.params, single_loss=single, ensemble_loss=ensemble_loss,
                              teacher=TeacherInfo(len(row.members), ensemble_loss, ens.combine, row.ensemble_file),
                              synthetic_file=str(synthetic) if synthetic else None, students=rows)


def _retained(v: float | None) -> str:
    return f"{v:.1%}" if v is not None and math.isfinite(v) else MISSING


def _section(results: Any, root: Path) -> list[Block]:
    d: DistillationResult | None = results.stages.get("distillation")
    if d is None:
        return []
    combine = {"prob": "probability averaging", "logit": "logit averaging"}.get(d.teacher.combine, d.teacher.combine)
    rows: list[list[str | Cell]] = [
        [Cell(f"teacher: {d.teacher.K}-member {d.size} ensemble", shown_path(root, d.teacher.ensemble_file)),
         f"ensemble ({combine})", loss(d.ensemble_loss), _retained(1.0), ""],
        [f"single {d.size} (tuned)", "single", loss(d.single_loss), _retained(0.0), ""],
    ]
    for s in d.students:
        cell = Cell("failed", s.error) if s.error else Cell(loss(s.loss))
        # A chain link's teacher is the previous link's run directory.
        details = ", ".join(f"{k}={shown_path(root, v) if isinstance(v, str) else knob(k, v)}" for k, v in s.details.items())
        rows.append([Cell(s.name, shown_path(root, s.run_dir or "")), s.kind, cell, _retained(s.retained), details])
    return [Heading("Distillation"),
            Para(f"Students of one {d.size} model's size (N={count(d.params)}) trained from the ensemble teacher. "
                 "Retained = (L_single − L_student) / (L_single − L_ensemble): the share of the ensemble's gain over the "
                 "tuned single model that the student keeps (0% is no better than the single model, 100% matches the "
                 f"teacher). The paper's distilled student, 8× smaller than its teacher ensemble, retains {_PAPER_RETAINED:.0%}."),
            Table(["model", "kind", "loss", "retained", "settings"], rows)]


STAGE = Stage("distillation", config=lambda cfg: cfg.distillation, enabled=lambda d: d.size is not None,
              result=DistillationResult, run=_run, section=_section, check=_check)
