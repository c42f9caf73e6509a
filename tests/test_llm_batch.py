"""Batch mode against a fake Batch API: upload, poll, download; a restart polls instead of resubmitting."""

from __future__ import annotations

import pytest
from llm_fault_server import FaultServer
from pydantic import BaseModel
from test_llm_client import ask, config

from dataeff.generate.llm import Cache, run_job
from dataeff.generate.llm.batch import BatchRunner


class Answer(BaseModel):
    answer: str
    n: int


PRICES = {"m": {"input": 1000.0, "output": 2000.0}}
REQUESTS = [ask(f"batched {i}") for i in range(4)] + [ask("[json] [badjson*1] batched json", schema=Answer)]


def batch_config(url, tmp_path, **over):
    return config(url, tmp_path, batch=True, batch_poll_interval=0.02, prices=PRICES, **over)


def test_batch_submits_once_and_a_restart_polls_the_persisted_batch(tmp_path):
    with FaultServer(batch_polls=3) as server:
        first = run_job(batch_config(server.url, tmp_path, batch_wait=False), REQUESTS)
        assert first.summary.stop_reason == "batch_pending" and "batch-1" in first.summary.stop_message
        assert first.summary.not_run == 5 and first.summary.batches == ["batch-1"]
        assert (server.calls["files.create"], server.calls["batches.create"]) == (1, 1)
        [entry] = Cache(tmp_path / "cache.sqlite").open_batches()
        assert entry.batch_id == "batch-1" and len(entry.keys) == 5

        second = run_job(batch_config(server.url, tmp_path), REQUESTS)
        # Polled until done, never submitted again.
        assert (server.calls["files.create"], server.calls["batches.create"]) == (1, 1)
        assert server.polls["batch-1"] == 3
        # The JSON answer that failed its schema was re-asked online, once.
        assert server.counts["[json] [badjson*1] batched json"] == 2

        third = run_job(batch_config(server.url, tmp_path), REQUESTS)
        assert server.calls["batches.retrieve"] == 3 and third.summary.cached == 5
    s = second.summary
    assert (s.answered, s.failed, s.reasks, s.parse_failures, s.stop_reason) == (5, 0, 1, 1, "done")
    assert [r.text for r in second.results[:4]] == [f"answer 1 to batched {i}" for i in range(4)]
    assert second.results[4].parsed.n == 2
    # Batch answers cost half ("batched i" is two words, answers ten tokens); the online re-ask full price.
    assert [r.cost_usd for r in second.results[:4]] == pytest.approx([0.5 * (2 * 1000 + 10 * 2000) / 1e6] * 4)
    reask = second.results[4]
    assert reask.cost_usd == pytest.approx((reask.prompt_tokens * 1000 + 10 * 2000) / 1e6)
    assert Cache(tmp_path / "cache.sqlite").open_batches() == []


def test_a_run_killed_between_upload_and_batch_creation_does_not_upload_again(tmp_path, monkeypatch):
    with FaultServer(batch_polls=1) as server:
        original = BatchRunner._create

        async def killed(self, entry, search):
            raise KeyboardInterrupt

        monkeypatch.setattr(BatchRunner, "_create", killed)
        with pytest.raises(KeyboardInterrupt):
            run_job(batch_config(server.url, tmp_path), REQUESTS[:2])
        [entry] = Cache(tmp_path / "cache.sqlite").open_batches()
        assert entry.status == "uploaded" and entry.batch_id is None
        monkeypatch.setattr(BatchRunner, "_create", original)

        job = run_job(batch_config(server.url, tmp_path), REQUESTS[:2])
        assert (server.calls["files.create"], server.calls["batches.list"], server.calls["batches.create"]) == (1, 1, 1)
    assert all(r.ok for r in job.results)


def test_a_run_killed_after_batch_creation_adopts_the_batch(tmp_path):
    with FaultServer(batch_polls=2) as server:
        run_job(batch_config(server.url, tmp_path, batch_wait=False), REQUESTS[:2])
        cache = Cache(tmp_path / "cache.sqlite")
        [entry] = cache.open_batches()
        cache.set_batch(entry.input_file_id, None, "uploaded")  # as if killed before the batch id was saved
        job = run_job(batch_config(server.url, tmp_path), REQUESTS[:2])
        assert (server.calls["files.create"], server.calls["batches.create"], server.calls["batches.list"]) == (1, 1, 1)
    assert all(r.ok for r in job.results) and job.summary.batches == ["batch-1"]
