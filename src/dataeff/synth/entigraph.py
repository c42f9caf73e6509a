"""EntiGraph (Yang et al., ICLR 2025): a small corpus made large by writing about its entities' relations.

Per source document, through the generation client (:mod:`dataeff.generate.llm`):

1. one JSON call (schema :class:`Entities`): a summary and the document's salient entities;
2. relation texts: one call per entity pair (all pairs, in a seeded order) and per triple of a seeded sample
   of ``triples`` triples, each with the document, its entity list and the two or three entities to discuss;
   a document's calls are planned in that order until their estimated tokens (prompt estimate plus
   ``llm.max_tokens``) would pass ``doc_token_budget``.

Both steps are one client job each over every document, so documents run in parallel within the client's
concurrency and rate limits; relation requests are interleaved across documents, so a job stopped by
``llm.budget_*`` leaves every document with some of its relations rather than a few with all. ``llm.budget_*``
bounds both steps together.

Resumable: every answer is in the client's cache the moment it arrives, so a rerun (after a kill, a budget
stop, a failed request) sends only what is missing, and the outputs are rewritten whole and atomically from
the answers, so a rerun never adds duplicates. The prompts are versioned files (:mod:`dataeff.synth.prompt`),
their hash part of every cache key.

Outputs in ``out_dir``:

- ``corpus.jsonl``: one record per text (the summary, then the relation texts of each document, in document
  order), ``{text, kind: summary|pair|triple, doc_id, entities, prompt, prompt_sha256, prompt_version,
  model}``; ``data.synthetic`` and ``dataeff quality`` read it;
- ``documents.jsonl``: one record per document: ``doc_id``, ``status`` (``done``; ``no_entities``: the
  model found none, so no relation calls; ``too_long``: the prompt does not fit the model's context, refused
  with both sizes; ``failed``: the entity call failed, its error kept), its entities, relations planned and
  written, and the error;
- ``manifest.json``: the config, the counts and both client jobs' summaries (each job also keeps its own
  ``entities.manifest.json`` / ``relations.manifest.json``).

A prompt longer than the model's context is refused before it is sent when the context is known
(``context``, or the ``max_model_len`` an OpenAI-compatible server lists, as vLLM and ``dataeff serve`` do),
else by the server; ``split_words`` cuts long documents into sections that fit.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from dataeff.config import option, section, to_dict
from dataeff.data.config import Format
from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_path, atomic_write_json
from dataeff.generate.llm import JobResult, LLMConfig, Request, run_job
from dataeff.generate.llm.request import estimate_prompt_tokens
from dataeff.synth.documents import SourceDocument, read_documents
from dataeff.synth.llmjobs import context_error, job_counts, remaining, served_context
from dataeff.synth.prompt import Prompt, load_prompt

_MAX_ENTITY_CHARS = 200  # a longer "entity" is a sentence the model wrote into the list
_BOUNDED_ENTITY_CHARS = 60  # a bounded schema's longest entity: a long name, not a clause


class Entities(BaseModel):
    # The schema sent says "no other keys", so a guided decoder closes the object after the two fields instead
    # of letting a small model wander into invented ones; validation still ignores extra keys a server adds.
    model_config = ConfigDict(json_schema_extra={"additionalProperties": False})

    summary: str
    entities: list[str]


def bounded_entities(summary_max_chars: int, max_entities: int) -> type[Entities]:
    """:class:`Entities` whose *schema* bounds the answer's length: a summary of at most ``summary_max_chars``,
    at most ``max_entities`` entities (no more are kept) of at most ``_BOUNDED_ENTITY_CHARS`` each. A guided
    decoder then cannot spend ``entity_max_tokens`` inside one string, though the longest bounded answer may
    still need more tokens than that. Validation stays as lenient as :class:`Entities`'s: an endpoint that
    ignores the bounds gets its longer answer cleaned (:func:`clean_entities`), not refused."""
    item = Annotated[str, Field(json_schema_extra={"maxLength": _BOUNDED_ENTITY_CHARS})]
    return create_model("Entities", __base__=Entities,
                        summary=(str, Field(json_schema_extra={"maxLength": summary_max_chars})),
                        entities=(list[item], Field(json_schema_extra={"maxItems": max_entities})))


@dataclass
class EntiGraphConfig:
    input: str = option("quality", "the source documents: quality (the QuALITY articles of the data directory), a "
                                   "named corpus (its train split), or a .txt/.jsonl/.parquet file or directory")
    input_field: str = option("text", "the text field of .jsonl/.parquet records")
    input_format: Format = option("auto", "the input's file format (auto: from the extension)")
    separator: str = option("auto", "how a .txt input splits into documents (as data.separator)")
    documents: int | None = option(None, "the first this many documents only (null: all)", min=1)
    split_words: int = option(0, "cut documents longer than this many words into sections, each its own document "
                                 "(for a model whose context cannot hold a whole document); 0: whole documents", min=0)
    llm: LLMConfig = section(LLMConfig, "the generation client (endpoint, model, limits, cache, budget)")
    entities_prompt: str = option("entigraph_entities_v1", "the entity prompt: a packaged prompt or a file path; "
                                                           "fills {document}")
    pair_prompt: str = option("entigraph_pair_v1", "the pair relation prompt; fills {document}, {entities}, {focus}")
    triple_prompt: str = option("entigraph_triple_v1", "the triple relation prompt; fills {document}, {entities}, {focus}")
    entity_max_tokens: int = option(1024, "completion tokens of the entity call (the relation calls use llm.max_tokens)",
                                    min=1)
    max_entities: int = option(50, "entities kept per document, in the model's order", min=1)
    summary_max_chars: int = option(0, "bound the entity answer's length in its schema, for guided decoding: a "
                                       "summary of at most this many characters, at most max_entities entities "
                                       "of at most 60 characters, so a small model cannot spend "
                                       "entity_max_tokens inside one string (0: no bounds, for endpoints that "
                                       "refuse maxLength/maxItems)", min=0)
    pairs: bool = option(True, "write a relation text for every pair of entities")
    triples: int = option(20, "triples of entities per document, sampled with the seed, with a relation text each",
                          min=0)
    doc_token_budget: int = option(0, "estimated tokens of a document's relation calls at most (0: no limit)", min=0)
    context: int = option(0, "the model's context in tokens, to refuse longer prompts before sending them; 0: the "
                             "max_model_len the server lists, if it lists one", min=0)
    seed: int = option(0, "seed of the pair order and the triple sample", min=0)
    out: str = option("entigraph", "the output directory (corpus.jsonl, documents.jsonl, manifest.json)")


@dataclass
class _Relation:
    kind: Literal["pair", "triple"]
    entities: tuple[str, ...]
    request: Request
    index: int = -1  # in the relation job


@dataclass
class _Doc:
    source: SourceDocument
    status: str = "pending"
    summary: str = ""
    entities: list[str] = field(default_factory=list)
    error: str | None = None
    relations: list[_Relation] = field(default_factory=list)
    over_budget: int = 0  # relation calls the document's token budget left out
    too_long: int = 0  # relation calls whose prompt does not fit the context


def clean_entities(names: list[str], limit: int) -> list[str]:
    """Stripped, non-empty, short names without case-insensitive repeats, the first ``limit`` of them."""
    seen: set[str] = set()
    out = []
    for name in names:
        name = " ".join(name.split())
        if not name or len(name) > _MAX_ENTITY_CHARS or name.casefold() in seen:
            continue
        seen.add(name.casefold())
        out.append(name)
    return out[:limit]


def _fits(messages: list[dict[str, str]], max_tokens: int, context: int | None) -> str | None:
    """None if the request fits the context (or the context is unknown), else why not, with the sizes."""
    if context is None:
        return None
    prompt = estimate_prompt_tokens(messages)
    return context_error(prompt, max_tokens, context) if prompt + max_tokens > context else None


def plan_relations(cfg: EntiGraphConfig, doc: _Doc, pair: Prompt, triple: Prompt, context: int | None) -> None:
    """The document's relation requests: every pair in a seeded order, then a seeded sample of triples, up to
    the document's token budget."""
    rng = random.Random(f"{cfg.seed}:{doc.source.id}")
    groups: list[tuple[Literal["pair", "triple"], tuple[str, ...]]] = []
    if cfg.pairs:
        pairs = list(itertools.combinations(doc.entities, 2))
        rng.shuffle(pairs)
        groups += [("pair", p) for p in pairs]
    all_triples = list(itertools.combinations(doc.entities, 3))
    groups += [("triple", t) for t in rng.sample(all_triples, min(cfg.triples, len(all_triples)))]
    listed = "; ".join(doc.entities)
    spent = 0
    for n, (kind, focus) in enumerate(groups):
        prompt = pair if kind == "pair" else triple
        messages = prompt.messages({"document": doc.source.text, "entities": listed, "focus": "; ".join(focus)})
        if _fits(messages, cfg.llm.max_tokens, context) is not None:
            doc.too_long += 1
            continue
        cost = estimate_prompt_tokens(messages) + cfg.llm.max_tokens
        if cfg.doc_token_budget and spent + cost > cfg.doc_token_budget:
            doc.over_budget = len(groups) - n
            break
        spent += cost
        doc.relations.append(_Relation(kind, focus, Request(messages, prompt_version=prompt.version)))


