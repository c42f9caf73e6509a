"""Configs of the generation client (:class:`LLMConfig`) and of the ``dataeff llm`` command (:class:`LLMJobConfig`).

Every limit that protects a bill lives here: concurrency, requests and tokens per minute, bounded retries,
timeouts, prices, a hard budget, the error-rate stop. The API key itself never does: only the *name* of the
environment variable holding it (``api_key_env``), so configs, manifests and cache keys stay free of secrets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from dataeff.config import option, section
from dataeff.errors import DataeffError

Backend = Literal["openai", "local"]
JsonMode = Literal["json_schema", "json_object", "off"]


@dataclass
class LLMConfig:
    backend: Backend = option("openai", "openai: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, "
                                        "llama.cpp, `dataeff serve`, hosted APIs); local: a model on this machine")
    model: str = option("", "openai: the model name the server knows; local: a dataeff run directory, an "
                            "ensemble.json, or a Hugging Face causal-LM directory")
    base_url: str = option("https://api.openai.com/v1", "openai: the endpoint's base URL, ending in /v1")
    api_key_env: str = option("OPENAI_API_KEY", "openai: the environment variable holding the API key "
                                                "('' for a server that needs none, such as a local vLLM)")
    http: Literal["aiohttp", "httpx"] = option("aiohttp", "openai: the SDK's HTTP transport: aiohttp (about half the "
                                                          "CPU per request; openai[aiohttp]) or httpx (the SDK's default)")
    concurrency: int = option(16, "requests in flight at once")
    rpm: float = option(0.0, "requests per minute at most (0: no limit until the server's rate-limit headers set one)")
    tpm: float = option(0.0, "tokens per minute at most, prompt plus completion (0: no limit until the server's headers set one)")
    max_retries: int = option(5, "retries of one request after its first attempt, on 429, 5xx, timeouts, dropped "
                                 "connections and malformed responses")
    backoff_initial: float = option(1.0, "seconds before the first retry; doubles on every retry")
    backoff_max: float = option(60.0, "longest wait between two attempts, in seconds (Retry-After excepted)")
    backoff_jitter: float = option(1.0, "random seconds added to every backoff, so retries do not synchronise")
    retry_after_max: float = option(300.0, "longest server-requested wait (Retry-After) honoured, in seconds")
    timeout: float = option(120.0, "seconds one attempt may take in total, slow streams included")
    connect_timeout: float = option(10.0, "seconds to open a connection")
    temperature: float = option(1.0, "sampling temperature (a request's params may override it)")
    top_p: float = option(1.0, "nucleus sampling mass (a request's params may override it)")
    max_tokens: int = option(512, "completion tokens per answer at most (a request's params may override it)")
    stop: list[str] = option([], "stop sequences")
    seed: int | None = option(None, "sampling seed; a request sends seed + its sample index, so repeated samples "
                                    "of one prompt differ yet reproduce")
    json_mode: JsonMode = option("json_schema", "how a request with a schema asks for JSON: json_schema (the "
                                               "schema as response_format, which vLLM, OpenAI and `dataeff serve` "
                                               "decode under), json_object, or off (prompt only)")
    max_reasks: int = option(2, "times an answer that fails its schema is re-asked, with the error, before the "
                                "request counts as failed")
    prices: dict[str, Any] = option({}, "USD per million tokens by model name: {MODEL: {input: X, output: Y}}")
    batch_discount: float = option(0.5, "price factor of batch-mode answers (the OpenAI Batch API bills half)")
    budget_usd: float = option(0.0, "stop before the job's answers could cost more than this (0: no limit)")
    budget_tokens: int = option(0, "stop before the job's answers could use more tokens than this (0: no limit)")
    cache: str = option("llm_cache.sqlite", "the SQLite answer cache; a rerun sends only what it lacks")
    error_window: int = option(20, "the error-rate stop looks at this many most recent finished requests")
    max_error_rate: float = option(0.5, "stop the job when more than this share of the recent window failed")
    batch: bool = option(False, "send through the provider's Batch API (upload JSONL, poll, download) instead")
    batch_max_requests: int = option(50000, "requests per submitted batch at most")
    batch_poll_interval: float = option(30.0, "seconds between two polls of a submitted batch")
    batch_window: str = option("24h", "the Batch API's completion window")
    batch_wait: bool = option(True, "wait for submitted batches; false returns once they are submitted (a "
                                    "rerun polls them)")
    device: str = option("auto", "local: auto, cpu, cuda or mps")
    dtype: Literal["auto", "bf16", "fp32"] = option("auto", "local: bf16 (autocast), fp32, or auto: bf16 where the device computes it natively, else fp32")
    batch_size: int = option(16, "local: sequences decoded together")
    progress: bool = option(True, "show a progress bar with tokens, cost and ETA")

    def __post_init__(self) -> None:
        positive = {"concurrency": self.concurrency, "max_tokens": self.max_tokens, "timeout": self.timeout,
                    "connect_timeout": self.connect_timeout, "error_window": self.error_window,
                    "batch_max_requests": self.batch_max_requests, "batch_size": self.batch_size,
                    "batch_poll_interval": self.batch_poll_interval}
        for name, value in positive.items():
            if not value > 0:
                raise DataeffError(f"llm.{name}: {value} must be positive")
        non_negative = {"rpm": self.rpm, "tpm": self.tpm, "max_retries": self.max_retries,
                        "backoff_initial": self.backoff_initial, "backoff_max": self.backoff_max,
                        "backoff_jitter": self.backoff_jitter, "retry_after_max": self.retry_after_max,
                        "max_reasks": self.max_reasks, "budget_usd": self.budget_usd,
                        "budget_tokens": self.budget_tokens, "batch_discount": self.batch_discount}
        for name, value in non_negative.items():
            if not (math.isfinite(value) and value >= 0):
                raise DataeffError(f"llm.{name}: {value} must be a number >= 0")
        if not 0 <= self.max_error_rate <= 1:
            raise DataeffError(f"llm.max_error_rate: {self.max_error_rate} must be in [0, 1]")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise DataeffError(f"llm.temperature: {self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise DataeffError(f"llm.top_p: {self.top_p} must be in (0, 1]")
        if self.backend == "local" and self.batch:
            raise DataeffError("llm.batch: batch mode needs a provider's Batch API; the local backend has none")
        for model, price in self.prices.items():
            if not isinstance(price, dict) or set(price) - {"input", "output"} or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in price.values()
            ):
                raise DataeffError(f"llm.prices.{model}: expected {{input: USD per 1M prompt tokens, output: USD per "
                                   f"1M completion tokens}}, got {price!r}")


@dataclass
class LLMJobConfig:
    llm: LLMConfig = section(LLMConfig, "the generation client")
    requests: str = option("", "a JSONL file of requests, one per line: {messages: [...]} or {prompt: TEXT}, "
                               "optional sample_index, prompt_version, params and json (true: the answer must be JSON)")
    out: str = option("", "the JSONL file of results, one per request in order (written atomically)")
    manifest: str = option("", "the job's manifest JSON (default: OUT with .manifest.json)")
