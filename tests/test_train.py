from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dataeff import checkpoint as ckpt
from dataeff.cli import main as cli_main
from dataeff.config import from_dict, load
from dataeff.errors import DataeffError
from dataeff.evaluate_run import EvalConfig, load_model, run_eval
from dataeff.fsutil import read_jsonl
from dataeff.train import OptimConfig, RunConfig, lr_multiplier, train

SRC = str(Path(__file__).resolve().parents[1] / "src")


def tiny_config(corpus: Path, run_dir: Path, **train_over) -> RunConfig:
    return from_dict(RunConfig, {
        "run_dir": str(run_dir),
        "data": {"corpus": str(corpus), "val_docs": 20, "cache_dir": str(run_dir.parent / "cache")},
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "model": {"preset": "nano", "seq_len": 32},
        "optim": {"lr": 1e-2, "weight_decay": 0.8},
        "train": {"epochs": 3, "batch_tokens": 256, "progress": False, "threads": 1, "log_every": 1, **train_over},
    })


def test_lr_schedules():
    total = 100
    cos = OptimConfig(schedule="cosine", warmup=0.1, min_lr_ratio=0.1)
    lrs = [lr_multiplier(s, total, cos) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # monotone after warmup
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    wsd = OptimConfig(schedule="wsd", warmup=0.1, decay=0.2)
    lrs = [lr_multiplier(s, total, wsd) for s in range(total)]
    assert lrs[10:80] == [1.0] * 70 and lrs[-1] == pytest.approx(0.0) and 0 < lrs[90] < 1


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_training_learns_and_writes_the_run_contract(small_corpus, tmp_path, optimizer):
    cfg = tiny_config(small_corpus, tmp_path / "run", epochs=6)
    cfg.optim.name = optimizer
    result = train(cfg)
    run = tmp_path / "run"
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "model.safetensors", "tokenizer.json", "DONE"):
        assert (run / name).exists(), name
    assert ckpt.list_checkpoints(run / "checkpoints")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["seeds"]["init_seed"] == 0 and manifest["torch"] == torch.__version__
    rows = read_jsonl(run / "metrics.jsonl")
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert losses[-1] < losses[0] - 1.0
    # Well below the entropy of the unigram distribution: the model uses context.
    assert result["val_loss"] < result["unigram_entropy"]
    # The resolved config reproduces the run's identity.
    again = load(RunConfig, run / "config.yaml")
    assert again.optim.name == optimizer and again.run_dir == str(run)


def test_completed_run_is_not_retrained(small_corpus, tmp_path):
    cfg = tiny_config(small_corpus, tmp_path / "run", epochs=1)
    first = train(cfg)
    stamp = (tmp_path / "run" / "metrics.jsonl").stat().st_mtime_ns
    assert train(cfg) == first
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_mtime_ns == stamp


def test_killed_after_last_step_finishes_with_the_same_result(small_corpus, tmp_path):
    cfg = tiny_config(small_corpus, tmp_path / "run", epochs=1)
    first = train(cfg)
    (tmp_path / "run" / "DONE").unlink()  # as if killed between the final checkpoint and the marker
    again = train(cfg)
    assert again["train_loss"] == first["train_loss"] and again["val_loss"] == pytest.approx(first["val_loss"])


def test_run_dir_with_another_config_is_refused(small_corpus, tmp_path):
    train(tiny_config(small_corpus, tmp_path / "run", epochs=1))
    (tmp_path / "run" / "DONE").unlink()
    other = tiny_config(small_corpus, tmp_path / "run", epochs=2)
    with pytest.raises(DataeffError, match="different config"):
        train(other)


