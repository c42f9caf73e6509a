"""Rephrasing against a test server on 127.0.0.1: styles, chunk-wise autoregressive rewriting, the fidelity
check (LLM judge; the embedding check in test_rephrase_embedding.py), resume, context refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from synth_server import SynthServer

from dataeff.errors import DataeffError
from dataeff.generate.llm import LLMConfig
from dataeff.synth.documents import chunk_text
from dataeff.synth.rephrase import FidelityConfig, RephraseConfig, rephrase_job

LONG = ("The ship left the dock at noon. Its captain was calm. The sea was grey and cold. Gulls followed the "
        "wake for an hour. Then the wind rose and the crew took in sail. By night the storm had passed.")
DOCS = [LONG, "A short note [garble] about nothing much."]


def _input(tmp_path: Path, docs: list[str] = DOCS) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def _config(server: SynthServer, tmp_path: Path, **over) -> RephraseConfig:
    llm = LLMConfig(base_url=server.url, model="m", api_key_env="", cache=str(tmp_path / "cache.sqlite"),
                    progress=False, backoff_initial=0.01, backoff_jitter=0.0, max_tokens=64, timeout=30,
                    connect_timeout=10, **over.pop("llm", {}))
    source = over.pop("input") if "input" in over else _input(tmp_path)
    fidelity = FidelityConfig(**over.pop("fidelity", {"method": "judge"}))
    return RephraseConfig(input=str(source), llm=llm, chunk_words=over.pop("chunk_words", 12), fidelity=fidelity,
                          **over)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_long_documents_are_rewritten_chunk_by_chunk_with_the_previous_rewrite_as_context(tmp_path):
    chunks = chunk_text(LONG, 12)
    assert len(chunks) == 5
    with SynthServer() as server:
        metrics = rephrase_job(_config(server, tmp_path, styles=["easy", "medium"]), tmp_path / "out")
        bodies = [b for prompt, bs in server.bodies.items() if "Passage to rewrite" in prompt for b in bs]
    kept = _records(tmp_path / "out" / "corpus.jsonl")
    [easy, medium] = [r for r in kept if r["doc_id"] == "docs:0"]
    assert medium["text"] == "\n\n".join(chunks) and easy["text"] == "\n\n".join(c.lower() for c in chunks)
    assert medium["chunks"] == 5 and medium["seed_text"] == LONG and medium["style"] == "medium"
    assert medium["prompt"] == "rephrase_medium_v1" and medium["fidelity"]["verdicts"] == ["faithful"] * 5
    # Chunk k's request carries the end of chunk k-1's rewrite (in its own style), the first none.
    easy_users = [b["messages"][-1]["content"] for b in bodies if "small child" in b["messages"][0]["content"]]
    for k, chunk in enumerate(chunks):
        [user] = [u for u in easy_users if u.endswith(chunk)]
        assert ("so far ends as follows" in user) == (k > 0)
        if k:
            assert chunks[k - 1].lower() in user
    assert metrics["rewrites"] == 4 and metrics["kept"] == 2 and metrics["rejected"] == 2
    assert metrics["rejection_rate"] == 0.5 and metrics["chunks"] == 2 * (5 + 1)
    rejected = _records(tmp_path / "out" / "rejected.jsonl")
    assert {r["doc_id"] for r in rejected} == {"docs:1"} and rejected[0]["fidelity"]["verdicts"] == ["unfaithful"]


def test_a_rerun_sends_nothing_and_writes_the_same_corpus(tmp_path):
    with SynthServer() as server:
        rephrase_job(_config(server, tmp_path, styles=["qa"]), tmp_path / "out")
        first = (tmp_path / "out" / "corpus.jsonl").read_text()
        before = dict(server.counts)
        again = rephrase_job(_config(server, tmp_path, styles=["qa"]), tmp_path / "out")
        assert dict(server.counts) == before
    assert again["sent"] == 0 and again["cached"] == again["requests"] and first
    assert (tmp_path / "out" / "corpus.jsonl").read_text() == first


def test_a_user_prompt_file_is_a_style_and_samples_are_kept_apart(tmp_path):
    style = tmp_path / "pirate.txt"
    style.write_text("Rewrite the passage as a pirate would tell it.\n=== user ===\n{chunk}\n")
    with SynthServer() as server:
        metrics = rephrase_job(_config(server, tmp_path, styles=[str(style)], samples=2, fidelity={"method": "off"},
                                       input=_input(tmp_path, ["One plain sentence here."])), tmp_path / "out")
        assert server.counts["One plain sentence here."] == 2  # two samples, two requests
    records = _records(tmp_path / "out" / "corpus.jsonl")
    assert [r["sample_index"] for r in records] == [0, 1] and {r["prompt"] for r in records} == {"pirate"}
    assert metrics["kept"] == 2 and metrics["rejection_rate"] == 0.0
    with pytest.raises(DataeffError, match="no such prompt file"):
        rephrase_job(_config(server, tmp_path, styles=["poetic"]), tmp_path / "bad")


def test_a_chunk_over_the_context_fails_its_document_with_the_sizes(tmp_path):
    with SynthServer() as server:
        metrics = rephrase_job(_config(server, tmp_path, context=150, chunk_words=200,
                                       input=_input(tmp_path, [LONG + " " + "more words here " * 40, "Fine."])),
                               tmp_path / "out")
    assert metrics["failed"] == 1 and metrics["kept"] == 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert any("context is 150 tokens" in e for e in manifest["errors"])


def test_the_budget_stops_between_chunks_and_a_rerun_continues(tmp_path):
    with SynthServer() as server:
        with pytest.raises(DataeffError, match="stopped early"):
            rephrase_job(_config(server, tmp_path, llm={"budget_tokens": 700}, fidelity={"method": "off"}),
                         tmp_path / "out")
        before = dict(server.counts)
        done = rephrase_job(_config(server, tmp_path, fidelity={"method": "off"}), tmp_path / "out")
        again = {p: n - before.get(p, 0) for p, n in server.counts.items() if n - before.get(p, 0)}
    assert done["complete"] and done["kept"] == 2 and all(n == 1 for n in again.values())
    assert not any(p in again for p in before) and done["cached"] == sum(before.values())
