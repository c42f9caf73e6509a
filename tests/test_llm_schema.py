"""JSON answers: validated against a pydantic schema, re-asked a bounded number of times, raw failures kept."""

from __future__ import annotations

import hashlib
from typing import Any

from llm_fault_server import FaultServer
from pydantic import BaseModel
from test_llm_client import ask, config

from dataeff.generate.llm import Cache, run_job
from dataeff.generate.llm.schema import validate


class Answer(BaseModel):
    answer: str
    n: int


def test_valid_json_is_parsed_and_the_schema_is_sent(tmp_path):
    with FaultServer() as server:
        job = run_job(config(server.url, tmp_path), [ask("[json] a", schema=Answer)])
        body = server.bodies["[json] a"][0]
    r = job.results[0]
    assert r.ok and r.parsed == Answer(answer=hashlib.sha256(b"[json] a").hexdigest()[:8], n=1)
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == Answer.model_json_schema()


def test_bad_answers_are_kept_and_re_asked_with_the_error_until_valid(tmp_path):
    prompt = "[json] [badjson*2] b"
    with FaultServer() as server:
        job = run_job(config(server.url, tmp_path, max_reasks=2), [ask(prompt, schema=Answer)])
        bodies = server.bodies[prompt]
    r = job.results[0]
    assert r.ok and r.parsed.n == 3 and len(bodies) == 3
    # Each re-ask shows the model its previous answer and what was wrong with it.
    second = bodies[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"].startswith("Sure! Here is the JSON")
    assert "Invalid JSON" in second[2]["content"] and '"answer"' in second[2]["content"]
    assert len(bodies[2]["messages"]) == 5
    assert (job.summary.reasks, job.summary.parse_failures, job.summary.failed) == (2, 2, 0)
    failures = Cache(tmp_path / "cache.sqlite").parse_failures(r.key)
    assert len(failures) == 2 and all(f["raw"].startswith("Sure! Here is the JSON") for f in failures)
    assert all("Invalid JSON" in str(f["error"]) and f["completion_tokens"] == 10 for f in failures)


def test_re_asks_are_bounded_and_the_request_fails_with_every_raw_answer_kept(tmp_path):
    prompt = "[json] [badjson*always] c"
    with FaultServer() as server:
        job = run_job(config(server.url, tmp_path, max_reasks=1), [ask(prompt, schema=Answer), ask("plain text")])
        assert server.counts[prompt] == 2
    bad, plain = job.results
    assert not bad.ok and "after 2 asks" in bad.error and "parse_failures" in bad.error
    assert plain.ok and plain.parsed is None
    assert len(Cache(tmp_path / "cache.sqlite").parse_failures(bad.key)) == 2
    # Failed parses were paid for: their tokens count towards the job's spend.
    assert job.summary.job_tokens == job.summary.prompt_tokens + job.summary.completion_tokens > 0


def test_cached_json_answers_are_validated_again_and_json_object_mode(tmp_path):
    with FaultServer() as server:
        cfg = config(server.url, tmp_path, json_mode="json_object")
        run_job(cfg, [ask("[json] d", schema=Answer)])
        again = run_job(cfg, [ask("[json] d", schema=Answer)])
        assert server.counts["[json] d"] == 1
        assert server.bodies["[json] d"][0]["response_format"] == {"type": "json_object"}
        # Another schema is another request: its answers are not reused.
        other = run_job(cfg, [ask("[json] d", schema=dict[str, Any])])
        assert server.counts["[json] d"] == 2
    assert again.results[0].cached and again.results[0].parsed == Answer(answer=again.results[0].parsed.answer, n=1)
    assert not other.results[0].cached and other.results[0].parsed["n"] == 2


def test_validate_accepts_fenced_json_and_explains_failures():
    assert validate(Answer, '```json\n{"answer": "x", "n": 2}\n```') == (Answer(answer="x", n=2), None)
    value, error = validate(Answer, '{"answer": "x"}')
    assert value is None and "n: Field required" in error
    assert validate(list[int], "[1, 2]") == ([1, 2], None)
