"""A generation job: many requests in, one result per request out, in order; resumable, bounded, accounted.

:func:`run_job` takes a list of :class:`Request` and returns a :class:`JobResult`. Its contract:

- **Resumable.** Every valid answer is committed to the cache the moment it arrives; a rerun (after a crash,
  a SIGKILL, a budget stop) answers finished requests from the cache and sends only the rest. Identical
  requests (same key) are sent once and share their answer; the sample index keeps intended repeats apart.
- **Bounded.** At most ``concurrency`` requests in flight, within the token buckets of
  :mod:`~dataeff.generate.llm.limits`; at most ``max_retries + 1`` attempts per ask and ``max_reasks + 1``
  asks per request; every attempt ends within ``timeout``.
- **Stops early, cleanly.** The job stops sending (in-flight requests finish; the rest are "not run") when
  the next request could exceed the budget (:mod:`~dataeff.generate.llm.ledger`), when more than
  ``max_error_rate`` of the last ``error_window`` finished requests failed, when a request exhausted its
  attempts without ever reaching the server (an unreachable ``base_url``), or when the server refuses the
  job itself (401, 403 or 404: a wrong key, model or URL). The summary says why.
- **Accounted.** A progress bar shows requests done of total, tokens, cost, failures, retries and ETA. The
  summary (sent, cached, failed, retries, tokens, cost, stop reason, ...) goes to ``manifest``, rewritten
  every few seconds while the job runs and at its end, with one entry per run of the job under ``runs``.

Counts in the summary are of distinct requests; ``sent`` counts HTTP attempts. JSON answers failing their
schema are kept in the cache's ``parse_failures`` table and re-asked with the error; Batch API mode is in
:mod:`~dataeff.generate.llm.batch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tenacity
from tqdm.auto import tqdm

from dataeff.config import to_dict
from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_write_json
from dataeff.generate.llm.backend import Backend, OpenAIBackend
from dataeff.generate.llm.cache import Answer, Cache
from dataeff.generate.llm.config import LLMConfig
from dataeff.generate.llm.ledger import Ledger, price_for
from dataeff.generate.llm.limits import RateLimiter
from dataeff.generate.llm.request import (
    Request,
    Result,
    check_request,
    estimate_prompt_tokens,
    max_prompt_tokens,
    request_key,
    resolve_params,
)
from dataeff.generate.llm.retry import Failure, classify, retry_after, retrying
from dataeff.generate.llm.schema import reask_message, validate

_MANIFEST_EVERY = 5.0  # seconds between manifest rewrites while a job runs
_REFUSED = ("http_401", "http_403", "http_404")  # the server refuses the job, not one request


class Stopped(Exception):
    """Raised inside a request when the job stops before it could be sent."""


@dataclass
class JobSummary:
    requests: int = 0
    unique: int = 0
    cached: int = 0
    answered: int = 0
    failed: int = 0
    not_run: int = 0
    sent: int = 0
    retries: int = 0
    reasks: int = 0
    parse_failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    job_tokens: int = 0
    job_cost_usd: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    stop_reason: str = "done"
    stop_message: str = ""
    elapsed_s: float = 0.0
    batches: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        """The summary in one line, for logs and the CLI."""
        text = (f"{self.cached + self.answered}/{self.unique} answered ({self.cached} cached, {self.answered} new), "
                f"{self.failed} failed, {self.not_run} not run; {self.sent} sent, {self.retries} retries, "
                f"{self.reasks} re-asks; {self.prompt_tokens + self.completion_tokens:,} tokens, ${self.cost_usd:.4f}; "
                f"stop: {self.stop_reason}")
        return text + (f" ({self.stop_message})" if self.stop_message else "")


@dataclass
class JobResult:
    results: list[Result]
    summary: JobSummary

    @property
    def ok(self) -> bool:
        return self.summary.stop_reason == "done" and self.summary.failed == 0


def make_backend(cfg: LLMConfig) -> Backend:
    if cfg.backend == "local":
        from dataeff.generate.llm.local import LocalBackend

        return LocalBackend(cfg)
    return OpenAIBackend(cfg)


def run_job(cfg: LLMConfig, requests: Sequence[Request], *, manifest: str | Path | None = None,
            backend: Backend | None = None) -> JobResult:
    """Run a job to its end or its stop; see the module docstring. Inside an event loop, await
    :func:`run_job_async` instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_job_async(cfg, requests, manifest=manifest, backend=backend))
    raise DataeffError("run_job: called inside a running event loop; await run_job_async(...) there")


