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


def sketch(schema: Any, defs: dict[str, Any] | None = None, depth: int = 0) -> str:
    """A JSON Schema in a few tokens, as the shape of a value: ``{"summary": string, "entities": [string]}``.

    What a re-ask reminds the model of: the full schema again can outgrow a short context, and the model
    has already been told the task."""
    if not isinstance(schema, dict) or depth > 4:
        return "value"
    defs = {**(defs or {}), **schema.get("$defs", {})}
    if isinstance(ref := schema.get("$ref"), str) and ref.rsplit("/", 1)[-1] in defs:
        return sketch(defs[ref.rsplit("/", 1)[-1]], defs, depth + 1)
    if "enum" in schema:
        return "|".join(json.dumps(v) for v in schema["enum"])
    options = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(options, list):
        return " or ".join(sketch(o, defs, depth + 1) for o in options)
    kind = schema.get("type")
    if kind == "object" and isinstance(props := schema.get("properties"), dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {sketch(v, defs, depth + 1)}" for k, v in props.items()) + "}"
    if kind == "array":
        return f"[{sketch(schema.get('items'), defs, depth + 1)}, ...]"
    return kind if isinstance(kind, str) else "value"


def reask_message(error: str, schema: Schema) -> str:
    """The re-ask after an answer failed its schema: the error and the shape, short enough for a small context."""
    return f"That answer {error}. Reply with only JSON of this shape: {sketch(schema_json(schema))}"
