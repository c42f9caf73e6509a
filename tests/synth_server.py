"""A fault-injecting test server that answers the synthetic-data producers' prompts the way a capable model
would, deterministically: the entity prompt with a JSON summary and the document's capitalised words as
entities (none for a document without any), relation prompts with a text naming their entities, rephrase
prompts with the passage itself (lower-cased for the easy style; an unrelated sentence for a passage
marked ``[garble]``), judge prompts with a verdict. Fault markers
and request counts are :class:`FaultServer`'s."""

from __future__ import annotations

import json
import re
from typing import Any

from llm_fault_server import FaultServer, first_user

_CAPITALISED = re.compile(r"\b[A-Z][a-z]+\b")


def _document(user: str) -> str:
    return user.split("Document:\n", 1)[-1].split("\n\nEntities of the document:", 1)[0]


class SynthServer(FaultServer):
    def completion(self, body: dict[str, Any], n: int) -> dict[str, Any]:
        answer = super().completion(body, n)
        system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
        user = first_user(body["messages"])
        if "salient entities" in system:
            entities = list(dict.fromkeys(_CAPITALISED.findall(user)))
            text = json.dumps({"summary": f"A summary of {user.split('.')[0]}.", "entities": entities})
        elif "entities to discuss:" in user:
            focus = user.rsplit("entities to discuss: ", 1)[1].strip()
            text = f"How {focus} relate in the document {_document(user)[:40]!r}."
        elif "Passage to rewrite:\n" in user:
            chunk = user.rsplit("Passage to rewrite:\n", 1)[1]
            if "[garble]" in chunk:
                text = "Bananas are a yellow fruit that grows in warm places and tastes sweet."
            else:
                text = chunk.lower() if "small child" in system else chunk
        elif "Rewrite:\n" in user:
            source, rewrite = user.split("Passage:\n", 1)[1].split("\n\nRewrite:\n", 1)
            text = json.dumps({"verdict": "faithful" if rewrite.strip().lower() == source.strip().lower()
                               else "unfaithful", "reason": "compared word by word"})
        elif "Text:\n" in user:
            text = json.dumps({"verdict": "non_factual" if "false" in user.split("Text:\n", 1)[1] else "factual",
                               "reason": "checked"})
        else:
            return answer
        answer["choices"][0]["message"]["content"] = text
        return answer
