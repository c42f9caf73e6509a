"""Rephrasing's embedding fidelity check with SBP's sentence-transformers model (the packaged MiniLM)."""

from __future__ import annotations

import json

from synth_server import SynthServer
from test_rephrase import DOCS, LONG, _config, _records

from dataeff.synth.rephrase import rephrase_job


def test_rewrites_far_from_their_source_are_rejected_and_counted(tmp_path):
    with SynthServer() as server:
        metrics = rephrase_job(_config(server, tmp_path, styles=["medium"], fidelity={"method": "embedding",
                                                                                      "device": "cpu"}),
                               tmp_path / "out")
    [kept] = _records(tmp_path / "out" / "corpus.jsonl")
    [rejected] = _records(tmp_path / "out" / "rejected.jsonl")
    assert kept["seed_text"] == LONG and kept["fidelity"]["method"] == "embedding"
    assert len(kept["fidelity"]["chunks"]) == 5 and kept["fidelity"]["min"] > 0.99  # the rewrite is the source
    assert rejected["seed_text"] == DOCS[1] and rejected["fidelity"]["min"] < 0.7
    assert metrics["kept"] == 1 and metrics["rejected"] == 1 and metrics["rejection_rate"] == 0.5
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["metrics"] == metrics
