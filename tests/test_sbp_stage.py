"""The sbp pipeline stage: settings refused before training, the oracle's fresh documents, the result and its
report section, and (slow) the whole stage on a small corpus."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dataeff.config import from_dict
from dataeff.data.config import DataConfig, TokenizerConfig
from dataeff.data.corpora import load_documents
from dataeff.data.tokens import prepare
from dataeff.errors import DataeffError
from dataeff.experiment.stage import plain
from dataeff.experiment.stages.sbp import SBPResult, _section, fresh_documents
from dataeff.pipeline import PipelineConfig, run_pipeline
from dataeff.report.blocks import Fig, Table, to_markdown


def sbp_pipeline(corpus: Path, root: Path, **sbp) -> PipelineConfig:
    doc = {
        "name": "tiny sbp",
        "root": str(root),
        "base": {
            "data": {"corpus": str(corpus), "val_docs": 20, "train_tokens": 800, "cache_dir": str(root.parent / "cache")},
            "tokenizer": {"kind": "word", "vocab_size": 100},
            "model": {"seq_len": 256},
            "train": {"batch_tokens": 512, "eval_tokens": 512, "progress": False, "dtype": "fp32"},
        },
        "sizes": ["pico"],
        "recipes": [{"name": "standard", "grid": {"optim.lr": [3e-3, 1e-2]},
                     "fixed": {"optim.weight_decay": 0.1, "train.epochs": 2}}],
        "max_extensions": 0,
        "executor": {"workers": 1, "threads_per_worker": 1},
        "fit": {"n_boot": 100},
        "sbp": {"worlds": [600, 1200], "training_tokens": 2400, "seeds": [0, 1], "shares": [0.25],
                "pairs": {"k": 2, "alpha": 0.0, "dup_similarity": 0.999},
                "synthesize": {"samples_per_seed": 4, "batch_size": 32, "shard_size": 32, "dtype": "fp32"},
                "quality_sample": 50, "quality_encoder": False, "n_boot": 200, **sbp},
    }
    return from_dict(PipelineConfig, doc)


@pytest.mark.parametrize(("over", "message"), [
    ({"worlds": [600, 600]}, r"sbp\.worlds=\[600, 600\]: world sizes must be distinct"),
    ({"training_tokens": 1000}, r"training_tokens=1000 is below the largest world 1200"),
    ({"size": "mini"}, r"sbp\.size='mini' is not among sizes"),
    ({"recipe": "regularized"}, r"sbp\.recipe='regularized' is not a tuned recipe"),
    ({"shares": [1.5]}, r"shares in \(0, 1\)"),
    ({"tasks": ["arc"]}, "unknown task 'arc'"),
])
def test_bad_settings_are_refused_before_anything_trains(small_corpus: Path, tmp_path: Path, over: dict,
                                                         message: str) -> None:
    root = tmp_path / "p"
    with pytest.raises(DataeffError, match=message):
        run_pipeline(sbp_pipeline(small_corpus, root, **over), progress=False)
    cfg = sbp_pipeline(small_corpus, root)
    cfg.base.model.seq_len = 128
    with pytest.raises(DataeffError, match=r"base\.model\.seq_len of at least 256 \(it is 128\)"):
        run_pipeline(cfg, progress=False)
    assert not (root / "runs").exists()


def test_oracle_documents_are_fresh_and_of_the_same_corpus(small_corpus: Path, tmp_path: Path) -> None:
    data = DataConfig(corpus=str(small_corpus), val_docs=20, train_tokens=300, cache_dir=str(tmp_path / "cache"))
    tok = TokenizerConfig(kind="word", vocab_size=100)
    world = prepare(data, tok, progress=False)
    info = fresh_documents(data, tok, world.split("train").n_docs, 400, tmp_path / "fresh.jsonl")
    fresh = [json.loads(line)["text"] for line in (tmp_path / "fresh.jsonl").read_text().splitlines()]
    assert info["tokens"] >= 400 and info["documents"] == len(fresh)
    pool = load_documents(DataConfig(corpus=str(small_corpus), val_docs=20))
    order = np.random.default_rng(data.budget_seed).permutation(len(pool["train"]))
    world_texts = {pool["train"][i] for i in order[: world.split("train").n_docs]}
    assert set(fresh) <= set(pool["train"]) and not set(fresh) & set(pool["val"])
    assert not set(fresh) & world_texts  # the world's last document, cut by its budget, included
    with pytest.raises(DataeffError, match="its oracle needs 10000000"):
        fresh_documents(data, tok, world.split("train").n_docs, 10_000_000, tmp_path / "big.jsonl")
    assert not (tmp_path / "big.jsonl").exists()


def _result() -> SBPResult:
    arm = {"epochs": 4.0, "run_dirs": ["r0", "r1"], "errors": [None, None]}
    worlds = []
    for world, (rep, sbp_loss, oracle) in ((1000, (4.0, 4.1, 3.5)), (4000, (3.5, 3.3, 3.0))):
        worlds.append({
            "world": world, "docs": world // 100, "store": "s",
            "arms": [
                {"name": "repetition", "kind": "repetition", "share": 0.0, **arm, "losses": [rep, rep + 0.02],
                 "mean": rep + 0.01, "low": rep, "high": rep + 0.02},
                {"name": "sbp 1:3", "kind": "sbp", "share": 0.25, **arm, "losses": [sbp_loss, sbp_loss],
                 "mean": sbp_loss, "low": sbp_loss, "high": sbp_loss},
                {"name": "oracle 1:3", "kind": "oracle", "share": 0.25, **arm, "losses": [oracle, oracle],
                 "mean": oracle, "low": oracle, "high": oracle, "tasks": {"blimp": {"acc": 0.6, "n": 200}}},
            ],
            "gains": [{"share": 0.25, "value": (rep - sbp_loss) / (rep - oracle),
                       "low": -0.5 if world == 1000 else 0.2, "high": 0.1 if world == 1000 else 0.6}],
            "pairs": {"n_docs": 10, "n_pairable": 9, "n_docs_with_pair": 8, "n_pairs": 20, "n_mutual_pairs": 6,
                      "near_duplicates": {"similarity": 1, "text": 0}, "k": 3, "alpha": 0.5,
                      "pair_similarity": {"quantiles": {"p05": 0.5, "p50": 0.6, "p95": 0.8}}},
            "synthesizer": "runs/x", "synthesizer_loss": 3.9,
            "synthetic": {"documents": 50, "tokens": 5000, "seeds": 10, "empty": 1, "exact": 0, "near": 2, "world": 1},
            "quality": [{"name": "world", "kind": "real", "sampled": 10, "docs": 10,
                         "repetition": {"share": 0.1, "ci95": [0.01, 0.4], "total": 10}, "notes": {}}],
            "samples": [{"seed": 3, "seed_text": "a seed story", "text": "a synthetic story"}],
        })
    return from_dict(SBPResult, {"size": "nano", "training_tokens": 16000, "shares": [0.25], "seeds": [0, 1],
                                 "values": {"optim.lr": 0.003}, "worlds": worlds})


def test_result_round_trips_and_the_section_shows_every_part(tmp_path: Path) -> None:
    r = _result()
    assert from_dict(SBPResult, json.loads(json.dumps(plain(r)))) == r
    assert r.threshold(0.25) == 4000
    assert any("from 4k world tokens on" in line for line in r.headline())

    blocks = _section(SimpleNamespace(stages={"sbp": r}), tmp_path)
    text = to_markdown(blocks)
    for part in ("Held-out loss per world size", "Gain closed", "Pairs", "Synthesizer and synthetic corpus",
                 "Quality of the synthetic text", "Sample (seed, synthetic) pairs", "Downstream accuracy"):
        assert part in text
    gains = next(b for b in blocks if isinstance(b, Table) and b.headers == ["world", "SBP 1:3"])
    assert gains.rows[1] == ["4k", "40% [20%, 60%]"]
    assert any(isinstance(b, Fig) and b.png for b in blocks)
    assert "«a seed story» → «a synthetic story»" in text


@pytest.mark.slow
def test_the_stage_runs_every_arm_at_every_world(small_corpus: Path, tmp_path: Path) -> None:
    results = run_pipeline(sbp_pipeline(small_corpus, tmp_path / "p"), progress=False)
    r: SBPResult = results["sbp"]
    assert [w.world for w in r.worlds] == [600, 1200]
    for w in r.worlds:
        assert w.error is None, w.error
        assert {a.name for a in w.arms} == {"repetition", "sbp 1:3", "oracle 1:3"}
        assert all(v is not None for a in w.arms for v in a.losses)
        assert w.synthetic["tokens"] >= 0.25 * 2400 and w.quality and w.samples
        assert [g.share for g in w.gains] == [0.25]
    again = run_pipeline(sbp_pipeline(small_corpus, tmp_path / "p"), progress=False)["sbp"]
    assert [a.losses for w in again.worlds for a in w.arms] == [a.losses for w in r.worlds for a in w.arms]
    assert (tmp_path / "p" / "report.md").read_text().count("Synthetic Bootstrapped Pretraining") == 1
