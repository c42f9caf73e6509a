"""dataeff cpt: continued pretraining is ordinary runs from trained weights, with replay, subsampling, seeds as an
ensemble and HF export, and every bad setting refused before training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_train import tiny_config

from dataeff.config import from_dict
from dataeff.errors import DataeffError
from dataeff.eval.ensemble import resolve_members
from dataeff.experiment.cpt import CPTConfig, run_configs, run_cpt
from dataeff.model.hf import export_run, from_hf
from dataeff.train import train


@pytest.fixture(scope="module")
def world(small_corpus_module, tmp_path_factory):
    root = tmp_path_factory.mktemp("cpt")
    cfg = tiny_config(small_corpus_module, root / "base", epochs=2)
    train(cfg)
    rng = np.random.default_rng(1)
    facts = ["the red stone sat under the blue tree", "a small girl found the river at night",
             "his friend played with the happy dog", "the big house was very sad then"]
    corpus = root / "entigraph.jsonl"
    corpus.write_text("".join(json.dumps({"text": " and ".join(rng.choice(facts, size=3)) + "."}) + "\n"
                              for _ in range(60)))
    return root, cfg, corpus


def cpt_config(world, tmp_path, **over) -> CPTConfig:
    root, base, corpus = world
    return from_dict(CPTConfig, {
        "base": base.run_dir, "corpus": str(corpus), "out": str(tmp_path / "cpt"),
        "run": {"data": {"cache_dir": str(root / "cache")},
                "train": {"batch_tokens": 128, "progress": False, "threads": 1, "eval_tokens": 256, "log_every": 1}},
        "executor": {"workers": 1, "threads_per_worker": 1}, **over})


def test_seeds_train_from_the_base_with_replay_and_subsampling_then_ensemble_and_export(world, tmp_path):
    root, base, _ = world
    cfg = cpt_config(world, tmp_path, tokens=400, replay=str(base.data.corpus), seeds=[0, 1], export=True, lr=1e-3)
    summary = run_cpt(cfg, progress=False)
    assert [r["seed"] for r in summary["runs"]] == [0, 1]
    assert all(r["train_tokens"] == 400 for r in summary["runs"])
    for run in summary["runs"]:
        written = yaml.safe_load(Path(run["run_dir"], "config.yaml").read_text())
        assert written["train"]["init_from"] == base.run_dir and written["data"]["replay_rate"] == 0.1
        assert written["optim"]["warmup"] == 0.05 and written["optim"]["schedule"] == "cosine"
        assert written["tokenizer"] == {**written["tokenizer"], "kind": "file",
                                        "path": str(root / "base" / "tokenizer.json")}
        rows = map(json.loads, Path(run["run_dir"], "metrics.jsonl").read_text().splitlines())
        lrs = [row["lr"] for row in rows if "lr" in row]
        assert max(lrs) == pytest.approx(1e-3, rel=0.05) and lrs[-1] < 0.1 * max(lrs)
    members, spec = resolve_members(str(tmp_path / "cpt" / "ensemble.json"))
    assert members == [r["run_dir"] for r in summary["runs"]] and spec is not None
    assert summary["ensemble"]["prob_loss"] <= max(r["val_loss"] for r in summary["runs"]) + 1e-6
    assert from_hf(summary["hf"][0]).cfg.d_model == base.model.resolved().d_model
    # Rerunning trains nothing and finds the same runs and exports.
    assert run_cpt(cfg, progress=False)["runs"] == summary["runs"]


def test_a_hugging_face_checkpoint_is_a_base(world, tmp_path):
    _, base, _ = world
    hf = export_run(base.run_dir, tmp_path / "hf")
    [cfg] = run_configs(cpt_config(world, tmp_path, base=f"hf:{hf}"))
    assert cfg.tokenizer.path == str(hf / "tokenizer.json") and cfg.model.seq_len == base.model.seq_len
    assert run_cpt(cpt_config(world, tmp_path, base=f"hf:{hf}", epochs=1), progress=False)["runs"][0]["val_loss"] > 0


def test_bad_settings_are_refused_before_training(world, tmp_path):
    _, base, _ = world
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps({"model_type": "mistral", "hidden_size": 32,
                                                     "num_attention_heads": 4}))
    with pytest.raises(DataeffError, match=r"model_type='mistral' is not supported .*Llama .* Qwen3"):
        run_configs(cpt_config(world, tmp_path, base=str(mistral)))
    with pytest.raises(DataeffError, match=r"cpt\.replay=.*missing\.txt: no such file or directory, nor a named corpus"):
        run_configs(cpt_config(world, tmp_path, replay=str(tmp_path / "missing.txt")))
    with pytest.raises(DataeffError, match=r"run\.tokenizer differs from the base model's"):
        run_configs(cpt_config(world, tmp_path, run={"tokenizer": {"kind": "bpe", "vocab_size": 280}}))
    with pytest.raises(DataeffError, match=r"run\.optim\.lr is set by cpt\.lr"):
        run_configs(cpt_config(world, tmp_path, run={"optim": {"lr": 1e-4}}))
    with pytest.raises(DataeffError, match="continued pretraining starts from trained weights"):
        run_configs(cpt_config(world, tmp_path, base="scratch"))
    with pytest.raises(DataeffError, match=r"cpt\.base=.*nowhere: not a dataeff run directory"):
        run_configs(cpt_config(world, tmp_path, base=str(tmp_path / "nowhere")))
    no_tok = export_run(base.run_dir, tmp_path / "hf-no-tok")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(DataeffError, match=r"holds no tokenizer\.json"):
        run_configs(cpt_config(world, tmp_path, base=str(no_tok)))
