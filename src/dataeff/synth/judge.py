"""LLM judges through the generation client: non-factuality for ``dataeff quality`` and faithfulness for
rephrasing's fidelity check.

A judge reads (source, text) pairs through a versioned prompt (:mod:`dataeff.synth.prompt`) that asks for a
JSON verdict, validated by the client (with bounded re-asks); an answer that never validates is an
abstention (None), never a guess. Verdicts are cached like every answer, so re-measuring a corpus costs
nothing.

For ``dataeff quality``, ``judge=dataeff.synth.judge:judge`` is the ``module:function`` hook: its endpoint
and model come from the YAML file that ``$DATAEFF_JUDGE`` names (a :class:`JudgeConfig`: ``llm:`` as for
``dataeff llm``, ``prompt``, ``max_source_words``), read once per process::

    DATAEFF_JUDGE=configs/judge_vllm.yaml dataeff quality synthetic=[corpus.jsonl] judge=dataeff.synth.judge:judge
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from dataeff.config import load, option, replace, section
from dataeff.errors import DataeffError
from dataeff.generate.llm import LLMConfig, Request, run_job
from dataeff.synth.prompt import Prompt, load_prompt

JUDGE_ENV = "DATAEFF_JUDGE"
_NO_SOURCE = "(no source given)"


class FactualVerdict(BaseModel):
    verdict: Literal["factual", "non_factual", "unsure"]
    reason: str = ""


class FaithfulVerdict(BaseModel):
    verdict: Literal["faithful", "unfaithful", "unsure"]
    reason: str = ""


@dataclass
class JudgeConfig:
    llm: LLMConfig = section(LLMConfig, "the judge's endpoint and model (the generation client)")
    prompt: str = option("judge_factual_v1", "the judge prompt: a packaged prompt or a file path; fills {source}, {text}")
    max_source_words: int = option(3000, "the source is cut to its first this many words", min=1)
    max_tokens: int = option(256, "completion tokens of a verdict", min=1)


def _cut(text: str, words: int) -> str:
    parts = text.split()
    return text if len(parts) <= words else " ".join(parts[:words]) + " ..."


def verdicts(llm: LLMConfig, prompt: Prompt, schema: type[FactualVerdict] | type[FaithfulVerdict],
             items: Sequence[tuple[str, str]], *, max_source_words: int, max_tokens: int,
             manifest: str | None = None) -> list[str | None]:
    """The judge's verdict on every (source, text) item, in one client job; None where no valid verdict came.
    A job that stopped (budget, error rate, an unreachable or refusing server) is an error, not abstentions."""
    requests = [Request(prompt.messages({"source": _cut(s, max_source_words) if s.strip() else _NO_SOURCE,
                                         "text": t}),
                        schema=schema, prompt_version=prompt.version, params={"max_tokens": max_tokens})
                for s, t in items]
    if not requests:
        return []
    job = run_job(llm, requests, manifest=manifest)
    if job.summary.stop_reason != "done":
        raise DataeffError(f"judge: stopped early ({job.summary.stop_reason}: {job.summary.stop_message}); rerun to "
                           f"continue, the verdicts so far are cached")
    return [r.parsed.verdict if r.ok else None for r in job.results]


@functools.lru_cache(maxsize=1)
def _configured() -> tuple[JudgeConfig, Prompt]:
    path = os.environ.get(JUDGE_ENV)
    if not path:
        raise DataeffError(f"dataeff.synth.judge:judge: set ${JUDGE_ENV} to a YAML file with the judge's llm: "
                           f"section (endpoint, model), e.g. {JUDGE_ENV}=configs/judge.yaml")
    cfg = load(JudgeConfig, path)
    # One request per call: quality shows its own progress bar, a client bar per document would flood it.
    cfg.llm = replace(cfg.llm, progress=False)
    return cfg, load_prompt(cfg.prompt, {"source", "text"}, f"{path}: prompt")


def judge(source: str, text: str) -> bool | None:
    """The ``dataeff quality`` hook: True if the text states something false, False if factual, None to
    abstain (an 'unsure' verdict, or none that validated)."""
    cfg, prompt = _configured()
    [verdict] = verdicts(cfg.llm, prompt, FactualVerdict, [(source, text)],
                         max_source_words=cfg.max_source_words, max_tokens=cfg.max_tokens)
    return {"non_factual": True, "factual": False}.get(verdict) if verdict is not None else None

