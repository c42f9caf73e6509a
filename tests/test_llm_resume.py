"""A `dataeff llm` job SIGKILLed mid-run and run again: nothing answered before the kill is sent again."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from llm_fault_server import FaultServer

SRC = Path(__file__).resolve().parents[1] / "src"


def _command(server: FaultServer, tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "dataeff.cli", "llm", str(tmp_path / "requests.jsonl"), f"out={tmp_path / 'out.jsonl'}",
            f"llm.base_url={server.url}", "llm.model=m", "llm.api_key_env=", f"llm.cache={tmp_path / 'cache.sqlite'}",
            "llm.concurrency=4", "llm.progress=false"]


def _answered(cache: Path) -> Counter[str]:
    """Prompts with an answer in the cache, with multiplicity (the server's answers say what they answer)."""
    with sqlite3.connect(cache) as db:
        return Counter(text.split(" to ", 1)[1] for (text,) in db.execute("SELECT text FROM answers"))


def test_sigkill_then_rerun_sends_no_finished_request_again(tmp_path):
    rows = [{"prompt": f"document {i}"} for i in range(60)] + [{"prompt": "repeat", "sample_index": s} for s in range(4)]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    needed = Counter(r["prompt"] for r in rows)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    with FaultServer(latency=0.05) as server:
        job = subprocess.Popen(_command(server, tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while sum(server.counts.values()) < 20 and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.01)
        job.send_signal(signal.SIGKILL)
        job.wait()
        assert job.returncode == -signal.SIGKILL
        finished = _answered(tmp_path / "cache.sqlite")
        before = Counter(server.counts)
        assert 0 < sum(finished.values()) < len(rows)

        rerun = subprocess.run(_command(server, tmp_path), env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        sent_again = Counter(server.counts) - before

    # Nothing the killed run had finished was sent again; each missing answer was sent exactly once.
    assert all(sent_again[p] == needed[p] - finished[p] for p in needed), (sent_again, finished)
    summary = json.loads(rerun.stdout)
    assert summary["cached"] == sum(finished.values())
    assert summary["answered"] == summary["sent"] == len(rows) - sum(finished.values())
    # Only requests in flight at the kill (at most `concurrency`) were ever sent twice.
    assert sum((Counter(server.counts) - needed).values()) <= 4
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == len(rows) and all(r["ok"] for r in out)
    assert sorted(r["text"] for r in out[60:]) == [f"answer {n} to repeat" for n in range(1, 5)]
