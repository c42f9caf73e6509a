"""Batch mode: the OpenAI Batch API shape (upload a JSONL of requests, create a batch, poll it, download the
answers), at the provider's batch price (``batch_discount``, half on OpenAI).

Every submission is journaled in the cache's ``batches`` table *before* it can cost anything twice: the
uploaded file's id is recorded first, then the batch id. A restarted job therefore never submits a request
that is in an open batch: it polls that batch instead. A job killed between the upload and the batch's
creation finds the batch, if it was created, by its input file among the provider's batches, and creates it
otherwise. Each line's ``custom_id`` is the request's cache key.

The budget is reserved for a batch's worst case before it is submitted; a batch that would not fit is cut to
what does, and the job stops after it. Answers failing their schema are kept like any others and re-asked
online (at the full price). With ``batch_wait: false`` the job returns once its batches are submitted
(``stop_reason: batch_pending``) and a rerun collects them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import openai

from dataeff.errors import DataeffError
from dataeff.generate.llm.backend import OpenAIBackend, parse_completion
from dataeff.generate.llm.cache import TERMINAL, BatchEntry
from dataeff.generate.llm.request import max_prompt_tokens
from dataeff.generate.llm.retry import Failure, MalformedResponse, Refused, classify, retrying
from dataeff.generate.llm.schema import reask_message

if TYPE_CHECKING:
    from dataeff.generate.llm.job import Job

T = TypeVar("T")
ENDPOINT = "/v1/chat/completions"


class BatchRunner:
    def __init__(self, job: Job):
        if not isinstance(job.backend, OpenAIBackend):
            raise DataeffError("llm.batch: batch mode needs the openai backend (a provider with a Batch API)")
        self.job, self.cfg = job, job.cfg
        self.client: openai.AsyncOpenAI = job.backend.client
        self.reasks: dict[str, tuple[list[dict[str, str]], int]] = {}
        self.reserved: dict[str, tuple[int, float]] = {}

    async def run(self, todo: list[str]) -> dict[str, tuple[list[dict[str, str]], int]]:
        """Submit what no open batch holds, collect every open batch; the answers to re-ask online."""
        job, cache = self.job, self.job.cache
        wanted = set(todo)
        entries = [e for e in cache.open_batches() if wanted.intersection(e.keys)]
        pending = {k for e in entries for k in e.keys} & wanted
        for key in pending:
            # Already submitted: reserved whatever the budget says now, since it will be billed anyway.
            self._reserve(key, force=True)
        fresh = [k for k in todo if k not in pending]
        for start in range(0, len(fresh), self.cfg.batch_max_requests):
            chunk = fresh[start : start + self.cfg.batch_max_requests]
            fits = []
            for key in chunk:
                if not self._reserve(key):
                    job.stop("budget", job.ledger.exhausted_message)
                    break
                fits.append(key)
            if fits:
                entries.append(await self._submit(fits))
            if job.stopping:
                break
        # A journaled upload without a batch id: the run that uploaded it was killed before, or just after,
        # creating its batch.
        entries = [e if e.batch_id is not None else await self._create(e, search=True) for e in entries]
        await self._collect(entries)
        return self.reasks

    # -- bookkeeping

    def _request(self, key: str) -> tuple[list[dict[str, str]], dict[str, Any]]:
        i = self.job.indices[key][0]
        return self.job.requests[i].messages, self.job.params[i]

    def _reserve(self, key: str, force: bool = False) -> bool:
        messages, params = self._request(key)
        max_tokens = int(params.get("max_tokens", self.cfg.max_tokens))
        worst = max_prompt_tokens(messages) + max_tokens
        ledger = self.job.ledger
        reservation = ledger.reserve(worst, self.cfg.batch_discount, completion=max_tokens, force=force)
        if reservation is None:
            return False
        self.reserved[key] = reservation
        return True

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """One Batch/Files API call, retried like a chat request; the job stopping does not cut it short."""
        async for attempt in retrying(self.cfg, stopped=lambda: False):
            with attempt:
                return await fn()
        raise AssertionError("unreachable: tenacity reraises the last error")

    # -- submission

    async def _submit(self, keys: list[str]) -> BatchEntry:
        lines = []
        for key in keys:
            messages, params = self._request(key)
            body = {"model": self.cfg.model, "messages": messages, **params}
            lines.append(json.dumps({"custom_id": key, "method": "POST", "url": ENDPOINT, "body": body},
                                    ensure_ascii=False))
        data = ("\n".join(lines) + "\n").encode()
        uploaded = await self._call(lambda: self.client.files.create(
            file=("dataeff-batch.jsonl", data, "application/jsonl"), purpose="batch"))
        self.job.cache.add_batch(uploaded.id, keys)
        return await self._create(BatchEntry(uploaded.id, None, keys, "uploaded"), search=False)

    async def _create(self, entry: BatchEntry, search: bool) -> BatchEntry:
        """The batch of an uploaded file; with ``search``, the one a killed run may have created is reused."""

        async def find() -> Any:
            async for b in self.client.batches.list(limit=100):
                if b.input_file_id == entry.input_file_id:
                    return b
            return None

        found = await self._call(find) if search else None
        batch = found or await self._call(lambda: self.client.batches.create(
            input_file_id=entry.input_file_id, endpoint=ENDPOINT, completion_window=self.cfg.batch_window,  # type: ignore[arg-type]
            metadata={"dataeff": "llm"}))
        self.job.cache.set_batch(entry.input_file_id, batch.id, batch.status)
        return BatchEntry(entry.input_file_id, batch.id, entry.keys, batch.status)

    # -- collection

    async def _collect(self, entries: list[BatchEntry]) -> None:
        job = self.job
        open_ = list(entries)
        while open_:
            still = []
            counts = []
            for entry in open_:
                assert entry.batch_id is not None
                batch_id = entry.batch_id
                batch = await self._call(lambda b=batch_id: self.client.batches.retrieve(b))
                if batch_id not in job.summary.batches:
                    job.summary.batches.append(batch_id)
                job.cache.set_batch(entry.input_file_id, batch_id, batch.status)
                if batch.status in TERMINAL:
                    await self._download(entry, batch)
                else:
                    still.append(entry)
                    rc = batch.request_counts
                    counts.append(f"{batch.status} {rc.completed if rc else 0}/{rc.total if rc else len(entry.keys)}")
            open_ = still
            if job.bar is not None and counts:
                job.bar.set_postfix_str("batches: " + ", ".join(counts), refresh=True)
            if open_ and not self.cfg.batch_wait:
                ids = ", ".join(e.batch_id or e.input_file_id for e in open_)
                job.stop("batch_pending", f"{len(open_)} batches submitted and not finished ({ids}); rerun the job "
                                          f"to collect them")
                return
            if open_:
                await asyncio.sleep(self.cfg.batch_poll_interval)

    async def _download(self, entry: BatchEntry, batch: Any) -> None:
        job = self.job
        lines: list[str] = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                content = await self._call(lambda f=file_id: self.client.files.content(f))
                lines.extend(line for line in content.text.splitlines() if line.strip())
        seen = set()
        for line in lines:
            try:
                row = json.loads(line)
                key = row["custom_id"]
            except (ValueError, KeyError, TypeError):
                continue
            if key not in job.indices or key in seen or job.results[job.indices[key][0]] is not None:
                continue
            seen.add(key)
            self._answer(key, row)
        for key in entry.keys:
            if key in job.indices and key not in seen and job.results[job.indices[key][0]] is None:
                job.fail(key, Failure("batch", f"batch {entry.batch_id} ended {batch.status} without an answer", False), 1)
        for key in entry.keys:
            if key in self.reserved:
                job.ledger.release(self.reserved.pop(key))
        job.cache.set_batch(entry.input_file_id, entry.batch_id, "collected")

    def _answer(self, key: str, row: dict[str, Any]) -> None:
        job = self.job
        messages, _ = self._request(key)
        response = row.get("response") or {}
        status = response.get("status_code")
        if status != 200:
            error = row.get("error") or (response.get("body") or {}).get("error") or {}
            message = error.get("message") if isinstance(error, dict) else str(error)
            job.fail(key, Failure(f"http_{status}" if status else "batch", f"batch answer: {message or status}", False), 1)
            return
        try:
            answer = parse_completion(json.dumps(response.get("body")), messages)
        except (MalformedResponse, Refused) as e:
            job.fail(key, classify(e), 1)
            return
        cost = job.ledger.charge(answer.prompt_tokens, answer.completion_tokens, self.cfg.batch_discount)
        answer = dataclasses.replace(answer, cost_usd=cost, batch=True)
        error = job.accept(key, answer, 1)
        if error is not None:
            schema = job.requests[job.indices[key][0]].schema
            if self.cfg.max_reasks == 0:
                job.fail(key, Failure("schema", f"the answer {error}", False), 1)
                return
            job.summary.reasks += 1
            self.reasks[key] = ([*messages, {"role": "assistant", "content": answer.text},
                                 {"role": "user", "content": reask_message(error, schema)}], 1)
