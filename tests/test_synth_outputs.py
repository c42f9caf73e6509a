"""EntiGraph and rephrase outputs are corpora: `data.synthetic` tokenizes them for training, and `dataeff quality`
measures them, its non-factual column filled by the LLM judge (`dataeff.synth.judge:judge`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from synth_server import SynthServer
from test_entigraph import _config as entigraph_config
from test_entigraph import _input
from test_rephrase import _config as rephrase_config

from dataeff.data.config import DataConfig, TokenizerConfig
from dataeff.data.tokens import prepare
from dataeff.errors import DataeffError
from dataeff.synth import judge
from dataeff.synth.entigraph import entigraph_job
from dataeff.synth.quality import QualityConfig, run_quality
from dataeff.synth.rephrase import rephrase_job

NAMES = ["Alice", "Bob", "Carol", "Dave", "Paris", "Oslo", "Lisbon", "Rome"]
VERBS = ["met", "left", "visited", "wrote to", "argued with", "travelled with"]


def _documents(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(f"{a} {v} {b} in the morning, and then rested." for a, v, b in
                     zip(rng.choice(NAMES, 3), rng.choice(VERBS, 3), rng.choice(NAMES, 3), strict=True))
            for _ in range(n)]


@pytest.fixture
def judged(tmp_path, monkeypatch):
    """A running test server, and $DATAEFF_JUDGE naming a judge config that points at it."""
    with SynthServer() as server:
        path = tmp_path / "judge.yaml"
        path.write_text(yaml.safe_dump({"llm": {"base_url": server.url, "model": "m", "api_key_env": "",
                                                "cache": str(tmp_path / "judge.sqlite"), "timeout": 30}}))
        monkeypatch.setenv(judge.JUDGE_ENV, str(path))
        judge._configured.cache_clear()
        yield server
        judge._configured.cache_clear()


def test_entigraph_output_trains_through_data_synthetic_and_is_measured_with_the_judge(tmp_path, judged):
    docs = _documents(12)
    real = tmp_path / "real.txt"
    real.write_text("\n\n".join(docs) + "\n")
    metrics = entigraph_job(entigraph_config(judged, tmp_path, input=_input(tmp_path, docs), max_entities=3,
                                             triples=1), tmp_path / "eg")
    corpus = tmp_path / "eg" / "corpus.jsonl"
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert len(records) == metrics["summaries"] + metrics["relation_texts"] == 12 * (1 + 3 + 1)

    prepared = prepare(DataConfig(corpus=str(real), synthetic=str(corpus), synthetic_share=0.5,
                                  synthetic_schedule="once", val_docs=3, cache_dir=str(tmp_path / "cache")),
                       TokenizerConfig(kind="bpe", vocab_size=300), progress=False)
    assert prepared.split("synthetic").n_docs == len(records)

    # One synthetic text says something the judge finds false.
    lines = corpus.read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "text": "Alice is false: she never met anyone at all."})
    corpus.write_text("\n".join(lines) + "\n")
    cfg = QualityConfig(synthetic=[str(corpus)], reference=str(real), judge="dataeff.synth.judge:judge", judge_docs=8,
                        sample=None, seed=0, out=str(tmp_path / "quality.json"), progress=False)
    report = run_quality(cfg)
    reference_row, synthetic_row = report.rows
    assert synthetic_row.docs == len(records) and synthetic_row.non_factual.total == 8
    assert synthetic_row.non_factual.count == 1
    assert reference_row.non_factual.count == 0 and synthetic_row.source_overlap is not None
    written = json.loads((tmp_path / "quality.json").read_text())
    assert written["rows"][1]["non_factual"]["count"] == synthetic_row.non_factual.count
    # Verdicts are cached: measuring again sends nothing.
    before = sum(judged.counts.values())
    run_quality(cfg)
    assert sum(judged.counts.values()) == before


def test_rephrase_output_is_a_seeded_corpus_for_quality_and_training(tmp_path):
    docs = _documents(12)
    with SynthServer() as server:
        rephrase_job(rephrase_config(server, tmp_path, input=_input(tmp_path, docs), styles=["medium", "easy"],
                                     fidelity={"method": "off"}), tmp_path / "rp")
    corpus = tmp_path / "rp" / "corpus.jsonl"
    report = run_quality(QualityConfig(synthetic=[str(corpus)], out=str(tmp_path / "q.json"), progress=False))
    [row] = report.rows
    # Each rewrite carries its source as seed_text, so the pair metrics apply (the test server copies).
    assert row.pairs == row.docs == 24 and row.pair_copying.count == 24
    real = tmp_path / "real.txt"
    real.write_text("\n\n".join(docs) + "\n")
    prepared = prepare(DataConfig(corpus=str(real), synthetic=str(corpus), synthetic_share=0.5,
                                  synthetic_schedule="once", val_docs=2, cache_dir=str(tmp_path / "cache")),
                       TokenizerConfig(kind="bpe", vocab_size=300), progress=False)
    assert prepared.split("synthetic").n_docs == 24


def test_the_judge_hook_names_its_environment_variable(monkeypatch):
    monkeypatch.delenv(judge.JUDGE_ENV, raising=False)
    judge._configured.cache_clear()
    with pytest.raises(DataeffError, match=r"\$DATAEFF_JUDGE"):
        judge.judge("source", "text")


def test_an_unreachable_judge_is_an_error_not_abstentions(tmp_path, monkeypatch):
    path = tmp_path / "judge.yaml"
    path.write_text(yaml.safe_dump({"llm": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "",
                                            "cache": str(tmp_path / "j.sqlite"), "max_retries": 1,
                                            "backoff_initial": 0.01, "backoff_jitter": 0.0}}))
    monkeypatch.setenv(judge.JUDGE_ENV, str(path))
    judge._configured.cache_clear()
    try:
        with pytest.raises(DataeffError, match=r"judge: stopped early .*unreachable"):
            judge.judge("a source", "a text")
    finally:
        judge._configured.cache_clear()

