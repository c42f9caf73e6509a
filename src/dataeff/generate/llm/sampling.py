"""Sampling settings and completions of local generation, shared by :mod:`~dataeff.generate.llm.local` and
the test model of ``dataeff serve`` (kept free of torch, so the test model starts in a moment)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dataeff.generate.llm.retry import ContextTooLong


@dataclass(frozen=True)
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

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
