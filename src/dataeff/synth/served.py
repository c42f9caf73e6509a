"""What an OpenAI-compatible server says about the model it serves: its context length, so producers refuse
prompts that cannot fit before paying for them."""

from __future__ import annotations

import openai

from dataeff.generate.llm import LLMConfig
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
