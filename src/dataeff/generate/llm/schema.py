"""JSON answers: the schema a request's answer must match, how it is asked for, and how an answer is checked.

A schema is anything pydantic's ``TypeAdapter`` takes: a ``BaseModel`` subclass, ``dict[str, Any]``,
``list[str]``, a ``TypedDict``. Answers are validated by pydantic after stripping a Markdown code fence, which
models often wrap JSON in. The schema's JSON Schema is part of the cache key, so changing a field changes
which answers are reused.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from pydantic import TypeAdapter, ValidationError

Schema = Any
_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_-]*\s*\n(.*?)\n?```\s*$", re.DOTALL)


@functools.lru_cache(maxsize=256)
def _adapter(schema: Schema) -> TypeAdapter[Any]:
    return TypeAdapter(schema)


def schema_json(schema: Schema) -> dict[str, Any]:
    return _adapter(schema).json_schema()


def schema_name(schema: Schema) -> str:
    name = getattr(schema, "__name__", None) or "answer"
    return re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:64]


def response_format(schema: Schema, mode: str) -> dict[str, Any] | None:
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": schema_name(schema), "schema": schema_json(schema)}}
    if mode == "json_object":
        return {"type": "json_object"}
    return None


def validate(schema: Schema, text: str) -> tuple[Any, str | None]:
    """``(value, None)`` for a valid answer, else ``(None, a one-line reason)``."""
    match = _FENCE.match(text)
    body = match.group(1) if match else text
    try:
        return _adapter(schema).validate_json(body), None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'answer'}: {err['msg']}" for err in e.errors()[:5])
        return None, f"does not match the schema: {problems}"


def reask_message(error: str, schema: Schema) -> str:
    return (f"That answer {error}. Reply again with only a JSON value matching this JSON Schema, and nothing "
            f"else:\n{json.dumps(schema_json(schema), separators=(',', ':'))}")
