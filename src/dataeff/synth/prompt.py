"""Versioned prompt files of the LLM-driven producers (EntiGraph, rephrasing, judges).

A prompt file is a system message, a line ``=== user ===``, and the user message: a template whose
placeholders are ``{name}`` for the names its producer fills (``{document}``, ``{chunk}``, ...). Only those
names are replaced, so braces elsewhere (a JSON example) stay as written. The packaged prompts live in
``dataeff/synth/prompts/NAME.txt``; any setting that names one also takes a path to a file of the same shape.

A prompt's **version** is its name and the SHA-256 of its bytes; it goes into every request's cache key
(``Request.prompt_version``), so editing a prompt file retires the answers to its old wording and nothing
else, and into every output record's provenance.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from dataeff.errors import DataeffError

PROMPTS = Path(__file__).resolve().parent / "prompts"
USER_MARKER = "=== user ==="
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True)
class Prompt:
    name: str
    path: Path
    system: str
    user: str
    sha256: str

    @property
    def version(self) -> str:
        return f"{self.name}@{self.sha256[:16]}"

    def messages(self, values: Mapping[str, str]) -> list[dict[str, str]]:
        """The chat messages with ``values`` filled in (every placeholder has a value: :func:`load_prompt`
        checked them)."""
        user = _PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), self.user)
        out = [{"role": "system", "content": self.system}] if self.system else []
        return [*out, {"role": "user", "content": user}]

    def provenance(self) -> dict[str, str]:
        return {"prompt": self.name, "prompt_sha256": self.sha256, "prompt_version": self.version}


def load_prompt(spec: str, required: Collection[str], setting: str, optional: Collection[str] = ()) -> Prompt:
    """The prompt ``spec`` names: a packaged prompt's name (``entigraph_entities_v1``) or a file path.

    ``required`` are the names the producer fills and the template must use, ``optional`` those it may use; a
    file missing one or using another is refused with ``setting`` (the config field that named it).
    """
    path = Path(spec).expanduser()
    if not path.is_file():
        packaged = PROMPTS / f"{spec}.txt"
        if not packaged.is_file():
            known = ", ".join(sorted(p.stem for p in PROMPTS.glob("*.txt")))
            raise DataeffError(f"{setting}={spec!r}: no such prompt file, nor a packaged prompt (packaged: {known})")
        path = packaged
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataeffError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    lines = text.split("\n")
    marks = [i for i, line in enumerate(lines) if line.strip() == USER_MARKER]
    if len(marks) != 1:
        raise DataeffError(f"{path}: expected one line '{USER_MARKER}' between the system message and the user "
                           f"template, found {len(marks)}")
    system, user = "\n".join(lines[: marks[0]]).strip(), "\n".join(lines[marks[0] + 1 :]).strip()
    used = set(_PLACEHOLDER.findall(user))
    line_of = {name: marks[0] + 2 + i for i, row in enumerate(lines[marks[0] + 1 :]) for name in _PLACEHOLDER.findall(row)}
    filled = ", ".join("{" + p + "}" for p in sorted({*required, *optional}))
    unknown = sorted(used - {*required, *optional})
    if unknown:
        raise DataeffError(f"{path}:{line_of[unknown[0]]}: unknown placeholder {{{unknown[0]}}}; {setting} fills {filled}")
    missing = sorted(set(required) - used)
    if missing:
        raise DataeffError(f"{path}: the user template has no {{{missing[0]}}}; {setting} fills {filled}")
    # The stem, not the path: the same file elsewhere keeps its version, and so its cached answers.
    return Prompt(path.stem, path, system, user, hashlib.sha256(raw).hexdigest())
