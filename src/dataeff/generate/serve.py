"""``dataeff serve``: an OpenAI-compatible HTTP server for dataeff runs, ensembles and Hugging Face models,
so any tool that speaks that API (the dataeff client, lm-eval's ``local-chat-completions``, curator, ...) can
use them. It is the offline counterpart of vLLM here, and the endpoint the end-to-end tests use.

Endpoints (FastAPI on uvicorn):

- ``GET /v1/models``: the one served model, with its context length (``max_model_len``).
- ``POST /v1/chat/completions``: ``messages`` through the model's chat template (for base models the
  template of :mod:`dataeff.generate.llm.template`), then sampling with ``max_tokens`` (or
  ``max_completion_tokens``), ``temperature``, ``top_p``, ``stop``, ``seed``, ``n`` and ``stream``.
- ``POST /v1/completions``: a ``prompt`` (text, or a list of texts) continued as a document.
- ``GET /health``.

Answers carry ``usage`` in the model's tokens. Concurrent requests are decoded together in batches
(``batch_size``); a streamed answer is sent once it is decoded, as one content chunk. A prompt that does not
fit the context with its ``max_tokens`` is refused with 400 ``context_length_exceeded`` and both sizes, and
a request for another model name with 404 ``model_not_found``, as OpenAI and vLLM do. Parameters the server
cannot honour and that change the answer's meaning (``logprobs``, ``tools``, ``echo``, token-id prompts) are
refused with 400.

Guided JSON decoding, as vLLM does it: ``response_format`` ``{"type": "json_schema", "json_schema": {"name",
"schema", "strict"}}`` or ``{"type": "json_object"}`` (and vLLM's ``guided_json`` extra field, a schema) on
either endpoint masks sampling token by token (:mod:`dataeff.generate.guided`), so the answer parses and
matches the schema, with bounds such as ``maxLength`` and ``maxItems`` held; an answer that runs out of
``max_tokens`` mid-JSON is cut, with ``finish_reason: "length"``. A schema keyword the grammar engine does not
implement is refused with 400 naming it; so is a schema on a Hugging Face model or a word-level run (whose
vocabulary cannot spell what a schema forces). The test model ignores
it (its answers stay hex words), so clients' schema failures can be tested against it.

``model=test`` serves the **test model** instead: no weights, every answer after exactly ``test_latency``
seconds (an async sleep, so concurrent requests do not queue), its text a deterministic function of the
prompt (and seed): ``min(max_tokens, test_tokens)`` words, and whitespace-separated words as tokens. Client
benchmarks and fault tests use it so that they measure the client, not a model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from dataeff.config import option
from dataeff.errors import DataeffError
from dataeff.generate.llm.retry import ContextTooLong
from dataeff.generate.llm.sampling import Completion, GenParams, context_error, json_schema_of
from dataeff.generate.llm.template import STOP, chat_to_text


@dataclass
class ServeConfig:
    model: str = option("", "a dataeff run directory, an ensemble.json, a Hugging Face causal-LM directory, or "
                            "'test' for the fixed-latency test model")
    name: str = option("", "the model id clients send and /v1/models lists (default: the directory's name, or test)")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = option(8000, "port to listen on (0: any free port; the URL is printed)")
    batch_size: int = option(16, "requests decoded together at most")
    batch_wait_ms: float = option(5.0, "milliseconds a batch waits for more requests to join it")
    device: str = option("auto", "auto, cpu, cuda or mps")
    dtype: Literal["auto", "bf16", "fp32"] = option("auto", "bf16 (autocast), fp32, or auto: bf16 where the device computes it natively, else fp32")
    max_tokens: int = option(256, "completion tokens when a request sets none")
    test_latency: float = option(0.05, "test model: seconds before every answer")
    test_tokens: int = option(16, "test model: words per answer at most")
    test_context: int = option(4096, "test model: context length in words")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = option("warning", "uvicorn's log level")

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_tokens", "test_tokens", "test_context"):
            if getattr(self, name) < 1:
                raise DataeffError(f"serve.{name}: {getattr(self, name)} must be at least 1")
        if self.test_latency < 0 or self.batch_wait_ms < 0:
            raise DataeffError("serve.test_latency and serve.batch_wait_ms must be >= 0")
        if not 0 <= self.port <= 65535:
            raise DataeffError(f"serve.port: {self.port} is not a port number")


class Engine(Protocol):
    name: str
    context: int
    stops: tuple[str, ...]

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> str: ...

    async def generate(self, prompt: str, params: GenParams) -> Completion: ...


class TestEngine:
    """The fixed-latency test model (see the module docstring)."""

    def __init__(self, latency: float, tokens: int, context: int):
        self.name, self.latency, self.tokens, self.context, self.stops = "test", latency, tokens, context, STOP

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
        return chat_to_text(messages)

    async def generate(self, prompt: str, params: GenParams) -> Completion:
        params.check()
        n_prompt = len(prompt.split())
        if n_prompt + params.max_tokens > self.context:
            raise context_error(n_prompt, params.max_tokens, self.context)
        await asyncio.sleep(self.latency)
        n = min(params.max_tokens, self.tokens)
        digest = hashlib.sha256(f"{params.seed}|{prompt}".encode()).hexdigest()
        words = [digest[(4 * i) % 60 : (4 * i) % 60 + 4] for i in range(n)]
        return Completion(" ".join(words), n_prompt, n, "length" if n == params.max_tokens else "stop")


class ModelEngine:
    """A local model behind a batcher."""

    def __init__(self, cfg: ServeConfig):
        from dataeff.generate.llm.local import Batcher, load_local

        self.model = load_local(cfg.model, cfg.device, cfg.dtype, cfg.batch_size)
        self.batcher = Batcher(self.model, cfg.batch_size, cfg.batch_wait_ms / 1000)
        self.name, self.context, self.stops = self.model.name, self.model.context, self.model.stops

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
        return self.model.chat_prompt(messages)

    async def generate(self, prompt: str, params: GenParams) -> Completion:
        return await self.batcher.generate(prompt, params)


def load_engine(cfg: ServeConfig) -> Engine:
    if not cfg.model:
        raise DataeffError("serve.model: set a run directory, an ensemble.json, a Hugging Face model directory, or test")
    if cfg.model == "test":
        return TestEngine(cfg.test_latency, cfg.test_tokens, cfg.test_context)
    return ModelEngine(cfg)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: Any = ""

class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    logprobs: Any = None
    tools: Any = None
    echo: bool = False
    response_format: Any = None
    guided_json: Any = None  # vLLM's extra field: a JSON Schema (object or text)

class ChatBody(Sampling):
    messages: list[Message]

class CompletionBody(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]


def _text(content: Any) -> str:
    """A message's text: a string, or OpenAI's list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ValueError("message content must be text or a list of text parts")