async def run_job_async(cfg: LLMConfig, requests: Sequence[Request], *, manifest: str | Path | None = None,
                        backend: Backend | None = None) -> JobResult:
    for i, req in enumerate(requests):
        check_request(i, req)
    own = backend is None
    backend = backend or make_backend(cfg)
    try:
        return await Job(cfg, requests, backend, manifest).run()
    finally:
        if own:
            await backend.aclose()


class Job:
    """One run of a job; :mod:`~dataeff.generate.llm.batch` drives it through the same accept/fail/stop."""

    def __init__(self, cfg: LLMConfig, requests: Sequence[Request], backend: Backend, manifest: str | Path | None):
        self.cfg, self.requests, self.backend = cfg, requests, backend
        self.manifest = Path(manifest) if manifest else None
        self.model = backend.model_id
        self.price = price_for(cfg, cfg.model)
        self.params = [resolve_params(cfg, r) for r in requests]
        self.keys = [request_key(self.model, r, p) for r, p in zip(requests, self.params, strict=True)]
        self.indices: dict[str, list[int]] = {}
        for i, key in enumerate(self.keys):
            self.indices.setdefault(key, []).append(i)
        self.results: list[Result | None] = [None] * len(requests)
        self.summary = JobSummary(requests=len(requests), unique=len(self.indices))
        self.errors: Counter[str] = Counter()
        self.limiter = RateLimiter(cfg.rpm, cfg.tpm)
        self.window: deque[Failure | None] = deque(maxlen=cfg.error_window)
        self.last_response = -1.0  # monotonic time of the last HTTP response of any status
        self.stop_event = asyncio.Event()
        self.started = time.time()
        self.cache = Cache(cfg.cache)
        self.ledger = Ledger(cfg, self.price)
        # Never repeated in a result or a manifest, even if a server echoes it in an error.
        key = getattr(getattr(backend, "client", None), "api_key", None)
        self.secret = key if isinstance(key, str) and len(key) >= 8 else None
        self.bar: Any = None
        self.last_postfix = 0.0

    # -- lifecycle

    async def run(self) -> JobResult:
        clock = time.monotonic()
        writer = None
        try:
            todo = self._from_cache()
            self.bar = tqdm(total=self.summary.unique, initial=self.summary.cached, unit="req", desc="llm",
                            disable=not self.cfg.progress, dynamic_ncols=True, smoothing=0.05)
            if self.manifest is not None:
                writer = asyncio.create_task(self._manifest_loop(clock))
            if todo:
                if self.cfg.batch:
                    from dataeff.generate.llm.batch import BatchRunner

                    reask = await BatchRunner(self).run(todo)
                    await self.online(list(reask), reask)
                else:
                    await self.online(todo)
        except (asyncio.CancelledError, KeyboardInterrupt):
            self.stop("interrupted", "the job was interrupted; rerun it to continue")
            raise
        finally:
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
            if self.bar is not None:
                self.bar.close()
            self._finish(clock)
            self.cache.close()
        return JobResult([r for r in self.results if r is not None], self.summary)

    def _from_cache(self) -> list[str]:
        """Fill in the cached answers; the keys still to send, in request order."""
        found = self.cache.get_many(list(self.indices))
        prior_tokens, prior_cost = 0, 0.0
        todo = []
        for key, idx in self.indices.items():
            answer = found.get(key)
            parsed, error = None, None
            if answer is not None and (schema := self.requests[idx[0]].schema) is not None:
                parsed, error = validate(schema, answer.text)
            if answer is None or error is not None:
                todo.append(key)
                continue
            self._set(key, answer, parsed, cached=True, attempts=0)
            self.summary.cached += 1
            prior_tokens += answer.prompt_tokens + answer.completion_tokens
            prior_cost += answer.cost_usd
        fail_tokens, fail_cost = self.cache.failure_spend(list(self.indices))
        self.ledger.prior_tokens, self.ledger.prior_cost = prior_tokens + fail_tokens, prior_cost + fail_cost
        return todo

    def _finish(self, clock: float) -> None:
        s = self.summary
        s.not_run = sum(1 for idx in self.indices.values() if self.results[idx[0]] is None)
        for key, idx in self.indices.items():
            if self.results[idx[0]] is None:
                for i in idx:
                    self.results[i] = Result(i, key, False, error=f"not run: the job stopped ({s.stop_reason})")
        s.prompt_tokens, s.completion_tokens, s.cost_usd = (self.ledger.prompt_tokens, self.ledger.completion_tokens,
                                                            self.ledger.cost)
        s.job_tokens, s.job_cost_usd = self.ledger.job_tokens, self.ledger.job_cost
        s.errors = dict(self.errors.most_common())
        s.elapsed_s = round(time.monotonic() - clock, 3)
        self.write_manifest()

    # -- the manifest

    def write_manifest(self) -> None:
        if self.manifest is None:
            return
        entry = {"started": self.started, "summary": self.summary.to_dict()}
        runs: list[Any] = []
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads(self.manifest.read_text(encoding="utf-8"))
            runs = [r for r in previous.get("runs", []) if isinstance(r, dict) and r.get("started") != self.started]
        atomic_write_json(self.manifest, {
            "kind": "dataeff.llm.job",
            "model": self.model,
            "config": to_dict(self.cfg),
            "limits": self.limiter.limits,
            "summary": self.summary.to_dict(),
            "runs": [*runs, entry],
        })

    async def _manifest_loop(self, clock: float) -> None:
        while True:
            await asyncio.sleep(_MANIFEST_EVERY)
            s = self.summary
            s.prompt_tokens, s.completion_tokens, s.cost_usd = (self.ledger.prompt_tokens,
                                                                self.ledger.completion_tokens, self.ledger.cost)
            s.job_tokens, s.job_cost_usd = self.ledger.job_tokens, self.ledger.job_cost
            s.errors = dict(self.errors.most_common())
            s.elapsed_s = round(time.monotonic() - clock, 3)
            self.write_manifest()

    # -- outcomes

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    def redact(self, text: str) -> str:
        return text.replace(self.secret, "[api key]") if self.secret else text

    def stop(self, reason: str, message: str) -> None:
        if not self.stopping:
            self.summary.stop_reason, self.summary.stop_message = reason, self.redact(message)
            self.stop_event.set()

    def _set(self, key: str, answer: Answer, parsed: Any, *, cached: bool, attempts: int) -> None:
        for i in self.indices[key]:
            self.results[i] = Result(i, key, True, text=answer.text, parsed=parsed, cached=cached,
                                     finish_reason=answer.finish_reason, prompt_tokens=answer.prompt_tokens,
                                     completion_tokens=answer.completion_tokens, cost_usd=answer.cost_usd,
                                     attempts=attempts)

    def accept(self, key: str, answer: Answer, attempts: int) -> str | None:
        """Take a raw answer: stored and returned if valid; else kept as a parse failure, and the error returned."""
        schema = self.requests[self.indices[key][0]].schema
        parsed = None
        if schema is not None:
            parsed, error = validate(schema, answer.text)
            if error is not None:
                self.cache.add_parse_failure(key, self.model, answer, error)
                self.summary.parse_failures += 1
                self.errors["schema"] += 1
                return error
        self.cache.put(key, self.model, answer)
        self._set(key, answer, parsed, cached=False, attempts=attempts)
        self.summary.answered += 1
        self._outcome(None)
        return None

    def fail(self, key: str, failure: Failure, attempts: int) -> None:
        message = self.redact(failure.message)
        for i in self.indices[key]:
            self.results[i] = Result(i, key, False, error=message, attempts=attempts)
        self.summary.failed += 1
        self._outcome(failure)

    def _outcome(self, failure: Failure | None) -> None:
        self.window.append(failure)
        if self.bar is not None:
            self.bar.update(1)
            self._postfix()
        failures = [f for f in self.window if f is not None]
        if len(self.window) == self.window.maxlen and len(failures) > self.cfg.max_error_rate * len(self.window):
            common, n = Counter(f.kind for f in failures).most_common(1)[0]
            example = next(f.message for f in failures if f.kind == common)
            self.stop("error_rate", f"{len(failures)} of the last {len(self.window)} requests failed, {n} of them "
                                    f"with {common}: {example}")

    def _postfix(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.bar is None or self.bar.disable or (not force and now - self.last_postfix < 0.5):
            return
        self.last_postfix = now
        self.bar.set_postfix_str(
            f"tok={self.ledger.prompt_tokens + self.ledger.completion_tokens:,} ${self.ledger.cost:.4f} "
            f"fail={self.summary.failed} retry={self.summary.retries}", refresh=False)

    # -- online requests

    async def online(self, keys: list[str], history: Mapping[str, tuple[list[dict[str, str]], int]] | None = None) -> None:
        """Send ``keys``, ``concurrency`` at a time. ``history`` holds, for re-asks after a batch, the
        messages to send and the number of asks already made."""
        queue = deque(keys)

        async def worker() -> None:
            while queue and not self.stopping:
                key = queue.popleft()
                messages, asked = (history or {}).get(key, (None, 0))
                await self.request(key, messages, asked)

        await asyncio.gather(*(worker() for _ in range(min(self.cfg.concurrency, len(keys)))))

    async def request(self, key: str, messages: list[dict[str, str]] | None = None, asked: int = 0) -> None:
        i = self.indices[key][0]
        req, params = self.requests[i], self.params[i]
        messages = list(messages or req.messages)
        attempts = 0
        for ask in range(asked, self.cfg.max_reasks + 1):
            began = time.monotonic()
            state = {"n": 0}  # attempts of this ask, counted by _send
            try:
                answer = await self._attempts(messages, params, state)
            except Stopped:
                return
            except Exception as e:
                attempts += state["n"]
                failure = classify(e)
                if failure.kind == "connect" and self.last_response < began:
                    self.stop("unreachable", f"{self.cfg.base_url} is unreachable: {failure.message}, "
                                             f"{state['n']} attempts in {time.monotonic() - began:.1f} s")
                elif failure.kind in _REFUSED:
                    # Every other request would be refused the same way: a wrong key, model or URL.
                    self.stop("refused", f"{failure.message} (llm.api_key_env={self.cfg.api_key_env!r}, "
                                         f"llm.model={self.cfg.model!r}, llm.base_url={self.cfg.base_url!r})")
                self.fail(key, failure, attempts)
                return
            attempts += state["n"]
            error = self.accept(key, answer, attempts)
            if error is None:
                return
            if ask == self.cfg.max_reasks:
                self.fail(key, Failure("schema", f"the answer {error} (after {ask + 1} asks; raw answers are in the "
                                                 f"cache's parse_failures table)", False), attempts)
                return
            self.summary.reasks += 1
            messages = [*messages, {"role": "assistant", "content": answer.text},
                        {"role": "user", "content": reask_message(error, req.schema)}]

    async def _sleep(self, seconds: float) -> None:
        """A backoff wait that ends early when the job stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), seconds)

    def _before_sleep(self, retry_state: tenacity.RetryCallState) -> None:
        self.summary.retries += 1
        self._postfix()

    async def _attempts(self, messages: list[dict[str, str]], params: Mapping[str, Any], state: dict[str, int]) -> Answer:
        """One ask, retried as :mod:`~dataeff.generate.llm.retry` says; raises :class:`Stopped` or the last error."""
        max_tokens = int(params.get("max_tokens", self.cfg.max_tokens))
        estimate = estimate_prompt_tokens(messages) + max_tokens
        worst = max_prompt_tokens(messages) + max_tokens
        answer: Answer | None = None
        async for attempt in retrying(self.cfg, stopped=lambda: self.stopping, before_sleep=self._before_sleep,
                                      sleep=self._sleep):
            with attempt:
                if self.stopping:
                    raise Stopped
                reservation = self.ledger.reserve(worst, completion=max_tokens)
                if reservation is None:
                    self.stop("budget", self.ledger.exhausted_message)
                    raise Stopped
                try:
                    answer = await self._send(messages, params, estimate, state)
                finally:
                    self.ledger.release(reservation)
        assert answer is not None
        return answer

    async def _send(self, messages: list[dict[str, str]], params: Mapping[str, Any], estimate: int,
                    state: dict[str, int]) -> Answer:
        await self.limiter.acquire(estimate)
        if self.stopping:
            self.limiter.release(estimate, 0)
            raise Stopped
        state["n"] += 1
        self.summary.sent += 1
        try:
            answer, headers = await self.backend.complete(messages, params)
        except Exception as e:
            failure = classify(e)
            self.errors[failure.kind] += 1
            response = getattr(e, "response", None)
            if response is not None:
                self.last_response = time.monotonic()
                self.limiter.observe(response.headers, estimate)
                if failure.kind == "http_429":
                    self.limiter.pause(min(retry_after(response.headers) or 0.0, self.cfg.retry_after_max))
            self.limiter.release(estimate, 0)
            raise
        self.last_response = time.monotonic()
        self.limiter.observe(headers, estimate)
        self.limiter.release(estimate, answer.prompt_tokens + answer.completion_tokens)
        cost = self.ledger.charge(answer.prompt_tokens, answer.completion_tokens)
        return dataclasses.replace(answer, cost_usd=cost)
