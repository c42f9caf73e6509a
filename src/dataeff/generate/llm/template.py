"""The chat-to-text template for base (non-chat) models: dataeff runs and ensembles, and Hugging Face models
whose tokenizer has no chat template of its own.

A conversation becomes one document::

    {system message, if any}

    User: {user message}

    Assistant: {assistant message}

    User: {user message}

    Assistant:

Turns are separated by a blank line; the model continues after the final ``Assistant:``. Generation ends at
the end-of-document token or when the model starts a new user turn (``STOP``); the answer is the text up to
there, stripped of surrounding whitespace. Base models follow this only as well as their training data lets
them: for text continuation, send one user message and read the answer as its continuation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

STOP = ("\nUser:",)
_ROLE = {"user": "User", "assistant": "Assistant"}


def chat_to_text(messages: Sequence[Mapping[str, str]]) -> str:
    parts = [m["content"] if m["role"] == "system" else f"{_ROLE[m['role']]}: {m['content']}" for m in messages]
    parts.append("Assistant:")
    return "\n\n".join(parts)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its first stop sequence, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
