"""Rephrasing (WRAP, Maini et al. 2024; Kimi K2's knowledge rephrasing): faithful rewrites of every source
document in given styles, chunk by chunk, kept only if they pass a fidelity check.

- **Styles** are prompt files (:mod:`dataeff.synth.prompt`): ``easy``, ``medium``, ``hard`` and ``qa`` are
  WRAP's four (``rephrase_STYLE_v1``), in our own wording; any other entry of ``styles`` is a path to a prompt
  of the same shape (it fills ``{chunk}`` and may use ``{context}``).
- **Chunk-wise autoregressive rewriting** (K2): a document longer than ``chunk_words`` words is cut at
  sentence ends into chunks; chunk k is rewritten with the end of the rewrite of chunk k-1 as context, and
  the rewritten chunks are stitched in order. Chunk k of every document goes in one client job (round k),
  so documents run in parallel within the client's limits while each document's chunks run in sequence.
- **Fidelity** (``fidelity.method``): ``embedding`` keeps a rewrite whose every chunk has a cosine similarity
  of at least ``fidelity.threshold`` with its source chunk, in the sentence-transformers model that SBP's
  pairs use (:mod:`dataeff.synth.embed`, each text cut to the model's window); ``judge`` asks an LLM judge
  (the ``judge_faithful_v1`` prompt) and keeps a rewrite only if every chunk is judged faithful; ``off`` keeps
  all. The rejection rate is reported.

Resumable like every client job: a rerun answers finished chunks from the cache and rewrites the outputs
whole and atomically. Outputs in ``out_dir``: ``corpus.jsonl`` (kept rewrites: ``text``, ``seed_text`` (the
source, unless ``keep_source`` is off), ``doc_id``, ``style``, ``sample_index``, ``chunks``, ``fidelity``,
prompt provenance, ``model``), ``rejected.jsonl`` (the same for rewrites that failed the check) and
``manifest.json`` (config, counts, rejection rate).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dataeff.config import option, replace, section, to_dict
from dataeff.data.config import Format
from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_path, atomic_write_json
from dataeff.generate.llm import JobResult, LLMConfig, Request, run_job
from dataeff.generate.llm.request import estimate_prompt_tokens
from dataeff.synth.documents import SourceDocument, chunk_text, read_documents
from dataeff.synth.judge import FaithfulVerdict, verdicts
from dataeff.synth.llmjobs import context_error, job_counts, remaining, served_context
from dataeff.synth.prompt import Prompt, load_prompt

STYLES = ("easy", "medium", "hard", "qa")


@dataclass
class FidelityConfig:
    method: Literal["embedding", "judge", "off"] = option("embedding", "embedding (cosine of source and rewrite), "
                                                                      "judge (an LLM judge), or off (keep every rewrite)")
    threshold: float = option(0.7, "embedding: the lowest cosine a chunk's rewrite may have with its source chunk",
                              min=-1.0, max=1.0)
    encoder: str = option("all-MiniLM-L6-v2", "embedding: the sentence-transformers model (as embed.model)")
    device: str = option("auto", "embedding: auto, cpu, cuda or mps")
    batch_size: int = option(32, "embedding: texts encoded together", min=1)
    judge_prompt: str = option("judge_faithful_v1", "judge: the prompt; fills {source}, {text}")
    judge_model: str = option("", "judge: a model of llm.base_url to judge with ('' = llm.model)")
    judge_max_tokens: int = option(256, "judge: completion tokens of a verdict", min=1)


@dataclass
class RephraseConfig:
    input: str = option("quality", "the source documents: quality (the QuALITY articles of the data directory), a "
                                   "named corpus (its train split), or a .txt/.jsonl/.parquet file or directory")
    input_field: str = option("text", "the text field of .jsonl/.parquet records")
    input_format: Format = option("auto", "the input's file format (auto: from the extension)")
    separator: str = option("auto", "how a .txt input splits into documents (as data.separator)")
    documents: int | None = option(None, "the first this many documents only (null: all)", min=1)
    llm: LLMConfig = section(LLMConfig, "the generation client (endpoint, model, limits, cache, budget)")
    styles: list[str] = option(["medium"], "rewrite styles: easy, medium, hard, qa, or a prompt file path (one "
                                           "rewrite of every document per style and sample)")
    samples: int = option(1, "rewrites of every document per style (their sample index keeps them apart)", min=1)
    chunk_words: int = option(300, "documents longer than this many words are rewritten chunk by chunk", min=1)
    context_words: int = option(200, "words of the previous chunk's rewrite given as context (0: none)", min=0)
    context: int = option(0, "the model's context in tokens, to refuse longer prompts before sending them; 0: the "
                             "max_model_len the server lists, if it lists one", min=0)
    fidelity: FidelityConfig = section(FidelityConfig, "the fidelity check")
    keep_source: bool = option(True, "write the source document as seed_text beside each rewrite (dataeff quality's "
                                     "pair metrics read it)")
    out: str = option("rephrase", "the output directory (corpus.jsonl, rejected.jsonl, manifest.json)")

    def __post_init__(self) -> None:
        if not self.styles:
            raise DataeffError(f"styles: give at least one of {', '.join(STYLES)} or a prompt file")


@dataclass
class _Unit:
    """One rewrite: a document in a style, one sample of it."""

    doc: SourceDocument
    style: str
    prompt: Prompt
    sample: int
    chunks: list[str]
    rewritten: list[str] = field(default_factory=list)
    error: str | None = None
    fidelity: list[float] | None = None
    verdicts: list[str | None] | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and len(self.rewritten) == len(self.chunks)


def _context_text(previous: str, words: int) -> str:
    if not previous or not words:
        return ""
    tail = previous.split()[-words:]
    return "The rewrite of the text so far ends as follows (continue from it, do not repeat it):\n" + " ".join(tail) + "\n\n"


def _style_prompt(style: str) -> Prompt:
    spec = f"rephrase_{style}_v1" if style in STYLES else style
    return load_prompt(spec, {"chunk"}, f"styles[{style}]", optional={"context"})


def _round(cfg: RephraseConfig, llm: LLMConfig, units: list[_Unit], k: int, context: int | None,
           out_dir: Path) -> JobResult | None:
    """Rewrite chunk ``k`` of every unit that has one and whose earlier chunks were rewritten."""
    todo: list[tuple[_Unit, Request]] = []
    for u in units:
        if u.error is not None or len(u.chunks) <= k or len(u.rewritten) != k:
            continue
        previous = u.rewritten[k - 1] if k else ""
        messages = u.prompt.messages({"chunk": u.chunks[k], "context": _context_text(previous, cfg.context_words)})
        prompt_tokens = estimate_prompt_tokens(messages)
        if context is not None and prompt_tokens + llm.max_tokens > context:
            u.error = f"chunk {k}: {context_error(prompt_tokens, llm.max_tokens, context)}; lower chunk_words"
            continue
        todo.append((u, Request(messages, sample_index=u.sample, prompt_version=u.prompt.version)))
    if not todo:
        return None
    job = run_job(llm, [r for _, r in todo], manifest=out_dir / "jobs" / f"round_{k:03d}.manifest.json")
    for (u, _), result in zip(todo, job.results, strict=True):
        if result.ok and result.text and result.text.strip():
            u.rewritten.append(result.text.strip())
        elif result.ok:
            u.error = f"chunk {k}: an empty rewrite"
        elif job.summary.stop_reason == "done":
            u.error = f"chunk {k}: {result.error}"
    return job


def _embedding_fidelity(cfg: FidelityConfig, units: list[_Unit]) -> None:
    from dataeff.synth.embed import load_encoder, model_window, resolve_model

    done = [u for u in units if u.complete]
    if not done:
        return
    ref = resolve_model(cfg.encoder)
    encoder = load_encoder(ref, cfg.device)
    window = model_window(ref)
    sources = encoder.encode([c for u in done for c in u.chunks], window, cfg.batch_size)
    rewrites = encoder.encode([c for u in done for c in u.rewritten], window, cfg.batch_size)
    cosines = np.einsum("ij,ij->i", sources, rewrites)
    start = 0
    for u in done:
        u.fidelity = [round(float(c), 4) for c in cosines[start : start + len(u.chunks)]]
        start += len(u.chunks)


def _judge_fidelity(cfg: RephraseConfig, units: list[_Unit], out_dir: Path) -> None:
    done = [u for u in units if u.complete]
    prompt = load_prompt(cfg.fidelity.judge_prompt, {"source", "text"}, "fidelity.judge_prompt")
    llm = replace(cfg.llm, model=cfg.fidelity.judge_model) if cfg.fidelity.judge_model else cfg.llm
    items = [(c, r) for u in done for c, r in zip(u.chunks, u.rewritten, strict=True)]
    found = verdicts(llm, prompt, FaithfulVerdict, items, max_source_words=cfg.chunk_words * 2,
                     max_tokens=cfg.fidelity.judge_max_tokens, manifest=str(out_dir / "jobs" / "judge.manifest.json"))
    start = 0
    for u in done:
        u.verdicts = found[start : start + len(u.chunks)]
        start += len(u.chunks)


def _kept(cfg: FidelityConfig, u: _Unit) -> bool:
    if cfg.method == "embedding":
        return u.fidelity is not None and min(u.fidelity) >= cfg.threshold
    if cfg.method == "judge":
        return u.verdicts is not None and all(v == "faithful" for v in u.verdicts)
    return True


def rephrase_job(config: RephraseConfig, out_dir: Path) -> dict[str, Any]:
    """Rewrite ``config.input`` into ``out_dir`` (see the module docstring) and return the counts.

    Raises :class:`DataeffError` after writing what it has when a client job stopped early (budget, error
    rate, an unreachable or refusing server): rerun it to continue.
    """
    cfg, out_dir = config, Path(out_dir)
    prompts = {style: _style_prompt(style) for style in dict.fromkeys(cfg.styles)}
    docs = read_documents(cfg.input, text_field=cfg.input_field, format=cfg.input_format, separator=cfg.separator,
                          limit=cfg.documents)
    context = cfg.context or served_context(cfg.llm)
    units = [_Unit(d, style, prompt, s, chunk_text(d.text, cfg.chunk_words) or [d.text])
             for d in docs for style, prompt in prompts.items() for s in range(cfg.samples)]
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs: list[JobResult] = []
    llm: LLMConfig | None = cfg.llm
    stop: str | None = None
    for k in range(max(len(u.chunks) for u in units)):
        job = _round(cfg, llm, units, k, context, out_dir)
        if job is None:
            continue
        jobs.append(job)
        if job.summary.stop_reason != "done":
            stop = f"{job.summary.stop_reason}: {job.summary.stop_message}"
            break
        llm = remaining(cfg.llm, jobs)
        if llm is None:
            stop = "budget: the budget is spent"
            break
    # The embedding check is local, so the rewrites finished before a stop are checked and written; the
    # judge would be one more client job, which a stopped job's next run does.
    if cfg.fidelity.method == "embedding":
        _embedding_fidelity(cfg.fidelity, units)
    elif stop is None and cfg.fidelity.method == "judge":
        _judge_fidelity(cfg, units, out_dir)
    metrics = _write(cfg, out_dir, units, jobs, complete=stop is None)
    if stop is not None:
        raise DataeffError(f"rephrase: stopped early ({stop}); what is finished is cached; rerun to continue")
    return metrics


def _record(cfg: RephraseConfig, u: _Unit) -> dict[str, Any]:
    fidelity: dict[str, Any] = {"method": cfg.fidelity.method}
    if u.fidelity is not None:
        fidelity.update(min=min(u.fidelity), mean=round(float(np.mean(u.fidelity)), 4), chunks=u.fidelity)
    if u.verdicts is not None:
        fidelity.update(verdicts=u.verdicts)
    record: dict[str, Any] = {"text": "\n\n".join(u.rewritten)}
    if cfg.keep_source:
        record["seed_text"] = u.doc.text
    return {**record, "doc_id": u.doc.id, "style": u.style, "sample_index": u.sample, "chunks": len(u.chunks),
            "fidelity": fidelity, **u.prompt.provenance(), "model": cfg.llm.model}


def _write(cfg: RephraseConfig, out_dir: Path, units: list[_Unit], jobs: list[JobResult], complete: bool) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    with atomic_path(out_dir / "corpus.jsonl") as kept_tmp, atomic_path(out_dir / "rejected.jsonl") as rejected_tmp, \
            open(kept_tmp, "w", encoding="utf-8") as kept, open(rejected_tmp, "w", encoding="utf-8") as rejected:
        for u in units:
            if not u.complete:
                counts["failed" if u.error is not None else "unfinished"] += 1
                continue
            if cfg.fidelity.method == "judge" and u.verdicts is None:
                counts["unchecked"] += 1
                continue
            keep = _kept(cfg.fidelity, u)
            counts["kept" if keep else "rejected"] += 1
            (kept if keep else rejected).write(json.dumps(_record(cfg, u), ensure_ascii=False) + "\n")
    checked = counts["kept"] + counts["rejected"]
    scores = [min(u.fidelity) for u in units if u.fidelity is not None]
    metrics = {
        "documents": len({u.doc.id for u in units}),
        "rewrites": len(units),
        "chunks": sum(len(u.chunks) for u in units),
        "kept": counts["kept"],
        "rejected": counts["rejected"],
        "failed": counts["failed"],
        "unfinished": counts["unfinished"],
        "unchecked": counts["unchecked"],
        "rejection_rate": counts["rejected"] / checked if checked else None,
        "fidelity_median": float(np.median(scores)) if scores else None,
        **job_counts(jobs),
        "complete": complete,
    }
    errors = Counter(u.error.split(":", 1)[-1].strip()[:120] for u in units if u.error is not None)
    atomic_write_json(out_dir / "manifest.json", {
        "kind": "dataeff.rephrase", "model": cfg.llm.model, "config": to_dict(cfg), "metrics": metrics,
        "prompts": {u.prompt.name: u.prompt.provenance() for u in units}, "errors": dict(errors.most_common(10)),
    })
    return metrics


def run_rephrase(cfg: RephraseConfig) -> dict[str, Any]:
    """``dataeff rephrase``: :func:`rephrase_job` into ``cfg.out``."""
    return rephrase_job(cfg, Path(cfg.out))
