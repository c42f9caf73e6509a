"""QuALITY answered by generation: the few-shot chain-of-thought prompt of :mod:`dataeff.eval.quality` sent
through the generation client, to a local model (a dataeff run, an ensemble.json, a Hugging Face directory)
or to any OpenAI-compatible endpoint (``dataeff serve``, vLLM).

As in the EntiGraph paper, ``samples`` answers are drawn per question and a *random* parseable one is kept
(not a majority vote); a question none of whose answers parses is not attempted, and never right. Answers
are cached by the client, so a rerun sends only what it lacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from dataeff.config import option, section
from dataeff.data.corpora import data_root
from dataeff.errors import DataeffError
from dataeff.eval.quality import QAItem, cot_messages, parse_answer, read_quality, score_answers, split_items
from dataeff.eval.tasks import QUALITY_FILE, subset
from dataeff.fsutil import atomic_write_json
from dataeff.generate.llm import LLMConfig, Request, run_job
from dataeff.generate.llm.backend import Backend

PROMPT_VERSION = "quality-cot-v1"  # part of every cached answer's key: bump it when the prompt changes


def answer_items(cfg: LLMConfig, items: list[QAItem], *, n_shots: int = 5, samples: int = 1, seed: int = 0,
                 manifest: str | Path | None = None,
                 backend: Backend | None = None) -> tuple[list[int | None], list[str | None], dict[str, Any]]:
    """(the chosen option per question or None, its answer text, the client job's summary); ``backend``
    (default: the one ``cfg`` names) answers the requests."""
    if samples < 1:
        raise DataeffError(f"quality: samples={samples} must be at least 1")
    requests = [Request(cot_messages(it, n_shots), sample_index=s, prompt_version=PROMPT_VERSION)
                for it in items for s in range(samples)]
    job = run_job(cfg, requests, manifest=manifest, backend=backend)
    rng = np.random.default_rng(seed)
    chosen: list[int | None] = []
    texts: list[str | None] = []
    for i, it in enumerate(items):
        results = job.results[i * samples : (i + 1) * samples]
        valid = [(parse_answer(r.text, len(it.options)), r.text) for r in results if r.ok]
        valid = [(a, t) for a, t in valid if a is not None]
        pick = valid[int(rng.integers(len(valid)))] if valid else (None, results[0].text)
        chosen.append(pick[0])
        texts.append(pick[1])
    return chosen, texts, job.summary.to_dict()


@dataclass
class QAGenConfig:
    llm: LLMConfig = section(LLMConfig, "the model answering: backend=local with a run, ensemble.json or HF "
                                        "directory, or backend=openai with an endpoint")
    split: Literal["test", "validation", "all"] = option("test", "articles asked about: test (80%), validation "
                                                                 "(the first 20% by title) or all")
    file: str | None = option(None, "the QuALITY file (default: quality_leval_subset/quality.jsonl in "
                                    "DATAEFF_DATA_DIR)")
    limit: int | None = option(None, "at most this many questions (a seeded random subset)", min=1)
    n_shots: int = option(5, "worked examples before the question (our own, outside QuALITY)", min=0, max=5)
    samples: int = option(1, "answers drawn per question; a random parseable one is kept", min=1)
    seed: int = option(0, "seed of the subset and of the choice among parseable answers", min=0)
    out: str | None = option(None, "also write the result (with every question's answer) to this JSON file")


def load_items(cfg: QAGenConfig) -> list[QAItem]:
    path = Path(cfg.file) if cfg.file else data_root() / QUALITY_FILE
    return cast(list[QAItem], subset(split_items(read_quality(path), cfg.split), cfg.limit, cfg.seed))


def qa_generation_job(cfg: QAGenConfig, out_dir: Path) -> dict[str, Any]:
    """The executor's job: accuracy, attempt rate and their intervals; every answer in ``answers.json``."""
    items = load_items(cfg)
    chosen, texts, summary = answer_items(cfg.llm, items, n_shots=cfg.n_shots, samples=cfg.samples, seed=cfg.seed,
                                          manifest=out_dir / "llm_job.json")
    result = {**score_answers(items, chosen), "split": cfg.split, "n_shots": cfg.n_shots, "samples": cfg.samples,
              "llm": summary}
    answers = [{"article": it.article, "question": it.question, "gold": it.gold, "answer": a, "text": t}
               for it, a, t in zip(items, chosen, texts, strict=True)]
    atomic_write_json(out_dir / "answers.json", answers)
    if cfg.out:
        atomic_write_json(cfg.out, {**result, "answers": answers})
    return result
