"""A fault-injecting OpenAI-compatible server on 127.0.0.1 for the generation client's tests.

It runs uvicorn in a thread on a free port and answers ``/v1/chat/completions`` like a provider would:
deterministic text, ``usage`` (prompt tokens = words in the messages, completion tokens = ``completion_tokens``).
Faults are scripted by the request's *first* user message (so re-asks of one request count together): a
marker ``[KIND*N]`` makes the first N requests of that prompt fail with KIND, ``[KIND*always]`` every one.

Kinds: ``401`` (a refused key, echoing the Authorization header as careless servers do), ``429`` (with ``Retry-After: retry_after``), ``500``, ``timeout`` (no answer for ``hang`` seconds),
``drop`` (headers, then the connection closes mid-body), ``truncated`` (a 200 whose JSON is cut short),
``malformed`` (a 200 whose JSON is not a chat completion), ``html`` (a 200 HTML error page), ``slow`` (the
right answer, trickled a byte every ``trickle`` seconds), ``badjson`` (a well-formed completion whose text is
not the JSON asked for). A prompt holding ``[json]`` is answered with a JSON object.

With ``rpm`` set, the server enforces a request bucket of ``burst`` requests refilled at ``rpm``/min, sends
OpenAI's ``x-ratelimit-*`` headers on every answer, and answers 429 when the bucket is empty (counted in
``rejected``). It also fakes the Batch API (files, batches, file content) for batch mode, finishing a batch
after ``batch_polls`` retrievals. ``counts`` holds the chat requests received per prompt, ``log`` their order, ``bodies`` them.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import hashlib
import json
import re
import threading
import time
from collections import Counter
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dataeff.generate.serve import bind

_FAULT = re.compile(r"\[(401|429|500|timeout|drop|truncated|malformed|html|slow|badjson)\*(\d+|always)\]")


def first_user(messages: list[dict[str, Any]]) -> str:
    return next(m["content"] for m in messages if m["role"] == "user")


class ThreadServer:
    """An ASGI app served by uvicorn in a daemon thread on a free port of 127.0.0.1."""

    def __init__(self, app: Any):
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical", access_log=False,
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class FaultServer(ThreadServer):
    def __init__(self, *, latency: float = 0.0, retry_after: float = 0.2, hang: float = 2.0, trickle: float = 0.05,
                 completion_tokens: int = 10, rpm: float = 0.0, burst: int = 2, batch_polls: int = 2):
        self.latency, self.retry_after, self.hang, self.trickle = latency, retry_after, hang, trickle
        self.completion_tokens, self.rpm, self.burst, self.batch_polls = completion_tokens, rpm, burst, batch_polls
        self.counts: Counter[str] = Counter()
        self.log: list[str] = []
        self.times: dict[str, list[float]] = {}
        self.rejected = 0
        self.bucket, self.stamp = float(burst), time.monotonic()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.polls: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.auth: set[str] = set()
        self.bodies: dict[str, list[dict[str, Any]]] = {}
        super().__init__(self._build())

    # -- answers

    def completion(self, body: dict[str, Any], n: int) -> dict[str, Any]:
        prompt = first_user(body["messages"])
        if "[json]" in prompt:
            text = json.dumps({"answer": hashlib.sha256(prompt.encode()).hexdigest()[:8], "n": n})
        else:
            text = f"answer {n} to {prompt}"
        words = sum(len(str(m["content"]).split()) for m in body["messages"])
        return {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": words, "completion_tokens": self.completion_tokens,
                          "total_tokens": words + self.completion_tokens}}

    def fault(self, prompt: str, n: int) -> str | None:
        """The fault for the n-th (1-based) request of ``prompt``."""
        for kind, times in _FAULT.findall(prompt):
            if times == "always" or n <= int(times):
                return kind
        return None

    def _limit(self) -> tuple[bool, dict[str, str]]:
        if not self.rpm:
            return True, {}
        now = time.monotonic()
        rate = self.rpm / 60
        self.bucket = min(self.burst, self.bucket + (now - self.stamp) * rate)
        self.stamp = now
        ok = self.bucket >= 1
        if ok:
            self.bucket -= 1
        reset = max(0.0, (1 - self.bucket) / rate)
        return ok, {"x-ratelimit-limit-requests": str(int(self.rpm)),
                    "x-ratelimit-remaining-requests": str(int(self.bucket)),
                    "x-ratelimit-reset-requests": f"{reset:.3f}s"}

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            self.auth.add(request.headers.get("authorization", ""))
            prompt = first_user(body["messages"])
            self.counts[prompt] += 1
            self.log.append(prompt)
            self.times.setdefault(prompt, []).append(time.monotonic())
            self.bodies.setdefault(prompt, []).append(body)
            n = self.counts[prompt]
            ok, headers = self._limit()
            if not ok:
                self.rejected += 1
                return JSONResponse({"error": {"message": "rate limit reached", "type": "requests"}}, 429,
                                    headers={**headers, "retry-after": "1"})
            kind = self.fault(prompt, n)
            if kind == "401":
                given = request.headers.get("authorization", "")
                return JSONResponse({"error": {"message": f"Incorrect API key provided: {given}"}}, 401)
            if kind == "429":
                return JSONResponse({"error": {"message": "Rate limit reached", "type": "requests"}}, 429,
                                    headers={"retry-after": str(self.retry_after)})
            if kind == "500":
                return JSONResponse({"error": {"message": "The server had an error", "type": "server_error"}}, 500)
            if kind == "timeout":
                await asyncio.sleep(self.hang)
            if kind == "html":
                return Response("<html><body>502 Bad Gateway</body></html>", media_type="text/html")
            if kind == "malformed":
                return JSONResponse({"object": "chat.completion", "model": "m", "result": "no choices here"})
            await asyncio.sleep(self.latency)
            answer = self.completion(body, n)
            if kind == "badjson":
                answer["choices"][0]["message"]["content"] = "Sure! Here is the JSON you asked for: {answer: oops"
            data = json.dumps(answer).encode()
            if kind == "truncated":
                return Response(data[: len(data) // 2], media_type="application/json")
            if kind == "drop":
                async def dropped() -> Any:
                    yield data[:10]
                    raise ConnectionResetError("dropped by the fault server")

                return StreamingResponse(dropped(), media_type="application/json",
                                         headers={"content-length": str(len(data))})
            if kind == "slow":
                async def trickled() -> Any:
                    for i in range(len(data)):
                        await asyncio.sleep(self.trickle)
                        yield data[i : i + 1]

                return StreamingResponse(trickled(), media_type="application/json")
            return Response(data, media_type="application/json", headers=headers)

        # -- a fake Batch API

        @app.post("/v1/files")
        async def upload(request: Request) -> dict[str, Any]:
            self.calls["files.create"] += 1
            raw = await request.body()
            head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
            content = next(p.get_payload(decode=True) for p in msg.iter_parts() if p.get_filename())
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = content
            return {"id": file_id, "object": "file", "bytes": len(content), "created_at": 0,
                    "filename": "batch.jsonl", "purpose": "batch", "status": "processed"}

        def batch_object(batch_id: str) -> dict[str, Any]:
            b = self.batches[batch_id]
            return {"id": batch_id, "object": "batch", "endpoint": "/v1/chat/completions", "errors": None,
                    "input_file_id": b["input_file_id"], "completion_window": "24h", "status": b["status"],
                    "output_file_id": b.get("output_file_id"), "error_file_id": None, "created_at": 0,
                    "request_counts": {"total": b["total"], "completed": b.get("completed", 0), "failed": 0},
                    "metadata": b.get("metadata")}

        @app.post("/v1/batches")
        async def create_batch(request: Request) -> dict[str, Any]:
            self.calls["batches.create"] += 1
            body = await request.json()
            batch_id = f"batch-{len(self.batches) + 1}"
            total = len(self.files[body["input_file_id"]].splitlines())
            self.batches[batch_id] = {"input_file_id": body["input_file_id"], "status": "in_progress", "total": total,
                                      "metadata": body.get("metadata")}
            return batch_object(batch_id)

        @app.get("/v1/batches")
        async def list_batches() -> dict[str, Any]:
            self.calls["batches.list"] += 1
            data = [batch_object(b) for b in reversed(list(self.batches))]
            return {"object": "list", "data": data, "has_more": False,
                    "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

        @app.get("/v1/batches/{batch_id}")
        async def retrieve(batch_id: str) -> dict[str, Any]:
            self.calls["batches.retrieve"] += 1
            self.polls[batch_id] += 1
            b = self.batches[batch_id]
            if b["status"] == "in_progress" and self.polls[batch_id] >= self.batch_polls:
                out = []
                for line in self.files[b["input_file_id"]].decode().splitlines():
                    req = json.loads(line)
                    prompt = first_user(req["body"]["messages"])
                    self.counts[prompt] += 1
                    self.log.append(prompt)
                    answer = self.completion(req["body"], self.counts[prompt])
                    if self.fault(prompt, self.counts[prompt]) == "badjson":
                        answer["choices"][0]["message"]["content"] = "not json"
                    out.append(json.dumps({"id": f"r-{len(out)}", "custom_id": req["custom_id"], "error": None,
                                           "response": {"status_code": 200, "request_id": "x", "body": answer}}))
                file_id = f"file-{len(self.files) + 1}"
                self.files[file_id] = ("\n".join(out) + "\n").encode()
                b.update(status="completed", output_file_id=file_id, completed=len(out))
            return batch_object(batch_id)

        @app.get("/v1/files/{file_id}/content")
        async def content(file_id: str) -> Response:
            self.calls["files.content"] += 1
            return Response(self.files[file_id], media_type="application/octet-stream")

        return app
