"""Stage cpt end to end on a toy world: the tuned base continued on raw articles and on two synthetic corpora
at three token counts, QA accuracy with intervals, the fitted law, a CPT ensemble, the theory figure, the
report section, and results.json read back into types."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dataeff.config import from_dict
from dataeff.errors import DataeffError
from dataeff.experiment.config import PipelineConfig, read_results
from dataeff.experiment.pipeline import run_pipeline
from dataeff.experiment.stage import Context
from dataeff.experiment.stages.cpt import STAGE as CPT_STAGE

WORDS = ["the", "red", "cat", "sat", "under", "a", "blue", "tree", "and", "dog", "ran", "to", "river", "stone"]


def _world(tmp_path, small_corpus):
    rng = np.random.default_rng(0)
    articles = tmp_path / "quality.jsonl"
    lines = []
    for i in range(5):
        text = f"STORY {i}\n\nBy ANN LEE\n\n" + " ".join(rng.choice(WORDS, size=300))
        questions = [f"Who sat {j}?\n(A) the cat\n(B) a dog\n(C) the river\n(D) a stone" for j in range(4)]
        lines.append(json.dumps({"input": text, "instructions": questions, "outputs": ["(A) the cat"] * 4}))
    articles.write_text("\n".join(lines) + "\n")
    corpora = {}
    for kind in ("entigraph", "rephrase"):
        path = tmp_path / f"{kind}.jsonl"
        path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, size=40))}) + "\n" for _ in range(200)))
        corpora[kind] = str(path)
    return from_dict(PipelineConfig, {
        "name": "cpt toy", "root": str(tmp_path / "p"),
        "base": {"data": {"corpus": str(small_corpus), "val_docs": 20, "train_tokens": 1500,
                          "cache_dir": str(tmp_path / "cache")},
                 "tokenizer": {"kind": "bpe", "vocab_size": 300}, "model": {"seq_len": 32},
                 "train": {"batch_tokens": 256, "eval_tokens": 512, "progress": False, "epochs": 1}},
        "sizes": ["nano"], "max_extensions": 0, "fit": {"n_boot": 20},
        "recipes": [{"name": "standard", "grid": {"optim.lr": [3e-3, 1e-2]}, "fixed": {"optim.weight_decay": 0.1}}],
        "executor": {"workers": 2, "threads_per_worker": 1},
        "cpt": {"token_counts": [500, 1000, 2000], "articles": str(articles), **corpora, "lr": 3e-3, "epochs": 1,
                "raw_epochs": 1, "ensemble_seeds": [1], "split": "all",
                "theory": {"V": 50, "reps": 3, "steps": [10, 100, 1000]}},
    })


@pytest.mark.slow  # about twenty tiny runs
def test_the_cpt_stage_runs_end_to_end_and_reads_back(tmp_path, small_corpus):
    cfg = _world(tmp_path, small_corpus)
    run_pipeline(cfg, progress=False)
    r = read_results(tmp_path / "p" / "results.json")["cpt"]
    corpora = [(p.corpus, p.tokens) for p in r.points]
    assert corpora[:2] == [("base", 0), ("raw", r.corpus_tokens["raw"])]
    assert [t for c, t in corpora if c == "entigraph"] == [500, 1000, 2000]
    assert [t for c, t in corpora if c == "rephrase"] == [500, 1000, 2000]
    ensemble = next(p for p in r.points if p.corpus == "entigraph ensemble")
    assert len(ensemble.run_dirs) == 2 and ensemble.tokens == 2000
    for p in r.points:
        assert p.error is None and p.qa.n == 20 and p.qa.chance == 0.25
        assert p.qa.acc_low <= p.qa.acc <= p.qa.acc_high
    # Every CPT run starts from the tuned base and is held out on the articles.
    assert all(p.articles_loss is not None for p in r.points if p.corpus != "base")
    assert {f.corpus for f in r.fits} == {"entigraph", "rephrase"}
    assert all((f.a is not None) != (f.error is not None) for f in r.fits)
    assert r.theory is not None and 0 < r.theory.plateau <= 1 and len(r.theory.mean) == 3
    md = (tmp_path / "p" / "report" / "report.md").read_text()
    assert "## Synthetic continued pretraining (QuALITY)" in md and "cpt_scaling.png" in md and "cpt_theory.png" in md
    assert (tmp_path / "p" / "report" / "cpt_scaling.png").stat().st_size > 1000


def test_bad_cpt_settings_are_refused_before_anything_trains(tmp_path, small_corpus):
    cfg = _world(tmp_path, small_corpus)
    cfg.cpt.entigraph = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataeffError, match=r"cpt\.entigraph=.*missing\.jsonl: no such file"):
        run_pipeline(cfg, progress=False)
    cfg = _world(tmp_path, small_corpus)
    cfg.cpt.token_counts = [500, 500, 1000]
    with pytest.raises(DataeffError, match=r"cpt\.token_counts=\[500, 500, 1000\]: give distinct"):
        run_pipeline(cfg, progress=False)
    cfg = _world(tmp_path, small_corpus)
    cfg.base.tokenizer.kind, cfg.cpt.entigraph, cfg.cpt.generate, cfg.cpt.serve = "word", None, True, "base"
    with pytest.raises(DataeffError, match=r"word-level tokenizer.*cpt\.generator\.json_mode=off"):
        run_pipeline(cfg, progress=False)
    cfg.cpt.generator.json_mode = "off"  # free-text entity answers: the client validates them, nothing refused
    CPT_STAGE.check(Context(cfg, tmp_path / "p", False), cfg.cpt)
    assert not (tmp_path / "p" / "runs").exists()


@pytest.mark.slow  # a served test model, generation jobs and CPT runs
def test_corpora_are_generated_through_dataeff_serve(tmp_path, small_corpus):
    cfg = _world(tmp_path, small_corpus)
    cfg.cpt.entigraph = cfg.cpt.rephrase = None
    cfg.cpt.generate, cfg.cpt.serve, cfg.cpt.serve_port = True, "test", 8791
    cfg.cpt.generator.max_tokens = 16
    cfg.cpt.rephrase_settings = {"chunk_words": 30, "context_words": 0, "fidelity": {"method": "none"}}
    cfg.cpt.entigraph_settings = {"split_words": 60}
    cfg.cpt.token_counts, cfg.cpt.ensemble_seeds = [200, 400, 800], []
    run_pipeline(cfg, progress=False)
    r = read_results(tmp_path / "p" / "results.json")["cpt"]
    # The test model writes hex words: rephrasing gives text, EntiGraph's entity JSON never parses.
    assert "cpt_rephrase" in r.corpora["rephrase"] and r.corpus_tokens["rephrase"] > 800
    assert "entigraph" not in r.corpora and any(s.startswith("entigraph: its generation gave no corpus")
                                                for s in r.skipped)
    assert [p.tokens for p in r.points if p.corpus == "rephrase"] == [200, 400, 800]
    # A rerun finds the generation done and serves nothing.
    run_pipeline(cfg, progress=False)
    assert read_results(tmp_path / "p" / "results.json")["cpt"].corpora == r.corpora
