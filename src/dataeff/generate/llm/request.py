"""What a job asks for and what it gets back, and the content address of every request.

A :class:`Request` is chat messages plus, optionally, a schema its answer must validate against, a sample
index and a prompt version. Its cache key is the SHA-256 of the canonical JSON of (model, messages, resolved
sampling parameters including the response format, prompt version, sample index): the sample index keeps
intentionally repeated prompts distinct, and the prompt version lets a caller retire answers to a prompt it
rewrote without changing the messages' wording. The API key and the base URL are never part of it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dataeff.errors import DataeffError
from dataeff.generate.llm.config import LLMConfig
from dataeff.generate.llm.schema import Schema, response_format, schema_json

ROLES = ("system", "user", "assistant")
# Per-request sampling overrides a caller may set; everything else comes from the config.
PARAMS = ("temperature", "top_p", "max_tokens", "stop", "seed")
# Chat templates add a few tokens per message and a few to prime the reply; an upper bound on both.
_TEMPLATE_TOKENS_PER_MESSAGE = 8
_TEMPLATE_TOKENS_REPLY = 8


@dataclass
class Request:
    messages: list[dict[str, str]]
    schema: Schema | None = None
    sample_index: int = 0
    prompt_version: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    """The outcome of one request. ``parsed`` is the validated answer when the request had a schema."""

    index: int
    key: str
    ok: bool
    text: str | None = None
    parsed: Any = None
    error: str | None = None
    cached: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 0


def check_request(i: int, req: Request) -> None:
    if not isinstance(req.messages, list) or not req.messages:
        raise DataeffError(f"request {i}: messages must be a non-empty list of {{role, content}}")
    for j, m in enumerate(req.messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataeffError(f"request {i}: message {j} must be {{role: one of {', '.join(ROLES)}, content: text}}, "
                               f"got {m!r}")
    if not isinstance(req.sample_index, int) or req.sample_index < 0:
        raise DataeffError(f"request {i}: sample_index {req.sample_index!r} must be an integer >= 0")
    unknown = set(req.params) - set(PARAMS)
    if unknown:
        raise DataeffError(f"request {i}: unknown params {sorted(unknown)}; valid: {', '.join(PARAMS)}")


def resolve_params(cfg: LLMConfig, req: Request) -> dict[str, Any]:
    """The sampling parameters sent for ``req``: the config's, overridden by the request's."""
    params: dict[str, Any] = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
    if cfg.stop:
        params["stop"] = list(cfg.stop)
    if cfg.seed is not None:
        params["seed"] = cfg.seed + req.sample_index
    params.update(req.params)
    if req.schema is not None:
        fmt = response_format(req.schema, cfg.json_mode)
        if fmt is not None:
            params["response_format"] = fmt
    return params


def request_key(model: str, req: Request, params: Mapping[str, Any]) -> str:
    blob = {
        "model": model,
        "messages": req.messages,
        "params": params,
        "schema": schema_json(req.schema) if req.schema is not None else None,
        "prompt_version": req.prompt_version,
        "sample_index": req.sample_index,
    }
    text = json.dumps(blob, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def estimate_prompt_tokens(messages: Sequence[Mapping[str, str]]) -> int:
    """A typical count, for rate limiting: about four bytes of text per token."""
    return sum(len(m["content"].encode()) // 4 + 4 for m in messages) + 3


def max_prompt_tokens(messages: Sequence[Mapping[str, str]]) -> int:
    """An upper bound, for the budget: byte-level tokenizers never make more tokens than UTF-8 bytes."""
    return sum(len(m["content"].encode()) + _TEMPLATE_TOKENS_PER_MESSAGE for m in messages) + _TEMPLATE_TOKENS_REPLY
