"""What the LLM-driven producers share on top of the generation client: the context length a server lists
(so prompts that cannot fit are refused before they are paid for), one budget across a producer's several
client jobs, and their counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import openai

from dataeff.config import replace
from dataeff.generate.llm import JobResult, LLMConfig
from dataeff.generate.llm.backend import api_key
from dataeff.generate.llm.sampling import context_error as _context_error


def served_context(llm: LLMConfig) -> int | None:
    """The ``max_model_len`` the server lists for ``llm.model`` (vLLM and ``dataeff serve`` list one), or
    None: another backend, a server that lists none, or one that does not answer (the job itself then
    reports the server as unreachable, after its bounded retries)."""
    if llm.backend != "openai":
        return None
    client = openai.OpenAI(base_url=llm.base_url, api_key=api_key(llm), max_retries=0,
                           timeout=openai.Timeout(llm.connect_timeout))
    try:
        models = client.models.list().data
    except openai.OpenAIError:
        return None
    finally:
        client.close()
    for m in models:
        value = (m.model_extra or {}).get("max_model_len")
        if m.id == llm.model and isinstance(value, int) and value > 0:
            return value
    return None


def context_error(prompt_tokens: int, max_tokens: int, context: int) -> str:
    """Why a request does not fit, with both sizes (the prompt's by the client's estimate)."""
    return f"{_context_error(prompt_tokens, max_tokens, context)} by the client's estimate of the prompt"


def remaining(llm: LLMConfig, jobs: Sequence[JobResult]) -> LLMConfig | None:
    """``llm`` with its budget less what ``jobs`` used, for the producer's next job; None when none is left."""
    tokens = llm.budget_tokens - sum(j.summary.job_tokens for j in jobs) if llm.budget_tokens else 0
    usd = llm.budget_usd - sum(j.summary.job_cost_usd for j in jobs) if llm.budget_usd else 0.0
    if (llm.budget_tokens and tokens <= 0) or (llm.budget_usd and usd <= 0):
        return None
    return replace(llm, budget_tokens=tokens, budget_usd=usd)


def job_counts(jobs: Sequence[JobResult]) -> dict[str, Any]:
    """Requests, cache hits, HTTP attempts, tokens and cost of a producer's jobs together (``tokens`` and
    ``cost_usd`` include the answers earlier runs bought; ``new_tokens`` only this run's)."""
    return {
        "requests": sum(j.summary.unique for j in jobs),
        "cached": sum(j.summary.cached for j in jobs),
        "sent": sum(j.summary.sent for j in jobs),
        "tokens": sum(j.summary.job_tokens for j in jobs),
        "new_tokens": sum(j.summary.prompt_tokens + j.summary.completion_tokens for j in jobs),
        "cost_usd": sum(j.summary.job_cost_usd for j in jobs),
    }
