"""Client-side rate limits: token buckets on requests/min and tokens/min, adapted to the server's headers.

Each bucket refills at its rate and holds at most one second of it (at least one request's worth), so a
fresh job does not open with a minute's burst. A request takes one request token and its estimated tokens
before it is sent, and gives back the difference once the real usage is known. A request bigger than a
whole bucket waits for a full bucket and then drives it negative, so it is never starved.

Servers that send OpenAI-style headers (``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-tokens``,
``x-ratelimit-reset-requests: 6m0s``, ...) tighten the buckets: a reported limit lowers the rate to it
(a configured one is never raised); a reported remaining count, less what this client has in flight (which
the server may not have counted yet), lowers the bucket's level to it; nothing remaining pauses sending
until the reported reset. A 429 pauses every sender for its Retry-After.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """Seconds in an OpenAI reset header: ``1s``, ``6m0s``, ``20ms``, ``1h2m``, or a bare number of seconds."""
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT[u] for n, u in parts)


class TokenBucket:
    def __init__(self, per_minute: float, unit: float = 1.0):
        self.unit = unit  # the least capacity: one request, or one request's tokens
        self.rate = 0.0
        self.capacity = 0.0
        self.level = 0.0
        self.stamp = time.monotonic()
        self.set_limit(per_minute)

    @property
    def limited(self) -> bool:
        return self.rate > 0

    def set_limit(self, per_minute: float) -> None:
        self._refill()
        was_limited = self.limited
        self.rate = per_minute / 60.0
        self.capacity = max(self.rate, self.unit) if per_minute > 0 else 0.0
        # A bucket that just got its first limit starts full; the server's remaining count then clamps it.
        self.level = min(self.level, self.capacity) if was_limited else self.capacity

    def _refill(self) -> None:
        now = time.monotonic()
        if self.rate > 0:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, n: float) -> float:
        """Seconds until ``n`` can be taken (0: now)."""
        if not self.limited:
            return 0.0
        self._refill()
        need = min(n, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, n: float) -> None:
        if self.limited:
            self._refill()
            self.level -= n

    def give(self, n: float) -> None:
        if self.limited:
            self._refill()
            self.level = min(self.capacity, self.level + n)

    def clamp(self, remaining: float) -> None:
        if self.limited:
            self._refill()
            self.level = min(self.level, remaining)


class RateLimiter:
    def __init__(self, rpm: float, tpm: float):
        self.configured = (rpm, tpm)
        self.requests = TokenBucket(rpm)
        self.tokens = TokenBucket(tpm, unit=1.0)
        self.paused_until = 0.0
        self.lock = asyncio.Lock()
        self.in_flight = 0
        self.in_flight_tokens = 0

    async def acquire(self, tokens: int) -> None:
        """Wait until one request of about ``tokens`` tokens may be sent, and take its share."""
        self.in_flight += 1
        self.in_flight_tokens += tokens
        if not (self.requests.limited or self.tokens.limited or self.paused_until):
            return
        # One waiter at a time, in arrival order: a large request is not overtaken for ever by small ones.
        async with self.lock:
            while True:
                wait = max(self.paused_until - time.monotonic(), self.requests.wait_time(1),
                           self.tokens.wait_time(tokens))
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            self.requests.take(1)
            self.tokens.take(tokens)

    def release(self, estimated: int, actual: int) -> None:
        """A request acquired with ``estimated`` tokens is done, having used ``actual`` (0 if it failed);
        call it after :meth:`observe` of its response."""
        self.in_flight -= 1
        self.in_flight_tokens -= estimated
        if estimated > actual:
            self.tokens.give(estimated - actual)
        else:
            self.tokens.take(actual - estimated)

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    def observe(self, headers: Mapping[str, str], tokens: int = 0) -> None:
        """Adapt to the rate-limit headers, where the server sends them, of a response to a request of
        ``tokens`` estimated tokens that is still counted in flight."""
        others = ((self.in_flight - 1, self.requests, self.configured[0], "requests"),
                  (self.in_flight_tokens - tokens, self.tokens, self.configured[1], "tokens"))
        for in_flight, bucket, configured, kind in others:
            limit = _number(headers.get(f"x-ratelimit-limit-{kind}"))
            if limit is not None and limit > 0:
                target = min(limit, configured) if configured > 0 else limit
                if abs(target - bucket.rate * 60.0) > 1e-9:
                    bucket.set_limit(target)
            remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
            if remaining is not None and bucket.limited:
                bucket.clamp(remaining - max(0, in_flight))
                reset = headers.get(f"x-ratelimit-reset-{kind}")
                seconds = parse_duration(reset) if reset else None
                if remaining <= 0 and seconds:
                    self.pause(seconds)

    @property
    def limits(self) -> dict[str, float]:
        return {"rpm": self.requests.rate * 60.0, "tpm": self.tokens.rate * 60.0}


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None
