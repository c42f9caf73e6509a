"""EntiGraph against a test server on 127.0.0.1: entities, then pair and triple texts, provenance, resume,
budgets, documents without entities or too long for the context, failed entity calls, prompt files."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import pytest
from synth_server import SynthServer

from dataeff.errors import DataeffError
from dataeff.generate.llm import LLMConfig
from dataeff.generate.llm.schema import schema_json
from dataeff.synth.documents import chunk_text, read_documents
from dataeff.synth.entigraph import EntiGraphConfig, bounded_entities, clean_entities, entigraph_job
from dataeff.synth.prompt import PROMPTS, load_prompt

DOCS = [
    "Alice met Bob in Paris. They talked for hours.",
    "nothing here is named at all, only small words.",
    "Carol sailed from Lisbon to Oslo with Dave.",
]


def _input(tmp_path: Path, docs: list[str] = DOCS) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def _config(server: SynthServer, tmp_path: Path, **over) -> EntiGraphConfig:
    llm = LLMConfig(base_url=server.url, model="m", api_key_env="", cache=str(tmp_path / "cache.sqlite"),
                    progress=False, backoff_initial=0.01, backoff_jitter=0.0, max_tokens=64, timeout=30,
                    connect_timeout=10, **over.pop("llm", {}))
    source = over.pop("input") if "input" in over else _input(tmp_path)
    return EntiGraphConfig(input=str(source), llm=llm, triples=over.pop("triples", 2), **over)


def _records(out: Path, name: str = "corpus.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text(encoding="utf-8").splitlines()]


def test_entities_then_every_pair_and_sampled_triples_with_provenance(tmp_path):
    with SynthServer() as server:
        metrics = entigraph_job(_config(server, tmp_path), tmp_path / "out")
        sent = sum(server.counts.values())
    records = _records(tmp_path / "out")
    docs = {d["doc_id"]: d for d in _records(tmp_path / "out", "documents.jsonl")}
    assert [d["status"] for d in docs.values()] == ["done", "no_entities", "done"]
    assert docs["docs:0"]["entities"] == ["Alice", "Bob", "Paris", "They"]
    assert docs["docs:2"]["entities"] == ["Carol", "Lisbon", "Oslo", "Dave"]
    # The document without entities gets its summary and no relation call.
    assert docs["docs:1"]["relations_planned"] == 0
    assert not any("nothing here" in p and "discuss" in p for p in server.counts)
    pairs = [r for r in records if r["kind"] == "pair"]
    triples = [r for r in records if r["kind"] == "triple"]
    assert len(pairs) == 2 * comb(4, 2) and len(triples) == 2 * 2
    for r in pairs + triples:
        assert all(e in r["text"] for e in r["entities"])  # the answer to *this* pair or triple
        assert r["model"] == "m" and r["prompt"] in ("entigraph_pair_v1", "entigraph_triple_v1")
        assert r["prompt_version"].startswith(r["prompt"] + "@") and len(r["prompt_sha256"]) == 64
    assert {frozenset(r["entities"]) for r in pairs if r["doc_id"] == "docs:0"} == \
        {frozenset(p) for p in [("Alice", "Bob"), ("Alice", "Paris"), ("Alice", "They"), ("Bob", "Paris"),
                                ("Bob", "They"), ("Paris", "They")]}
    assert [r["kind"] for r in records if r["doc_id"] == "docs:1"] == ["summary"]
    assert metrics["relation_texts"] == 16 and metrics["entities"] == 8 and metrics["statuses"] == \
        {"done": 2, "no_entities": 1}
    assert sent == 3 + 16 and metrics["sent"] == sent and metrics["cached"] == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["metrics"] == metrics and manifest["jobs"]["relations"]["answered"] == 16


def test_a_rerun_answers_from_the_cache_and_rewrites_the_same_corpus(tmp_path):
    with SynthServer() as server:
        entigraph_job(_config(server, tmp_path), tmp_path / "out")
        first = (tmp_path / "out" / "corpus.jsonl").read_text()
        before = dict(server.counts)
        again = entigraph_job(_config(server, tmp_path), tmp_path / "out")
        assert dict(server.counts) == before  # nothing sent again
    assert again["cached"] == again["requests"] == 19 and again["sent"] == 0 and again["new_tokens"] == 0
    assert (tmp_path / "out" / "corpus.jsonl").read_text() == first


def test_triples_are_a_seeded_sample(tmp_path):
    docs = ["Ann Ben Cid Dan Eve Fay Gus went home."]

    def triples(seed: int, out: str) -> list[tuple[str, ...]]:
        entigraph_job(_config(server, tmp_path, input=_input(tmp_path, docs), triples=5, pairs=False, seed=seed),
                      tmp_path / out)
        return [tuple(r["entities"]) for r in _records(tmp_path / out) if r["kind"] == "triple"]

    with SynthServer() as server:
        a, b, c = triples(0, "a"), triples(0, "b"), triples(1, "c")
    assert a == b and len(a) == len(set(a)) == 5 and set(a) != set(c)
    assert all(len(set(t)) == 3 for t in a)


def test_the_document_budget_caps_relation_calls_and_the_job_budget_stops_resumably(tmp_path):
    with SynthServer() as server:
        capped = entigraph_job(_config(server, tmp_path, doc_token_budget=250), tmp_path / "capped")
        docs = _records(tmp_path / "capped", "documents.jsonl")
        assert 0 < docs[0]["relations_planned"] < comb(4, 2) + 2 and docs[0]["over_budget"] > 0
        assert capped["relations_over_budget"] == sum(d["over_budget"] for d in docs)

        # A job budget that runs out among the relation calls: the finished ones are written, the rest resume.
        with pytest.raises(DataeffError, match=r"stopped early .*budget"):
            entigraph_job(_config(server, tmp_path, llm={"budget_tokens": 1500, "concurrency": 1}), tmp_path / "out")
        partial = _records(tmp_path / "out")
        assert 0 < sum(r["kind"] != "summary" for r in partial) < 16
        assert json.loads((tmp_path / "out" / "manifest.json").read_text())["metrics"]["complete"] is False
        before = dict(server.counts)
        done = entigraph_job(_config(server, tmp_path, llm={"concurrency": 1}), tmp_path / "out")
        again = {p: n - before.get(p, 0) for p, n in server.counts.items() if n - before.get(p, 0)}
    assert done["complete"] and done["relation_texts"] == 16
    assert done["cached"] >= len(partial) and all(n == 1 for n in again.values())
    assert not any(p in again for p in before)  # nothing answered before the stop was sent again
    texts = [r["text"] for r in _records(tmp_path / "out")]
    assert len(texts) == len(set(texts)) == 19


def test_a_prompt_over_the_context_is_refused_with_sizes_and_never_sent(tmp_path):
    docs = ["Zed went out. " + "and then more words " * 200, "Amy and Bo ran."]
    with SynthServer() as server:
        metrics = entigraph_job(_config(server, tmp_path, input=_input(tmp_path, docs), context=600,
                                        entity_max_tokens=100), tmp_path / "out")
        assert not any(p.startswith("Zed") for p in server.counts)
    long, short = _records(tmp_path / "out", "documents.jsonl")
    assert long["status"] == "too_long" and "context is 600 tokens" in long["error"]
    assert "prompt" in long["error"] and "100 for the completion" in long["error"]
    assert short["status"] == "done" and metrics["relation_texts"] == 1


def test_long_documents_split_into_sections(tmp_path):
    text = " ".join(f"Name{i} walked far." for i in range(30))
    with SynthServer() as server:
        entigraph_job(_config(server, tmp_path, input=_input(tmp_path, [text]), split_words=20, pairs=False,
                              triples=0), tmp_path / "out")
    ids = [d["doc_id"] for d in _records(tmp_path / "out", "documents.jsonl")]
    assert ids == [f"docs:0#{k}" for k in range(5)]


def test_failed_entity_calls_are_bounded_and_recorded_then_retried_by_a_rerun(tmp_path):
    docs = ["Ann met Ben. [500*1]", "Cat saw Dan. [badjson*3]"]
    with SynthServer() as server:
        metrics = entigraph_job(_config(server, tmp_path, input=_input(tmp_path, docs), triples=0,
                                        llm={"max_reasks": 1}), tmp_path / "out")
        retried, bad = _records(tmp_path / "out", "documents.jsonl")
        assert retried["status"] == "done" and server.counts[docs[0]] == 2
        assert bad["status"] == "failed" and "schema" in bad["error"] and server.counts[docs[1]] == 2
        assert metrics["statuses"] == {"done": 1, "failed": 1}
        again = entigraph_job(_config(server, tmp_path, input=_input(tmp_path, docs), triples=0), tmp_path / "out")
        # The rerun asks again (a third bad answer, then a re-ask that passes); the finished document is cached.
        assert server.counts[docs[1]] == 4 and server.counts[docs[0]] == 2
    assert again["statuses"] == {"done": 2} and again["relation_texts"] == 2


def test_prompts_are_versioned_files_overridable_by_path(tmp_path):
    packaged = load_prompt("entigraph_entities_v1", {"document"}, "entities_prompt")
    assert packaged.path == PROMPTS / "entigraph_entities_v1.txt" and packaged.system
    mine = tmp_path / "entities_mine.txt"
    mine.write_text(packaged.path.read_text().replace("salient entities", "salient entities, briefly,"))
    with SynthServer() as server:
        entigraph_job(_config(server, tmp_path, triples=0), tmp_path / "a")
        before = sum(server.counts.values())
        entigraph_job(_config(server, tmp_path, triples=0, entities_prompt=str(mine)), tmp_path / "b")
        # A new wording is a new prompt version: its entity calls are sent, the relation calls (same prompts,
        # same entities) come from the cache.
        assert sum(server.counts.values()) == before + 3
    [summary] = [r for r in _records(tmp_path / "b") if r["doc_id"] == "docs:0" and r["kind"] == "summary"]
    assert summary["prompt"] == "entities_mine" and summary["prompt_sha256"] != packaged.sha256

    bad = tmp_path / "bad.txt"
    bad.write_text("system\n=== user ===\n{document} {title}\n")
    with pytest.raises(DataeffError, match=r"bad.txt:3: unknown placeholder \{title\}"):
        load_prompt(str(bad), {"document"}, "entities_prompt")
    with pytest.raises(DataeffError, match="no such prompt file"):
        load_prompt("entigraph_nope", {"document"}, "entities_prompt")


def test_the_bounded_schema_bounds_the_answer_and_validation_stays_lenient():
    schema = schema_json(bounded_entities(40, 3))
    assert list(schema["properties"]) == ["summary", "entities"] and schema["additionalProperties"] is False
    entities = schema["properties"]["entities"]
    assert schema["properties"]["summary"]["maxLength"] == 40
    assert entities["maxItems"] == 3 and entities["items"]["maxLength"] == 60
    # An endpoint that ignores the bounds is cleaned, not refused.
    parsed = bounded_entities(40, 3).model_validate({"summary": "x" * 100, "entities": [f"E{i}" for i in range(5)]})
    assert len(parsed.summary) == 100 and clean_entities(parsed.entities, 3) == ["E0", "E1", "E2"]


def test_clean_entities_drops_blanks_repeats_and_sentences():
    assert clean_entities([" Ann ", "ann", "", "Ben  Cole", "x" * 300, "Cid"], 2) == ["Ann", "Ben Cole"]


def test_the_quality_articles_are_an_input(data_dir):
    docs = read_documents("quality", limit=3)
    assert [d.id for d in docs] == ["quality:0", "quality:1", "quality:2"]
    assert docs[0].text.startswith("LOST IN TRANSLATION") and len(docs[0].text.split()) > 2000
    assert len(read_documents("quality")) == 15
    sections = read_documents("quality", limit=1, split_words=300)
    assert len(sections) > 5 and all(len(s.text.split()) <= 300 for s in sections)
    assert " ".join(s.text for s in sections).split() == docs[0].text.split()


def test_chunks_end_at_sentences_and_keep_every_word():
    text = "One two three. Four five six seven. " + " ".join(f"w{i}" for i in range(12)) + ". End."
    chunks = chunk_text(text, 5)
    assert chunks[:2] == ["One two three.", "Four five six seven."]
    assert all(len(c.split()) <= 5 for c in chunks) and " ".join(chunks).split() == text.split()


def test_the_example_configs_load():
    from dataeff.config import load
    from dataeff.synth.judge import JudgeConfig
    from dataeff.synth.rephrase import RephraseConfig

    configs = Path(__file__).resolve().parents[1] / "configs"
    vllm = load(EntiGraphConfig, configs / "entigraph_vllm.yaml")
    assert vllm.input == "quality" and vllm.llm.base_url.endswith("/v1") and vllm.llm.budget_tokens > 0
    assert load(EntiGraphConfig, configs / "entigraph_quality.yaml").split_words > 0
    assert load(RephraseConfig, configs / "rephrase_quality.yaml").fidelity.method == "embedding"
    assert load(JudgeConfig, configs / "judge_vllm.yaml").llm.model
