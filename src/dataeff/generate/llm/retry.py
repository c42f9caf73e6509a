"""What counts as a failed attempt, which failures are worth another attempt, and how long to wait first.

Retried, up to ``max_retries`` times: 429, 408, 409 and 5xx answers, timeouts (the whole attempt is bounded
by ``timeout``, so a server trickling bytes cannot hold a request for ever), dropped connections, and
responses that are not a chat completion (truncated or malformed JSON). Not retried: other 4xx answers
(a bad request, a missing model, a prompt over the context, a refused key), which would fail the same way
again. The wait before retry ``n`` (from 0) is ``min(backoff_max, backoff_initial · 2^n)`` plus a uniform
jitter in ``[0, backoff_jitter]``, and never less than the server's ``Retry-After`` (capped at
``retry_after_max``).
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import openai
import tenacity

from dataeff.generate.llm.config import LLMConfig

_RETRIED_STATUS = (408, 409, 429)


class MalformedResponse(Exception):
    """A 200 answer whose body is not a chat completion."""


class Refused(Exception):
    """A well-formed answer without text: a refusal, a content filter, a tool call."""


class ContextTooLong(Exception):
    """A prompt that, with its completion, does not fit the model's context (raised by local models)."""


@dataclass(frozen=True)
class Failure:
    kind: str  # "http_429", "http_500", "timeout", "connection", "connect", "malformed", "context", ...
    message: str
    retryable: bool
    retry_after: float | None = None


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds a server asked to wait: ``retry-after-ms``, or ``retry-after`` in seconds or as an HTTP date."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _status_message(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(body.get("message"), str):
            return body["message"]
    return e.message


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = f"HTTP {status}: {_status_message(exc)}"
        retryable = status in _RETRIED_STATUS or status >= 500
        return Failure(f"http_{status}", message, retryable, retry_after(exc.response.headers) if retryable else None)
    if isinstance(exc, openai.APIConnectionError):  # timeouts included
        cause = exc.__cause__
        name = type(cause).__name__ if cause is not None else ""
        detail = (str(cause).strip() or name) if cause is not None else exc.message
        # A connection that never opened (refused, unresolvable, or timed out while connecting; the aiohttp
        # transport reports a refusal as a connect timeout) is told apart from one that failed mid-answer:
        # only the first can mean the server is unreachable.
        if name in ("ConnectError", "ConnectTimeout"):
            return Failure("connect", f"could not connect ({detail})", True)
        if isinstance(exc, openai.APITimeoutError):
            return Failure("timeout", "the attempt timed out", True)
        return Failure("connection", f"connection dropped ({detail})", True)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return Failure("timeout", "the attempt timed out", True)
    if isinstance(exc, MalformedResponse):
        return Failure("malformed", f"malformed response: {exc}", True)
    if isinstance(exc, ContextTooLong):
        return Failure("context", str(exc), False)
    if isinstance(exc, Refused):
        return Failure("refused", str(exc), False)
    return Failure(type(exc).__name__, f"{type(exc).__name__}: {exc}", False)


class _ServerAwareWait(tenacity.wait.wait_base):
    """Exponential backoff with jitter, but never shorter than the server's Retry-After."""

    def __init__(self, cfg: LLMConfig):
        self.backoff = tenacity.wait_exponential_jitter(multiplier=cfg.backoff_initial, max=cfg.backoff_max,
                                                        jitter=cfg.backoff_jitter)
        self.cap = cfg.retry_after_max

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        wait = self.backoff(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome is not None else None
        asked = classify(exc).retry_after if exc is not None else None
        return max(wait, min(asked, self.cap)) if asked is not None else wait


def retrying(cfg: LLMConfig, *, stopped: Callable[[], bool],
             before_sleep: Callable[[tenacity.RetryCallState], Awaitable[None] | None] | None = None,
             sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> tenacity.AsyncRetrying:
    """At most ``max_retries + 1`` attempts of retryable failures; none after ``stopped()`` turns true."""
    return tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(cfg.max_retries + 1) | tenacity.stop_when_event_set(_Flag(stopped)),
        wait=_ServerAwareWait(cfg),
        retry=tenacity.retry_if_exception(lambda e: classify(e).retryable),
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )


class _Flag:
    """A ``threading.Event``-shaped view of a predicate, for ``tenacity.stop_when_event_set``."""

    def __init__(self, predicate: Callable[[], bool]):
        self.predicate = predicate

    def is_set(self) -> bool:
        return self.predicate()
