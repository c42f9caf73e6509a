"""The experiment report: PNG figures, ``report.md`` and one self-contained ``report.html`` from ``results.json``.

It mirrors "Pre-training under infinite compute": loss vs parameters with fitted asymptotes and bootstrap
bands, the data-scaling baseline that turns losses into data-efficiency multipliers, loss vs epochs per weight
decay (why regularisation wins), ensemble scaling and the joint limit, distillation into one model, downstream
accuracy, and the tuned hyperparameters with their local-optimality certificates. The header (verdict, runs)
and the failed runs are the writer's; every other section is its stage's, in the order of ``STAGES``.
"""

from __future__ import annotations

import json
from pathlib import Path

from dataeff.experiment.config import STAGES, Results, read_results
from dataeff.experiment.progress import clock
from dataeff.experiment.stage import Failure
from dataeff.fsutil import atomic_path
from dataeff.report.blocks import (
    MISSING,
    Block,
    Bullets,
    Fig,
    Heading,
    Para,
    Table,
    count,
    knobs_text,
    seconds,
    to_html,
    to_markdown,
)
from dataeff.report.plots import locate, shown_path


def _failure_reason(root: Path, run_dir: str | None) -> str | None:
    d = locate(root, run_dir)
    if d is None or not (d / "FAILED").is_file():
        return None
    try:
        return str(json.loads((d / "FAILED").read_text(encoding="utf-8")).get("reason") or "") or None
    except (OSError, ValueError, AttributeError):
        return None


def _failed_table(failures: list[Failure], root: Path) -> list[list[str]]:
    rows, seen = [], set()
    for f in failures:
        key = f.run_dir or f"{f.context} {f.values}"
        if key in seen:
            continue
        seen.add(key)
        reason = f.error or _failure_reason(root, f.run_dir) or "no loss recorded"
        rows.append([f.context, knobs_text(f.values), shown_path(root, f.run_dir) if f.run_dir else MISSING, reason])
    return rows


def _header(results: Results, n_failed: int) -> list[Block]:
    tuning = results["tuning"]
    n_eval = sum(len(t.evaluations) for t in tuning.tuned)
    sizes = ", ".join(f"{s} ({count(tuning.params[s])})" if s in tuning.params else s for s in tuning.sizes)
    sweep = results.stages.get("overfitting")
    return [
        Heading(f"Report: {results.name}", 1),
        Heading("Verdict"),
        Bullets(results.verdict() or ["no verdict (no recipes)"]),
        Heading("Runs"),
        Bullets([
            f"World: {count(results.world_tokens)} tokens; sizes: {sizes or MISSING}",
            f"Tuning: {n_eval} grid-point evaluations ({len(results.config.seeds)} seed(s) each) over "
            f"{len(tuning.tuned)} tuning problems",
            f"Overfitting sweep: {len(sweep.runs) if sweep is not None else 0} runs",
            f"Failed: {n_failed} (see Failed runs)",
            f"Wall time: {seconds(results.seconds)}"
            + (" (" + ", ".join(f"{k} {clock(v)}" for k, v in results.stage_seconds.items()) + ")"
               if results.stage_seconds else ""),
        ]),
    ]


def write_report(root: str | Path) -> dict[str, Path]:
    """Read ``<root>/results.json`` and write figures, ``report.md`` and ``report.html`` to ``<root>/report/``.

    Returns the written paths by name: each drawn figure's name (``loss_vs_params``, ``overfitting``, ...),
    ``markdown`` and ``html``. A figure without data is skipped and the report says why; a stage that did not
    run has no section.
    """
    root = Path(root)
    results = read_results(root / "results.json")
    sections = [block for stage in STAGES for block in stage.section(results, root)]
    failed = _failed_table([f for s in results.stages.values() if s is not None for f in s.failures()], root)
    blocks = [*_header(results, len(failed)), *sections, Heading("Failed runs"),
              Table(["context", "knobs", "run dir", "reason"], failed) if failed else Para("No run failed.")]

    out = root / "report"
    paths: dict[str, Path] = {}
    figures = [b for b in blocks if isinstance(b, Fig)]
    for fig in figures:
        if fig.png is not None:
            paths[fig.name] = out / f"{fig.name}.png"
            _write(paths[fig.name], fig.png)
    # A figure from an earlier report would otherwise sit next to a report that says it was skipped.
    for stale in out.glob("*.png") if out.is_dir() else []:
        if stale.stem not in paths:
            stale.unlink()
    paths["markdown"], paths["html"] = out / "report.md", out / "report.html"
    _write(paths["markdown"], to_markdown(blocks).encode("utf-8"))
    _write(paths["html"], to_html(f"Report: {results.name}", blocks).encode("utf-8"))
    return paths


def _write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
