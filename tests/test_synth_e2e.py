"""`dataeff entigraph` and `dataeff rephrase` end to end, as a user runs them: against `dataeff serve` with a
tiny dataeff model trained here, and SIGKILLed mid-job against the test server, then run again."""

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

import pytest
from llm_fault_server import ThreadServer
from synth_server import SynthServer
from test_train import tiny_config

from dataeff.generate.serve import ServeConfig, build_app
from dataeff.train.loop import train

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC)}
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "the", "dog", "ran", "to", "big", "red", "house"]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dataeff.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """`dataeff serve` on a tiny dataeff run (context 256 tokens), and its base URL."""
    root = tmp_path_factory.mktemp("served")
    corpus = root / "small.txt"
    corpus.write_text("\n\n".join(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(8 + i % 20)) + "."
                                  for i in range(120)) + "\n", encoding="utf-8")
    cfg = tiny_config(corpus, root / "run", epochs=2, dtype="fp32")
    cfg.model.seq_len = 256
    # Fifteen words support about 295 byte-level BPE tokens, fewer than tiny_config's vocabulary.
    cfg.tokenizer.vocab_size = 290
    train(cfg)
    with ThreadServer(build_app(ServeConfig(model=str(root / "run"), name="tiny", dtype="fp32", device="cpu"))) as server:
        yield server.url


@pytest.mark.slow
def test_both_commands_run_against_dataeff_serve_and_a_rerun_is_all_cache_hits(served, tmp_path):
    url = served
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                            ["The Cat sat on the Mat.", "the dog ran to the house. the cat sat. " * 3,
                             "a tree " * 200]), encoding="utf-8")
    entities = tmp_path / "entities.txt"
    entities.write_text("Entities as JSON.\n=== user ===\n{document}\n")
    rewrite = tmp_path / "plain.txt"
    rewrite.write_text("Rewrite.\n=== user ===\n{context}{chunk}\n")
    llm = [f"llm.base_url={url}", "llm.model=tiny", "llm.api_key_env=", f"llm.cache={tmp_path / 'cache.sqlite'}",
           "llm.max_tokens=16", "llm.progress=false", "llm.temperature=0", "llm.max_reasks=0"]
    entigraph = ["entigraph", str(docs), f"out={tmp_path / 'eg'}", f"entities_prompt={entities}",
                 "entity_max_tokens=24", *llm]
    rephrase = ["rephrase", str(docs), f"out={tmp_path / 'rp'}", f"styles=[{rewrite}]", "chunk_words=12",
                "context_words=4", "fidelity.method=none", *llm]

    done = _cli(*entigraph)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    short, medium, long = _lines(tmp_path / "eg" / "documents.jsonl")
    # Guided decoding starts the JSON, but 24 tokens cut it short: the entity calls fail their schema, the raw
    # (cut) answers kept.
    assert short["status"] == medium["status"] == "failed" and "EOF while parsing" in short["error"]
    # The long document does not fit the served 256-token context: refused with the sizes, never sent.
    assert long["status"] == "too_long" and "context is 256 tokens" in long["error"]
    assert metrics["statuses"] == {"failed": 2, "too_long": 1} and metrics["sent"] == 2
    with sqlite3.connect(tmp_path / "cache.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM parse_failures").fetchone()[0] == 2

    done = _cli(*rephrase)
    assert done.returncode == 0, done.stderr
    first = json.loads(done.stdout)
    # The document too long for EntiGraph's context is rewritten chunk by chunk.
    assert first["rewrites"] == first["kept"] == 3
    records = _lines(tmp_path / "rp" / "corpus.jsonl")
    assert [r["chunks"] for r in records] == [1, 3, 34] and records[0]["model"] == "tiny"
    # Greedy rewrites of a repeated chunk after the same context are one request: later rounds find it cached.
    assert first["requests"] == first["sent"] + first["cached"] == 38 and records[1]["text"].count("\n\n") == 2
    again = json.loads(_cli(*rephrase).stdout)
    assert again["sent"] == 0 and again["cached"] == again["requests"] == 38
    assert _lines(tmp_path / "rp" / "corpus.jsonl") == records


def _answered(cache: Path) -> int:
    with sqlite3.connect(cache) as db:
        return db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


def test_a_killed_entigraph_resumes_without_sending_a_finished_request_again(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Ann{c} met Ben{c} and Cid{c} in Rome{c}."}) + "\n" for c in "abcdef"))
    cache = tmp_path / "cache.sqlite"
    with SynthServer(latency=0.05) as server:
        command = [sys.executable, "-m", "dataeff.cli", "entigraph", str(docs), f"out={tmp_path / 'out'}",
                   f"llm.base_url={server.url}", "llm.model=m", "llm.api_key_env=", f"llm.cache={cache}",
                   "llm.concurrency=4", "llm.progress=false", "triples=2"]
        job = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while sum(server.counts.values()) < 20 and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.01)
        job.send_signal(signal.SIGKILL)
        job.wait()
        assert job.returncode == -signal.SIGKILL
        finished = _answered(cache)
        before = Counter(server.counts)
        assert 6 < finished < 6 * (1 + 6 + 2)
        rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        sent_again = Counter(server.counts) - before
    metrics = json.loads(rerun.stdout)
    assert metrics["cached"] == finished and metrics["sent"] == sum(sent_again.values()) == 6 * 9 - finished
    # Only requests in flight at the kill (at most llm.concurrency) were ever sent twice.
    assert sum(n - 1 for n in server.counts.values()) <= 4
    records = _lines(tmp_path / "out" / "corpus.jsonl")
    assert len(records) == 6 * 9 and len({r["text"] for r in records}) == len(records)


@pytest.mark.slow  # a spawned worker imports torch
def test_entigraph_and_rephrase_run_as_executor_jobs(tmp_path):
    from test_entigraph import _config as entigraph_config
    from test_rephrase import _config as rephrase_config

    from dataeff.experiment.executor import ExecutorConfig, Job, run

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with SynthServer() as server:
        jobs = [Job("dataeff.synth.entigraph:entigraph_job", entigraph_config(server, tmp_path / "a"), tmp_path / "eg"),
                Job("dataeff.synth.rephrase:rephrase_job",
                    rephrase_config(server, tmp_path / "b", fidelity={"method": "none"}), tmp_path / "rp")]
        done = run(jobs, ExecutorConfig(workers=1), progress=False)
        again = run(jobs, ExecutorConfig(workers=1), progress=False)
    assert [r.status for r in done] == ["done", "done"] and [r.status for r in again] == ["skipped", "skipped"]
    assert done[0].result["relation_texts"] == 16 and done[1].result["kept"] == 2
    for name in ("eg", "rp"):
        assert all("text" in r for r in _lines(tmp_path / name / "corpus.jsonl"))
