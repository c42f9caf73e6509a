from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataeff.config import dump_yaml, from_dict
from dataeff.errors import DataeffError
from dataeff.fsutil import read_jsonl
from dataeff.pipeline import PipelineConfig, plan_tasks, run_pipeline

SRC = str(Path(__file__).resolve().parents[1] / "src")


def tiny_pipeline(corpus: Path, root: Path, **over) -> PipelineConfig:
    doc = {
        "name": "tiny",
        "root": str(root),
        "base": {
            "data": {"corpus": str(corpus), "val_docs": 20, "train_tokens": 1500, "cache_dir": str(root.parent / "cache")},
            "tokenizer": {"kind": "bpe", "vocab_size": 300},
            "model": {"seq_len": 16},
            "train": {"batch_tokens": 128, "eval_tokens": 512, "progress": False},
        },
        "sizes": ["nano", "micro", "mini"],
        "recipes": [
            {"name": "standard", "grid": {"optim.lr": [3e-3, 1e-2], "train.epochs": [1, 2]}, "fixed": {"optim.weight_decay": 0.1}},
            {"name": "regularized", "grid": {"optim.lr": [3e-3, 1e-2], "optim.weight_decay": [0.1, 1.6], "train.epochs": [1, 2]}},
        ],
        "max_extensions": 0,
        "data_scaling": {"budgets": [500, 1000], "sizes": ["nano"]},
        "executor": {"workers": 2, "threads_per_worker": 1},
        "fit": {"n_boot": 100},
        **over,
    }
    return from_dict(PipelineConfig, doc)


def test_plan_refuses_bad_recipes(small_corpus, tmp_path):
    cfg = tiny_pipeline(small_corpus, tmp_path / "p")
    cfg.recipes[0].grid["optim.lr"] = [3e-3]
    with pytest.raises(DataeffError, match="certificate needs at least two values"):
        plan_tasks(cfg)
    cfg = tiny_pipeline(small_corpus, tmp_path / "p", data_scaling={"budgets": [500], "recipe": "baseline"})
    with pytest.raises(DataeffError, match="'baseline' is not one of the recipes"):
        plan_tasks(cfg)


@pytest.mark.slow
def test_pipeline_tunes_fits_and_reruns_nothing(small_corpus, tmp_path):
    cfg = tiny_pipeline(small_corpus, tmp_path / "p", confirm_seeds=[1])
    results = run_pipeline(cfg, progress=False)
    tuned = {(r["recipe"], r["size"], r["budget"]): r for r in results["tuned"]}
    assert len(tuned) == 2 * 3 + 2  # recipes × sizes at the world budget, plus two extra budgets
    for r in tuned.values():
        # Every point the tuner trained is recorded, the optimum among them.
        assert all(e["values"] for e in r["evaluations"]) and r["best"] in [e["values"] for e in r["evaluations"]]
        # The tuned optimum's loss is its mean over the tuning and confirmation seeds.
        best = next(e for e in r["evaluations"] if e["values"] == r["best"])
        assert len(best["seed_losses"]) == 2 and r["best_loss"] == pytest.approx(sum(best["seed_losses"]) / 2)
        assert r["certified"] is False or "none is better" in r["reason"]
    # Optima retrained on a second seed: the intervals come from the measured seed noise (parametric bootstrap).
    assert results["seed_sigma"] > 0
    for name in ("standard", "regularized"):
        fit = results["fits"][name]
        assert fit["method"] == "parametric" and fit["E_ci"][0] <= fit["E"] <= fit["E_ci"][1]
    assert results["data_scaling"]["budgets"] == [500, 1000, 1500]
    assert len(results["verdict"]) == 2
    root = tmp_path / "p"
    assert (root / "results.json").exists() and (root / "report" / "report.html").exists()

    # A rerun trains nothing: every run directory is untouched.
    stamps = {p: p.stat().st_mtime_ns for p in (root / "runs").glob("*/DONE")}
    again = run_pipeline(cfg, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (root / "runs").glob("*/DONE")} == stamps
    assert again["fits"]["regularized"].get("E") == results["fits"]["regularized"].get("E")


@pytest.mark.slow
def test_killed_pipeline_resumes_without_training_any_run_twice(small_corpus, tmp_path):
    root = tmp_path / "p"
    cfg = tiny_pipeline(small_corpus, root, data_scaling={"budgets": []})
    cfg_path = tmp_path / "pipeline.yaml"
    dump_yaml(cfg, cfg_path)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "dataeff.cli", "run", str(cfg_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((root / "runs").glob("*/DONE"))) < 6:
        assert proc.poll() is None, "pipeline finished before it could be killed"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the executor's workers die with it
    proc.wait()
    assert not (root / "results.json").exists()
    done_before = {p.parent: p.stat().st_mtime_ns for p in (root / "runs").glob("*/DONE")}
    assert done_before

    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    results = json.loads((root / "results.json").read_text())
    assert all(math.isfinite(r["best_loss"]) for r in results["tuned"])
    for run_dir, stamp in done_before.items():
        assert (run_dir / "DONE").stat().st_mtime_ns == stamp, f"{run_dir} was trained again"
    for done in (root / "runs").glob("*/DONE"):
        steps = [r["step"] for r in read_jsonl(done.parent / "metrics.jsonl") if "train_loss" in r]
        assert steps == sorted(set(steps)), f"{done.parent} repeated steps"