def build_app(cfg: ServeConfig, engine: Engine | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (default: the one ``cfg`` names)."""
    engine = engine or load_engine(cfg)
    served = cfg.name or engine.name
    app = FastAPI(title="dataeff serve", docs_url=None, redoc_url=None)
    app.state.served = served

    def error(status: int, message: str, code: str | None = None, param: str | None = None,
              kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)

    def refuse(body: Sampling) -> JSONResponse | None:
        if body.model != served:
            return error(404, f"The model '{body.model}' does not exist; this server serves '{served}'.",
                         "model_not_found", "model")
        for name in ("logprobs", "tools"):
            if getattr(body, name):
                return error(400, f"{name} is not supported by dataeff serve", "unsupported_parameter", name)
        if body.echo:
            return error(400, "echo is not supported by dataeff serve", "unsupported_parameter", "echo")
        if not 1 <= body.n <= 128:
            return error(400, f"n={body.n} must be between 1 and 128", param="n")
        return None

    def params(body: Sampling, extra_stops: tuple[str, ...]) -> GenParams:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        p = GenParams(max_tokens=body.max_completion_tokens or body.max_tokens or cfg.max_tokens,
                      temperature=1.0 if body.temperature is None else body.temperature,
                      top_p=1.0 if body.top_p is None else body.top_p, stop=stop + extra_stops, seed=body.seed,
                      schema=json_schema_of(body.response_format, body.guided_json))
        p.check()
        return p

    async def complete(prompts: list[str], p: GenParams, n: int) -> list[Any]:
        jobs = [engine.generate(text, p if p.seed is None else replace(p, seed=p.seed + j))
                for text in prompts for j in range(n)]
        return list(await asyncio.gather(*jobs))

    def usage(outs: list[Any], n: int) -> dict[str, int]:
        prompt = sum(o.prompt_tokens for o in outs[::n])
        completion = sum(o.completion_tokens for o in outs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def run(prompts: list[str], body: Sampling, stops: tuple[str, ...], param: str) -> list[Any] | JSONResponse:
        try:
            return await complete(prompts, params(body, stops), body.n)
        except ContextTooLong as e:
            return error(400, f"{e}; shorten the {param} or lower max_tokens", "context_length_exceeded", param)
        except ValueError as e:
            field = str(e).split(":", 1)[0].split(".", 1)[0]
            return error(400, str(e), param=field if field in ("response_format", "guided_json") else None)

    def sse(chunks: list[dict[str, Any]]) -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served, "object": "model", "created": 0, "owned_by": "dataeff",
                                            "max_model_len": engine.context}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatBody) -> Any:
        if (refused := refuse(body)) is not None:
            return refused
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                        for m in body.messages]
        except ValueError as e:
            return error(400, str(e), param="messages")
        if not messages:
            return error(400, "messages must not be empty", param="messages")
        outs = await run([engine.chat_prompt(messages)], body, engine.stops, "messages")
        if isinstance(outs, JSONResponse):
            return outs
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": served}
            chunks = [{**head, "choices": [{"index": j, "delta": {"role": "assistant", "content": o.text.strip()},
                                            "finish_reason": None}]} for j, o in enumerate(outs)]
            chunks += [{**head, "choices": [{"index": j, "delta": {}, "finish_reason": o.finish_reason}]}
                       for j, o in enumerate(outs)]
            return sse(chunks)
        # A JSONResponse as is: FastAPI would otherwise walk the answer once more with its encoder.
        return JSONResponse({"id": ident, "object": "chat.completion", "created": created, "model": served,
                             "choices": [{"index": j, "message": {"role": "assistant", "content": o.text.strip()},
                                          "finish_reason": o.finish_reason} for j, o in enumerate(outs)],
                             "usage": usage(outs, body.n)})

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody) -> Any:
        if (refused := refuse(body)) is not None:
            return refused
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)  # type: ignore[arg-type]
        else:
            return error(400, "token-id prompts are not supported by dataeff serve; send text", "unsupported_parameter",
                         "prompt")
        outs = await run(prompts, body, (), "prompt")
        if isinstance(outs, JSONResponse):
            return outs
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        choices = [{"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
                   for i, o in enumerate(outs)]
        if body.stream:
            head = {"id": ident, "object": "text_completion", "created": created, "model": served}
            return sse([{**head, "choices": [c]} for c in choices])
        return JSONResponse({"id": ident, "object": "text_completion", "created": created, "model": served,
                             "choices": choices, "usage": usage(outs, body.n)})

    return app


def bind(host: str, port: int) -> socket.socket:
    """A bound, listening socket; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets that say so, and without it every
    # answer written in two parts (headers, body) waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listening before uvicorn starts: a client that read the printed URL is queued, not refused.
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise DataeffError(f"serve: cannot listen on {host}:{port} ({e.strerror})") from None
    return sock


def serve(cfg: ServeConfig) -> None:
    """Serve until interrupted; prints ``dataeff serve: http://HOST:PORT/v1 (model NAME)`` once listening."""
    import uvicorn

    app = build_app(cfg)
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, access_log=False))
    print(f"dataeff serve: http://{host}:{port}/v1 (model {app.state.served})", flush=True)
    server.run(sockets=[sock])
