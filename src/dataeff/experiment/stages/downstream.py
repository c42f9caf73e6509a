"""Stage ``downstream``: zero-shot accuracy of the single model, the ensemble and the students of one size on
the downstream tasks (ARC, PIQA, HellaSwag, BLiMP, LAMBADA). Each model's scoring is an executor job, so under
Ray it runs on the cluster, and its scores are an artifact reused while the model and the settings are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataeff.config import option
from dataeff.eval.tasks import TasksConfig, check_task
from dataeff.experiment.executor import Job
from dataeff.experiment.stage import Context, Stage, StageResult
from dataeff.report.blocks import MISSING, Block, Cell, Heading, Para, Table, finite, sig


@dataclass
class DownstreamStageConfig:
    tasks: list[str] = option([], "downstream tasks for the single model, the ensemble and the students (default: "
                                  "none)")
    limit: int | None = option(500, "items per task at most (a seeded random subset)", min=1)
    size: str | None = option(None, "the size scored (default: the distillation size, else the largest)")


@dataclass
class ScoredModel:
    label: str
    kind: str  # single, ensemble or student
    members: list[str]
    results: dict[str, dict[str, Any]]  # task -> its metrics, item count and chance rate

    def __post_init__(self) -> None:
        for task, r in self.results.items():
            if not isinstance(r.get("n"), int):
                raise ValueError(f"task {task} has no item count 'n'")


@dataclass
class DownstreamResult(StageResult):
    size: str
    tasks: list[str]
    limit: int | None
    models: list[ScoredModel] = field(default_factory=list)


def _check(ctx: Context, ds: DownstreamStageConfig) -> None:
    for name in ds.tasks:
        check_task(name)


def _run(ctx: Context, ds: DownstreamStageConfig) -> DownstreamResult:
    cfg = ctx.cfg
    size = ds.size or cfg.distillation.size or cfg.sizes[-1]
    single = ctx.tuned(cfg.ensembles.recipe, size).best_run_dir
    models: list[tuple[str, str, list[str]]] = [(f"single {size}", "single", [single] if single else [])]
    ens = ctx.results.get("ensembles")
    row = ens.per_size.get(size) if ens is not None else None
    if row is not None and row.ensemble_file is not None:
        models.append((f"ensemble {size} ×{len(row.members)}", "ensemble", row.members))
    distillation = ctx.results.get("distillation")
    for s in distillation.students if distillation is not None else []:
        if s.error is None:
            models.append((f"student: {s.name}", "student", [s.run_dir]))
    models = [m for m in models if m[2]]
    jobs = []
    for _, _, members in models:
        single_run = len(members) == 1
        tasks = TasksConfig(run_dir=members[0] if single_run else "", members=[] if single_run else members,
                            combine=cfg.ensembles.combine, tasks=list(ds.tasks), limit=ds.limit, device=cfg.base.train.device,
                            progress=False)
        jobs.append(Job("dataeff.eval.tasks:tasks_job", tasks, ctx.artifact("downstream", tasks)))
    ctx.say(f"downstream: {len(jobs)} models on {len(ds.tasks)} tasks")
    scored = ctx.run(jobs)
    out = DownstreamResult(size=size, tasks=list(ds.tasks), limit=ds.limit)
    for (label, kind, members), r in zip(models, scored, strict=True):
        out.models.append(ScoredModel(label, kind, members, (r.result or {}).get("tasks", {})))
    return out


def _metric_cell(metric: str, value: Any, stderr: Any) -> str:
    if not finite(value):
        return MISSING
    if metric.startswith("acc"):
        return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if finite(stderr) else "")
    return sig(value) + (f" ± {sig(stderr)}" if finite(stderr) else "")


def _section(results: Any, root: Path) -> list[Block]:
    ds: DownstreamResult | None = results.stages.get("downstream")
    if ds is None:
        return []
    tasks = list(dict.fromkeys([*ds.tasks, *(t for m in ds.models for t in m.results)]))
    # A task's metrics are its numeric (or null) entries; item count, chance and stderrs go elsewhere, and
    # nested breakdowns (BLiMP's per-paradigm accuracies) are too fine for this table.
    columns = [(task, metric) for task in tasks for metric in dict.fromkeys(
        k for m in ds.models for k, v in (m.results.get(task) or {}).items()
        if k not in ("n", "chance") and not k.endswith("_stderr") and (v is None or isinstance(v, int | float)))]
    rows: list[list[str | Cell]] = []
    for m in ds.models:
        cells: list[str | Cell] = []
        for task, metric in columns:
            r = m.results.get(task) or {}
            cells.append(_metric_cell(metric, r.get(metric), r.get(f"{metric}_stderr")))
        rows.append([m.label, m.kind, *cells])
    counts = []
    for task in tasks:
        found = [m.results[task] for m in ds.models if task in m.results]
        n = "/".join(str(v) for v in dict.fromkeys(r["n"] for r in found))
        chance = next((r["chance"] for r in found if finite(r.get("chance"))), None)
        counts.append(f"{task} {n} items" + (f", chance {chance:.1%}" if chance is not None else ""))
    scope = f"at most {ds.limit} items per task (a seeded random subset)" if ds.limit else "every item of each task"
    return [Heading("Downstream tasks"),
            Para(f"Zero-shot log-likelihood scoring on {scope}: {'; '.join(counts)}. Accuracies in % ± standard error; "
                 "acc_norm normalises by the answer's length in bytes, perplexity is per word."),
            Table(["model", "kind", *(f"{task} {metric}" + (" (%)" if metric.startswith("acc") else "") for task, metric in columns)],
                  rows)]


STAGE = Stage("downstream", config=lambda cfg: cfg.downstream, enabled=lambda ds: bool(ds.tasks),
              result=DownstreamResult, run=_run, section=_section, check=_check)