def test_divergence_stops_and_keeps_last_good_checkpoint(small_corpus, tmp_path, monkeypatch):
    cfg = tiny_config(small_corpus, tmp_path / "run", epochs=3, checkpoint_every=2)
    from dataeff import model as model_mod

    real_forward = model_mod.Transformer.forward
    calls = {"n": 0}

    def flaky_forward(self, idx, targets=None, cache=None):
        out = real_forward(self, idx, targets, cache)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 5:
                return out * float("nan")
        return out

    monkeypatch.setattr(model_mod.Transformer, "forward", flaky_forward)
    with pytest.raises(DataeffError, match=r"training diverged: loss is nan at step 4; last good checkpoint .*step_000000004"):
        train(cfg)
    run = tmp_path / "run"
    assert not (run / "DONE").exists()
    assert "nan" in json.loads((run / "FAILED").read_text())["reason"]
    model = load_model(run, run / "checkpoints" / "step_000000004.safetensors")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_eval_scores_splits_and_files(small_corpus, tmp_path):
    cfg = tiny_config(small_corpus, tmp_path / "run", epochs=2)
    result = train(cfg)
    val = run_eval(EvalConfig(run_dir=str(tmp_path / "run"), dtype=cfg.train.dtype))
    assert val["loss"] == pytest.approx(result["val_loss"], rel=1e-6)
    # bits per byte and word perplexity follow from the same nats.
    assert val["bpb"] > 0 and val["word_ppl"] > math.exp(val["loss"])
    text = tmp_path / "other.txt"
    text.write_text("the cat sat on the red house.\n\nthe dog ran quickly under the tree.\n", encoding="utf-8")
    on_file = run_eval(EvalConfig(run_dir=str(tmp_path / "run"), file=str(text)))
    assert on_file["source"] == str(text) and on_file["tokens"] > 5
    with pytest.raises(DataeffError, match="not in the run's token store"):
        run_eval(EvalConfig(run_dir=str(tmp_path / "run"), split="dev"))


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  learning_rate: 0.1\n")
    assert cli_main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{cfg}:2" in err and "optim.learning_rate" in err and "optim.lr" in err


def _train_cmd(cfg_path: Path) -> list[str]:
    return [sys.executable, "-m", "dataeff.cli", "train", str(cfg_path)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _write_cfg(cfg: RunConfig, path: Path) -> Path:
    from dataeff.config import dump_yaml

    dump_yaml(cfg, path)
    return path


@pytest.mark.slow
def test_sigkill_then_rerun_matches_uninterrupted_run(small_corpus, tmp_path):
    """Kill the trainer at an arbitrary point (after a checkpoint), rerun the same command: same final loss."""
    over = {"epochs": 8, "checkpoint_every": 3, "dtype": "fp32"}
    whole_cfg, killed_cfg = (tiny_config(small_corpus, tmp_path / name, **over) for name in ("whole", "killed"))
    for c in (whole_cfg, killed_cfg):
        c.model.dropout = 0.1  # resumption must restore the dropout randomness too
    whole = train(whole_cfg)

    cfg_path = _write_cfg(killed_cfg, tmp_path / "killed.yaml")
    proc = subprocess.Popen(_train_cmd(cfg_path), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any(s >= 9 for s, _ in ckpt.list_checkpoints(ckpt_dir)):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "DONE").exists()
    killed_at = ckpt.list_checkpoints(ckpt_dir)[-1][0]
    assert killed_at < whole["steps"]

    subprocess.run(_train_cmd(cfg_path), env=_env(), check=True, capture_output=True)
    resumed = json.loads((tmp_path / "killed" / "DONE").read_text())
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], abs=1e-5)
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-5)
    # metrics.jsonl has one row per step, none duplicated by the restart.
    steps = [r["step"] for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl") if "train_loss" in r]
    assert steps == list(range(1, whole["steps"] + 1))


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(small_corpus, tmp_path):
    over = {"epochs": 2, "dtype": "fp32", "batch_tokens": 512}
    single = tiny_config(small_corpus, tmp_path / "single", **over)
    train(single)
    cfg_path = _write_cfg(tiny_config(small_corpus, tmp_path / "ddp", **over), tmp_path / "ddp.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dataeff.cli", "train", str(cfg_path)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    a = [r["train_loss"] for r in read_jsonl(tmp_path / "single" / "metrics.jsonl") if "train_loss" in r]
    b = [r["train_loss"] for r in read_jsonl(tmp_path / "ddp" / "metrics.jsonl") if "train_loss" in r]
    assert len(a) == len(b) > 5
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3
