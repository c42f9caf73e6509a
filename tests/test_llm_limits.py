"""Token buckets, rate-limit headers, Retry-After and backoff, without a server."""

from __future__ import annotations

import asyncio
import email.utils
import importlib
import time

import openai
import pytest

from dataeff.generate.llm import LLMConfig
from dataeff.generate.llm.limits import RateLimiter, parse_duration
from dataeff.generate.llm.retry import classify, retry_after, retrying

# The HTTP library the installed SDK is built on (httpx, or httpx2 in newer releases).
httpx = importlib.import_module(openai.DefaultAsyncHttpxClient.__mro__[-2].__module__.split(".")[0])


@pytest.mark.parametrize(("text", "seconds"), [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5),
                                               ("0.25", 0.25), ("soon", None), ("5x", None)])
def test_reset_durations(text, seconds):
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_retry_after_in_milliseconds_seconds_and_http_dates():
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after({"retry-after": "2"}) == 2.0
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after({"retry-after": later}) <= 30
    assert retry_after({}) is None and retry_after({"retry-after": "whenever"}) is None


def test_request_bucket_paces_after_its_one_second_burst():
    async def run() -> list[float]:
        limiter = RateLimiter(rpm=600, tpm=0)  # 10/s, a burst of 10
        start, times = time.monotonic(), []
        for _ in range(15):
            await limiter.acquire(1)
            times.append(time.monotonic() - start)
        return times

    times = asyncio.run(run())
    assert times[9] < 0.05 and 0.45 <= times[14] < 0.7


def test_token_bucket_lets_an_oversized_request_through_then_pays_it_back():
    async def run() -> tuple[float, float]:
        limiter = RateLimiter(rpm=0, tpm=6000)  # 100 tokens/s, a bucket of 100
        start = time.monotonic()
        await limiter.acquire(250)  # bigger than the bucket: waits for a full one, then goes into debt
        first = time.monotonic() - start
        await limiter.acquire(10)  # waits until the debt of 150 and these 10 are refilled
        return first, time.monotonic() - start

    first, second = asyncio.run(run())
    assert first < 0.05 and 1.5 <= second < 1.9


def test_headers_set_and_lower_limits_but_never_raise_a_configured_one():
    limiter = RateLimiter(rpm=0, tpm=0)
    asyncio.run(limiter.acquire(100))
    limiter.observe({"x-ratelimit-limit-requests": "120", "x-ratelimit-limit-tokens": "90000",
                     "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}, 100)
    limiter.release(100, 80)
    assert limiter.limits == {"rpm": 120.0, "tpm": 90000.0}
    assert limiter.paused_until - time.monotonic() == pytest.approx(2.0, abs=0.1)
    capped = RateLimiter(rpm=60, tpm=0)
    capped.observe({"x-ratelimit-limit-requests": "10000"})
    assert capped.limits["rpm"] == 60.0


def _status(code: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://x/v1/chat/completions")
    response = httpx.Response(code, headers=headers or {}, request=request, json={"error": {"message": "nope"}})
    return openai.APIStatusError("nope", response=response, body={"error": {"message": "nope"}})


def test_what_is_retried():
    assert classify(_status(429, {"retry-after": "3"})).retry_after == 3.0
    assert [classify(_status(c)).retryable for c in (408, 409, 429, 500, 503)] == [True] * 5
    assert [classify(_status(c)).retryable for c in (400, 401, 403, 404, 422)] == [False] * 5
    assert classify(_status(401)).message == "HTTP 401: nope"
    assert classify(TimeoutError()).retryable and classify(TimeoutError()).kind == "timeout"


def test_backoff_doubles_with_jitter_and_yields_to_retry_after():
    cfg = LLMConfig(backoff_initial=0.1, backoff_max=0.35, backoff_jitter=0.0, max_retries=4, retry_after_max=0.5)
    waits: list[float] = []
    errors = iter([_status(500), _status(500), _status(500), _status(429, {"retry-after": "9"}), _status(500)])

    async def run() -> None:
        async def sleep(seconds: float) -> None:
            waits.append(seconds)

        async for attempt in retrying(cfg, stopped=lambda: False, sleep=sleep):
            with attempt:
                raise next(errors)

    with pytest.raises(openai.APIStatusError):
        asyncio.run(run())
    # 0.1, 0.2, 0.35 (capped), then the server's 9 s capped at retry_after_max; five attempts in all.
    assert waits == pytest.approx([0.1, 0.2, 0.35, 0.5])


def test_no_retry_once_the_job_stops():
    calls = []

    async def run() -> None:
        async for attempt in retrying(LLMConfig(backoff_initial=0.0, backoff_jitter=0.0), stopped=lambda: bool(calls)):
            with attempt:
                calls.append(1)
                raise _status(500)

    with pytest.raises(openai.APIStatusError):
        asyncio.run(run())
    assert calls == [1]
