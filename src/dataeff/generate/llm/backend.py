"""The OpenAI-compatible backend: one attempt of one chat completion through the official ``openai`` SDK.

The SDK's own retries are off (``max_retries=0``): retries, backoff and rate limits are the job's, so every
attempt is counted and bounded in one place. Its HTTP transport is aiohttp by default (``llm.http``), which the
SDK recommends for concurrency and which takes about half the CPU per request of its httpx default. The request goes through the SDK's generic ``post`` (its way
to custom endpoints) with the same JSON body ``chat.completions.create`` would send: the typed method spends
about a millisecond of CPU per request transforming its arguments, most of the client's time at 64 in
flight. The response comes back raw (``AsyncAPIResponse``, as with ``with_raw_response``) for its rate-limit
headers, and is checked by hand rather than trusted: a 200 whose body is not a chat completion (truncated or
malformed JSON, an HTML error page) raises :class:`MalformedResponse`, which is retried. HTTP errors arrive
as the SDK's typed exceptions. The whole attempt is bounded by ``timeout`` seconds, so a server trickling
bytes cannot hold it.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import openai

from dataeff.errors import DataeffError
from dataeff.generate.llm.cache import Answer
from dataeff.generate.llm.config import LLMConfig
from dataeff.generate.llm.request import estimate_prompt_tokens
from dataeff.generate.llm.retry import MalformedResponse, Refused


class Backend(Protocol):
    model_id: str  # the model's identity in cache keys and price lookups

    async def complete(self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]) -> tuple[Answer, Mapping[str, str]]:
        """One attempt: the answer and the response headers, or an exception."""
        ...

    async def aclose(self) -> None: ...


def api_key(cfg: LLMConfig) -> str:
    """The key from the environment variable named in the config; the key itself is never stored anywhere."""
    if not cfg.api_key_env:
        return "EMPTY"  # the SDK insists on a key; servers started without one ignore it
    value = os.environ.get(cfg.api_key_env, "").strip()
    if not value:
        raise DataeffError(f"llm.api_key_env: the environment variable {cfg.api_key_env} is not set; export the API "
                           f"key in it (or set llm.api_key_env='' for a server that needs no key)")
    return value


def openai_client(cfg: LLMConfig) -> openai.AsyncOpenAI:
    if not cfg.base_url.startswith(("http://", "https://")):
        raise DataeffError(f"llm.base_url: {cfg.base_url!r} is not an http(s) URL (e.g. http://localhost:8000/v1)")
    timeout = openai.Timeout(cfg.timeout, connect=cfg.connect_timeout)
    http_client = None
    if cfg.http == "aiohttp":
        try:
            http_client = openai.DefaultAioHttpClient(timeout=timeout)
        except RuntimeError:  # the SDK's answer when the aiohttp extra is not installed
            raise DataeffError("llm.http: aiohttp needs the openai[aiohttp] extra (pip install 'openai[aiohttp]'), "
                               "or set llm.http=httpx") from None
    return openai.AsyncOpenAI(base_url=cfg.base_url, api_key=api_key(cfg), max_retries=0, timeout=timeout,
                              http_client=http_client)


def parse_completion(body: bytes | str, messages: Sequence[Mapping[str, str]]) -> Answer:
    """An :class:`Answer` from a chat-completion body; missing usage is estimated (about 4 bytes a token)."""
    try:
        data = json.loads(body)
    except ValueError as e:
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        raise MalformedResponse(f"not JSON ({e}): {text[:80]!r}") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponse(f"no choices in {json.dumps(data)[:80]}")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise MalformedResponse(f"choice without a message: {json.dumps(choice)[:80]}")
    finish = choice.get("finish_reason")
    content = message.get("content")
    if not isinstance(content, str) or finish == "content_filter":
        reason = message.get("refusal") or f"finish_reason={finish}"
        raise Refused(f"no answer text ({reason})")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    return Answer(
        text=content,
        finish_reason=finish if isinstance(finish, str) else None,
        prompt_tokens=prompt if isinstance(prompt, int) else estimate_prompt_tokens(messages),
        completion_tokens=completion if isinstance(completion, int) else len(content.encode()) // 4 + 1,
    )


class OpenAIBackend:
    def __init__(self, cfg: LLMConfig):
        if not cfg.model:
            raise DataeffError("llm.model: set the model name the server serves (e.g. llm.model=gpt-4o-mini)")
        self.cfg = cfg
        self.model_id = cfg.model
        self.client = openai_client(cfg)

    async def complete(self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]) -> tuple[Answer, Mapping[str, str]]:
        async with asyncio.timeout(self.cfg.timeout):
            raw = await self.client.post("/chat/completions", cast_to=openai.AsyncAPIResponse[object],
                                         body={"model": self.cfg.model, "messages": list(messages), **params})
            body = await raw.read()
        return parse_completion(body, messages), raw.headers

    async def aclose(self) -> None:
        await self.client.close()
