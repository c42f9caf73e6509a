"""The generation client against a real HTTP server on 127.0.0.1 that injects faults and counts requests."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from llm_fault_server import FaultServer, ThreadServer

from dataeff.cli import main
from dataeff.errors import DataeffError
from dataeff.generate.llm import Cache, LLMConfig, Request, run_job
from dataeff.generate.serve import ServeConfig, build_app

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config(url: str, tmp_path: Path, **over: object) -> LLMConfig:
    base: dict[str, object] = {
        "base_url": url, "model": "m", "api_key_env": "", "cache": str(tmp_path / "cache.sqlite"), "max_retries": 2,
        "backoff_initial": 0.01, "backoff_max": 0.05, "backoff_jitter": 0.01, "timeout": 10.0, "connect_timeout": 5.0,
        "progress": False, "concurrency": 4,
    }
    return LLMConfig(**{**base, **over})  # type: ignore[arg-type]


def ask(prompt: str, **kw: object) -> Request:
    return Request([{"role": "user", "content": prompt}], **kw)  # type: ignore[arg-type]


def test_results_in_order_repeats_kept_apart_and_rerun_sends_nothing(tmp_path):
    requests = [ask(f"prompt {i}") for i in range(5)] + [ask("again", sample_index=s) for s in range(3)] + [ask("prompt 0")]
    with FaultServer() as server:
        cfg = config(server.url, tmp_path)
        first = run_job(cfg, requests, manifest=tmp_path / "job.json")
        assert [r.index for r in first.results] == list(range(9))
        assert [r.text for r in first.results[:5]] == [f"answer 1 to prompt {i}" for i in range(5)]
        # Three intended repeats are three requests; an accidental duplicate (the last) is sent once.
        assert server.counts["again"] == 3 and server.counts["prompt 0"] == 1
        assert sorted(r.text for r in first.results[5:8]) == [f"answer {n} to again" for n in (1, 2, 3)]
        assert first.results[8].text == first.results[0].text
        s = first.summary
        assert (s.unique, s.answered, s.cached, s.sent, s.failed, s.stop_reason) == (8, 8, 0, 8, 0, "done")
        assert s.prompt_tokens == sum(len(r.messages[0]["content"].split()) for r in requests[:8])
        assert s.completion_tokens == 8 * server.completion_tokens

        again = run_job(cfg, requests, manifest=tmp_path / "job.json")
        assert sum(server.counts.values()) == 8  # nothing sent again
        assert [r.text for r in again.results] == [r.text for r in first.results]
        assert all(r.cached for r in again.results)
        assert (again.summary.cached, again.summary.sent, again.summary.job_tokens) == (8, 0, s.job_tokens)
    manifest = json.loads((tmp_path / "job.json").read_text())
    assert [r["summary"]["cached"] for r in manifest["runs"]] == [0, 8]
    assert manifest["summary"]["stop_reason"] == "done" and manifest["config"]["model"] == "m"


FAULTS = ["429", "500", "timeout", "drop", "truncated", "malformed", "html", "slow"]


@pytest.mark.parametrize("kind", FAULTS)
def test_every_fault_is_retried_and_attempts_are_bounded(tmp_path, kind):
    transient, permanent = f"[{kind}*2] transient", f"[{kind}*always] permanent"
    with FaultServer(retry_after=0.05, hang=2.0) as server:
        cfg = config(server.url, tmp_path, max_retries=2, timeout=0.5)  # shorter than the hang and the trickle
        job = run_job(cfg, [ask(transient), ask(permanent)])
        # Two faults then an answer: three attempts; a fault every time: max_retries + 1 attempts, then a failure.
        assert server.counts[transient] == 3 and server.counts[permanent] == 3
    ok, failed = job.results
    assert ok.ok and ok.text == f"answer 3 to {transient}" and ok.attempts == 3
    assert not failed.ok and failed.attempts == 3
    expected = {"429": "HTTP 429", "500": "HTTP 500", "timeout": "timed out", "drop": "connection dropped",
                "truncated": "not JSON", "malformed": "no choices", "html": "not JSON", "slow": "timed out"}[kind]
    assert expected in failed.error
    assert (job.summary.retries, job.summary.failed, job.summary.answered) == (4, 1, 1)


def test_retry_after_is_honoured(tmp_path):
    with FaultServer(retry_after=0.5) as server:
        job = run_job(config(server.url, tmp_path, backoff_initial=0.0, backoff_jitter=0.0), [ask("[429*1] wait")])
        first, second = server.times["[429*1] wait"]
    assert job.results[0].ok
    assert 0.5 <= second - first < 0.95  # waited once: not the backoff alone, nor Retry-After twice


def test_rate_limit_headers_slow_the_client_to_the_server_limit(tmp_path):
    n, rpm, burst = 24, 1200, 4  # the server allows 20 requests/s after a burst of 4
    with FaultServer(rpm=rpm, burst=burst) as server:
        start = time.monotonic()
        job = run_job(config(server.url, tmp_path, concurrency=burst), [ask(f"r {i}") for i in range(n)],
                      manifest=tmp_path / "job.json")
        elapsed = time.monotonic() - start
    assert all(r.ok for r in job.results)
    # The client adopted the server's limit from its headers and never ran into it.
    assert server.rejected == 0 and job.summary.sent == n
    assert elapsed >= 0.8 * (n - burst) / (rpm / 60)
    assert json.loads((tmp_path / "job.json").read_text())["limits"]["rpm"] == rpm


def test_error_rate_stops_the_job_early_with_a_summary(tmp_path):
    requests = [ask(f"[500*always] {i}") for i in range(40)]
    with FaultServer() as server:
        cfg = config(server.url, tmp_path, max_retries=1, error_window=5, max_error_rate=0.5, concurrency=2)
        job = run_job(cfg, requests)
        sent = sum(server.counts.values())
    s = job.summary
    assert s.stop_reason == "error_rate" and "HTTP 500" in s.stop_message and "5 requests failed" in s.stop_message
    assert 5 <= s.failed <= 5 + cfg.concurrency and s.not_run == 40 - s.failed
    # Each failed request had exactly max_retries + 1 attempts; one in flight at the stop may have had one.
    assert sent == s.sent and 2 * s.failed <= sent <= 2 * s.failed + cfg.concurrency
    assert all(r.error.startswith("not run") for r in job.results if not r.ok and r.attempts == 0)


def test_failed_requests_are_not_cached_and_are_sent_again(tmp_path):
    with FaultServer() as server:
        cfg = config(server.url, tmp_path, max_retries=0)
        first = run_job(cfg, [ask("[500*1] flaky"), ask("fine")])
        second = run_job(cfg, [ask("[500*1] flaky"), ask("fine")])
        assert server.counts["[500*1] flaky"] == 2 and server.counts["fine"] == 1
    assert not first.results[0].ok and second.results[0].ok and not second.results[0].cached
    assert second.results[1].cached


def test_missing_key_names_the_variable_and_the_key_is_never_stored(tmp_path, monkeypatch):
    monkeypatch.delenv("DATAEFF_TEST_KEY", raising=False)
    with FaultServer() as server:
        with pytest.raises(DataeffError, match="environment variable DATAEFF_TEST_KEY is not set"):
            run_job(config(server.url, tmp_path, api_key_env="DATAEFF_TEST_KEY"), [ask("x")])
        monkeypatch.setenv("DATAEFF_TEST_KEY", "sk-secret-4711")
        job = run_job(config(server.url, tmp_path, api_key_env="DATAEFF_TEST_KEY"), [ask("x")],
                      manifest=tmp_path / "job.json")
        assert job.results[0].ok and server.auth == {"Bearer sk-secret-4711"}
    for path in tmp_path.iterdir():
        assert b"sk-secret-4711" not in path.read_bytes(), path


def test_a_refused_key_stops_the_job_and_is_never_repeated(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAEFF_TEST_KEY", "sk-wrong-key-1234")
    with FaultServer() as server:
        job = run_job(config(server.url, tmp_path, api_key_env="DATAEFF_TEST_KEY", concurrency=2),
                      [ask(f"[401*always] {i}") for i in range(20)], manifest=tmp_path / "job.json")
        assert sum(server.counts.values()) <= 2  # one attempt per worker, never retried
    s = job.summary
    assert s.stop_reason == "refused" and "HTTP 401" in s.stop_message and "DATAEFF_TEST_KEY" in s.stop_message
    assert "[api key]" in s.stop_message and "sk-wrong" not in s.stop_message
    assert all("sk-wrong" not in (r.error or "") for r in job.results)
    assert b"sk-wrong" not in (tmp_path / "job.json").read_bytes()


def test_unreachable_url_ends_in_a_clear_error_quickly(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    start = time.monotonic()
    job = run_job(config(url, tmp_path), [ask(f"q {i}") for i in range(20)])
    assert time.monotonic() - start < 5
    s = job.summary
    assert s.stop_reason == "unreachable" and url in s.stop_message and "could not connect" in s.stop_message
    assert s.answered == 0 and s.sent <= 4 * 3  # at most every worker's bounded attempts

    reqs = tmp_path / "reqs.jsonl"
    reqs.write_text(json.dumps({"prompt": "hello"}) + "\n")
    code = main(["llm", str(reqs), f"out={tmp_path / 'out.jsonl'}", f"llm.base_url={url}", "llm.model=m",
                 "llm.api_key_env=", f"llm.cache={tmp_path / 'c.sqlite'}", "llm.max_retries=1",
                 "llm.backoff_initial=0.01", "llm.progress=false"])
    assert code == 1
    assert f"dataeff: error: llm: stopped early: {url} is unreachable" in capsys.readouterr().err
    assert json.loads((tmp_path / "out.jsonl").read_text())["ok"] is False


def test_prompt_longer_than_the_context_is_refused_with_the_sizes_and_not_retried(tmp_path):
    app = build_app(ServeConfig(model="test", test_latency=0.0, test_context=100))
    with ThreadServer(app) as server:
        cfg = config(server.url, tmp_path, model="test", max_tokens=20)
        job = run_job(cfg, [ask("word " * 90), ask("short prompt")])
    long, short = job.results
    assert not long.ok and "context is 100 tokens" in long.error and "92 in the prompt, 20 for the completion" in long.error
    assert "HTTP 400" in long.error and long.attempts == 1
    assert short.ok and job.summary.sent == 2 and job.summary.retries == 0


@pytest.mark.parametrize("example", ["llm_vllm.yaml", "llm_openai.yaml"])
def test_example_configs_run_against_any_openai_compatible_server_by_config_alone(tmp_path, capsys, example,
                                                                                   monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0000")
    reqs = tmp_path / "reqs.jsonl"
    reqs.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": "one"}, {"system": "Be brief.", "prompt": "two"},
                                                          {"prompt": "{\"k\": 1} as JSON", "json": True}]))
    with ThreadServer(build_app(ServeConfig(model="test", test_latency=0.0))) as server:
        args = ["llm", str(CONFIGS / example), f"requests={reqs}", f"out={tmp_path / 'out.jsonl'}",
                f"llm.base_url={server.url}", "llm.model=test", f"llm.cache={tmp_path / 'cache.sqlite'}",
                "llm.progress=false", "llm.max_reasks=0", "llm.prices={}", "llm.budget_usd=0"]
        assert main(args) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    # The test model does not speak JSON: the JSON request fails its check, after one ask, and says why.
    assert [r["ok"] for r in out] == [True, True, False] and "does not match the schema" in out[2]["error"]
    summary = json.loads(capsys.readouterr().out)
    assert (summary["answered"], summary["failed"], summary["parse_failures"]) == (2, 1, 1)
    assert (tmp_path / "out.manifest.json").exists()


def test_cache_keys_ignore_the_base_url_but_not_the_prompt_version(tmp_path):
    with FaultServer() as a, FaultServer() as b:
        run_job(config(a.url, tmp_path), [ask("same")])
        moved = run_job(config(b.url, tmp_path), [ask("same"), ask("same", prompt_version="v2")])
        assert b.counts["same"] == 1  # only the new prompt version was sent
    assert moved.results[0].cached and not moved.results[1].cached
    assert Cache(tmp_path / "cache.sqlite").count() == 2