def _interleave(docs: list[_Doc]) -> list[_Relation]:
    """Relation requests round-robin across documents: the first of each, then the second of each, ..."""
    lists = [d.relations for d in docs]
    return [r for batch in itertools.zip_longest(*lists) for r in batch if r is not None]


def _job_stats(job: JobResult | None) -> dict[str, Any] | None:
    return job.summary.to_dict() if job is not None else None


def entigraph_job(config: EntiGraphConfig, out_dir: Path) -> dict[str, Any]:
    """Run EntiGraph on ``config.input`` into ``out_dir`` (see the module docstring) and return its counts.

    Raises :class:`DataeffError` after writing what it has when a client job stopped early (budget, error
    rate, an unreachable or refusing server): rerun it to continue.
    """
    cfg, out_dir = config, Path(out_dir)
    entities_prompt = load_prompt(cfg.entities_prompt, {"document"}, "entities_prompt")
    pair = load_prompt(cfg.pair_prompt, {"document", "entities", "focus"}, "pair_prompt")
    triple = load_prompt(cfg.triple_prompt, {"document", "entities", "focus"}, "triple_prompt")
    sources = read_documents(cfg.input, text_field=cfg.input_field, format=cfg.input_format, separator=cfg.separator,
                             split_words=cfg.split_words, limit=cfg.documents)
    context = cfg.context or served_context(cfg.llm)
    docs = [_Doc(s) for s in sources]
    out_dir.mkdir(parents=True, exist_ok=True)

    schema = bounded_entities(cfg.summary_max_chars, cfg.max_entities) if cfg.summary_max_chars else Entities
    asked: list[tuple[_Doc, Request]] = []
    for doc in docs:
        messages = entities_prompt.messages({"document": doc.source.text})
        refusal = _fits(messages, cfg.entity_max_tokens, context)
        if refusal is not None:
            doc.status, doc.error = "too_long", f"the entity prompt: {refusal}"
            continue
        asked.append((doc, Request(messages, schema=schema, prompt_version=entities_prompt.version,
                                   params={"max_tokens": cfg.entity_max_tokens})))
    first = run_job(cfg.llm, [r for _, r in asked], manifest=out_dir / "entities.manifest.json") if asked else None
    for (doc, _), result in zip(asked, first.results if first else [], strict=True):
        if not result.ok:
            # Refused at its first attempt (a 400 is not retried): the server counted more tokens than the
            # client's estimate. A re-ask that outgrew the context is a failed call, not a long document.
            refused = result.attempts == 1 and result.error is not None and "context" in result.error.lower()
            doc.status, doc.error = ("too_long" if refused else "failed"), result.error
            continue
        doc.summary = result.parsed.summary.strip()
        doc.entities = clean_entities(result.parsed.entities, cfg.max_entities)
        doc.status = "done" if doc.entities else "no_entities"
        if doc.entities:
            plan_relations(cfg, doc, pair, triple, context)

    relations = _interleave(docs)
    for i, r in enumerate(relations):
        r.index = i
    second, stopped = None, first is not None and first.summary.stop_reason != "done"
    if relations and not stopped:
        llm = remaining(cfg.llm, [first]) if first is not None else cfg.llm
        if llm is None:
            stopped = True
        else:
            second = run_job(llm, [r.request for r in relations], manifest=out_dir / "relations.manifest.json")
            stopped = second.summary.stop_reason != "done"
    metrics = _write(cfg, out_dir, docs, first, second, [entities_prompt, pair, triple], stopped)
    if stopped:
        job = second or first
        reason = f"{job.summary.stop_reason}: {job.summary.stop_message}" if job else "budget: no budget left after the entity calls"
        raise DataeffError(f"entigraph: stopped early ({reason}); what is finished is in {out_dir}; rerun to continue")
    return metrics


