"""Sampling settings and completions of local generation, shared by :mod:`~dataeff.generate.llm.local` and
the test model of ``dataeff serve`` (kept free of torch, so the test model starts in a moment)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import llguidance

from dataeff.generate.llm.retry import ContextTooLong

_ANY_OBJECT = '{"type":"object"}'


def json_schema_of(response_format: Any, guided_json: Any = None) -> str | None:
    """The JSON Schema (as compact JSON text, keys in their given order) an answer must match, from OpenAI's
    ``response_format`` (``json_schema`` or ``json_object``) or vLLM's ``guided_json``; ``None`` for free text.
    ``ValueError`` naming the field for one that cannot be honoured, such as a schema keyword the grammar
    engine lacks."""
    if guided_json is not None:
        schema, where = (json.loads(guided_json) if isinstance(guided_json, str) else guided_json), "guided_json"
    elif response_format is None:
        return None
    elif not isinstance(response_format, Mapping):
        raise ValueError(f"response_format: expected an object such as {{\"type\": \"json_object\"}}, got "
                         f"{response_format!r}")
    elif (kind := response_format.get("type")) == "text":
        return None
    elif kind == "json_object":
        return _ANY_OBJECT
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        where = "response_format.json_schema.schema"
    else:
        raise ValueError(f"response_format.type: {kind!r} is not one of text, json_object, json_schema")
    if not isinstance(schema, Mapping | bool):
        raise ValueError(f"{where}: expected a JSON Schema object, got {schema!r}")
    # Key order kept: the grammar writes an object's properties in the order the schema lists them, and a
    # schema puts first what the model should write first (a summary before the entities drawn from it).
    text = json.dumps(schema, separators=(",", ":"))
    problem = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(text))
    if problem:
        raise ValueError(f"{where}: {problem}")
    return text


@dataclass(frozen=True)
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    schema: str | None = None  # guided decoding: the JSON Schema the answer must match (json_schema_of)

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any], default_max_tokens: int) -> GenParams:
        stop = params.get("stop") or ()
        temperature, top_p, seed = params.get("temperature"), params.get("top_p"), params.get("seed")
        return cls(
            max_tokens=int(params.get("max_tokens") or default_max_tokens),
            temperature=1.0 if temperature is None else float(temperature),
            top_p=1.0 if top_p is None else float(top_p),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            seed=None if seed is None else int(seed),
            schema=json_schema_of(params.get("response_format"), params.get("guided_json")),
        )

    def check(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens {self.max_tokens} must be at least 1")
        if not self.temperature >= 0:
            raise ValueError(f"temperature {self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p {self.top_p} must be in (0, 1]")


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of document or a stop sequence) or "length"


def context_error(prompt_tokens: int, max_tokens: int, context: int) -> ContextTooLong:
    return ContextTooLong(f"this model's context is {context} tokens, but the request needs {prompt_tokens + max_tokens} "
                          f"({prompt_tokens} in the prompt, {max_tokens} for the completion)")
