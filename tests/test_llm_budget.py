"""The hard budget: the job stops before its answers could cost more tokens or dollars, and resumes."""

from __future__ import annotations

import json

import pytest
from llm_fault_server import FaultServer
from test_llm_client import ask, config

from dataeff.errors import DataeffError
from dataeff.generate.llm import run_job
from dataeff.generate.llm.request import max_prompt_tokens

REQUESTS = [ask(f"budget prompt {i:02d}") for i in range(30)]
WORST = max_prompt_tokens(REQUESTS[0].messages) + 10  # max_tokens=10
ACTUAL = 3 + 10  # the server counts 3 prompt words and 10 completion tokens


@pytest.mark.parametrize("concurrency", [1, 4])
def test_token_budget_is_never_exceeded(tmp_path, concurrency):
    budget = 200
    with FaultServer() as server:
        job = run_job(config(server.url, tmp_path, max_tokens=10, budget_tokens=budget, concurrency=concurrency),
                      REQUESTS)
        assert sum(server.counts.values()) == job.summary.answered
    s = job.summary
    assert s.stop_reason == "budget" and "200 tokens" in s.stop_message
    assert s.job_tokens == s.answered * ACTUAL <= budget
    assert s.answered >= (budget - concurrency * WORST) // ACTUAL and s.not_run == 30 - s.answered
    # It stopped because one more worst case did not fit, not earlier.
    assert s.job_tokens + WORST > budget - (concurrency - 1) * WORST


def test_budget_stop_is_resumable(tmp_path):
    with FaultServer() as server:
        cfg = config(server.url, tmp_path, max_tokens=10, budget_tokens=200, concurrency=1)
        first = run_job(cfg, REQUESTS, manifest=tmp_path / "job.json")
        done = first.summary.answered
        # The same budget covers the answers already bought: a rerun sends nothing.
        same = run_job(cfg, REQUESTS, manifest=tmp_path / "job.json")
        assert sum(server.counts.values()) == done
        assert (same.summary.cached, same.summary.sent, same.summary.stop_reason) == (done, 0, "budget")
        # A larger budget continues where the job stopped, sending each missing request once.
        more = run_job(config(server.url, tmp_path, max_tokens=10, budget_tokens=1000, concurrency=1), REQUESTS,
                       manifest=tmp_path / "job.json")
        assert sorted(server.counts.values()) == [1] * 30
    assert (more.summary.cached, more.summary.answered, more.summary.stop_reason) == (done, 30 - done, "done")
    assert more.summary.job_tokens == 30 * ACTUAL
    runs = json.loads((tmp_path / "job.json").read_text())["runs"]
    assert [r["summary"]["stop_reason"] for r in runs] == ["budget", "budget", "done"]


def test_cost_budget_with_prices(tmp_path):
    prices = {"m": {"input": 1000.0, "output": 2000.0}}  # USD per million tokens
    per_answer = (3 * 1000 + 10 * 2000) / 1e6
    with FaultServer() as server:
        job = run_job(config(server.url, tmp_path, max_tokens=10, prices=prices, budget_usd=0.1, concurrency=1),
                      REQUESTS, manifest=tmp_path / "job.json")
    s = job.summary
    worst = ((WORST - 10) * 1000 + 10 * 2000) / 1e6
    assert s.stop_reason == "budget" and "$0.1000" in s.stop_message
    assert s.answered == int((0.1 - worst) / per_answer) + 1
    assert s.cost_usd == pytest.approx(s.answered * per_answer) and s.cost_usd <= 0.1
    assert all(r.cost_usd == pytest.approx(per_answer) for r in job.results if r.ok)
    assert json.loads((tmp_path / "job.json").read_text())["summary"]["job_cost_usd"] == pytest.approx(s.cost_usd)


def test_cost_budget_without_a_price_is_refused(tmp_path):
    with pytest.raises(DataeffError, match=r"no price for model 'm'.*llm\.prices\.m\.input"):
        run_job(config("http://127.0.0.1:9/v1", tmp_path, budget_usd=1.0), REQUESTS)
    with pytest.raises(DataeffError, match=r"llm\.prices\.m: expected \{input"):
        config("http://127.0.0.1:9/v1", tmp_path, prices={"m": {"inptu": 1}})