def _write(cfg: EntiGraphConfig, out_dir: Path, docs: list[_Doc], first: JobResult | None, second: JobResult | None,
           prompts: list[Prompt], stopped: bool) -> dict[str, Any]:
    entities_prompt, pair, triple = prompts
    model = cfg.llm.model
    done = second.results if second is not None else []
    kinds: Counter[str] = Counter()
    written: Counter[str] = Counter()
    with atomic_path(out_dir / "corpus.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            if doc.summary:
                f.write(json.dumps({"text": doc.summary, "kind": "summary", "doc_id": doc.source.id,
                                    "entities": doc.entities, **entities_prompt.provenance(), "model": model},
                                   ensure_ascii=False) + "\n")
                kinds["summary"] += 1
            for r in doc.relations:
                result = done[r.index] if r.index < len(done) else None
                if result is None or not result.ok or not result.text or not result.text.strip():
                    continue
                prompt = pair if r.kind == "pair" else triple
                f.write(json.dumps({"text": result.text.strip(), "kind": r.kind, "doc_id": doc.source.id,
                                    "entities": list(r.entities), **prompt.provenance(), "model": model},
                                   ensure_ascii=False) + "\n")
                kinds[r.kind] += 1
                written[doc.source.id] += 1
    failed_relations = sum(1 for r in done if not r.ok)
    with atomic_path(out_dir / "documents.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"doc_id": doc.source.id, "status": doc.status, "words": len(doc.source.text.split()),
                                "entities": doc.entities, "relations_planned": len(doc.relations),
                                "relations_written": written[doc.source.id], "over_budget": doc.over_budget,
                                "too_long": doc.too_long, "error": doc.error}, ensure_ascii=False) + "\n")
    jobs = [j for j in (first, second) if j is not None]
    statuses = Counter(d.status for d in docs)
    metrics = {
        "documents": len(docs),
        "statuses": dict(statuses),
        "entities": sum(len(d.entities) for d in docs),
        "summaries": kinds["summary"],
        "pair_texts": kinds["pair"],
        "triple_texts": kinds["triple"],
        "relation_texts": kinds["pair"] + kinds["triple"],
        "relations_planned": sum(len(d.relations) for d in docs),
        "relations_failed": failed_relations,
        "relations_over_budget": sum(d.over_budget for d in docs),
        "relations_too_long": sum(d.too_long for d in docs),
        **job_counts(jobs),
        "complete": not stopped,
    }
    atomic_write_json(out_dir / "manifest.json", {
        "kind": "dataeff.entigraph", "model": model, "config": to_dict(cfg), "metrics": metrics,
        "prompts": {p.name: p.provenance() for p in prompts},
        "jobs": {"entities": _job_stats(first), "relations": _job_stats(second)},
    })
    return metrics


def run_entigraph(cfg: EntiGraphConfig) -> dict[str, Any]:
    """``dataeff entigraph``: :func:`entigraph_job` into ``cfg.out``."""
    return entigraph_job(cfg, Path(cfg.out))
