"""One run directory, one truth: every path that gave another experiment's result, a stuck run, or a traceback
(issue "One run directory, one truth"), each checked here."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from test_train import SRC, tiny_config

from dataeff import averaging
from dataeff import checkpoint as ckpt
from dataeff.cli import main as cli_main
from dataeff.config import load, read_yaml
from dataeff.data.tokens import prepare, store_identity
from dataeff.errors import DataeffError, DataeffWarning
from dataeff.experiment.executor import ExecutorConfig, run_jobs
from dataeff.fsutil import exclusive_lock, read_jsonl
from dataeff.train import RunConfig, run_hash, train
from dataeff.train.rundir import LOCK, load_model


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "dataeff.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def tiny_args(corpus: Path, cache: Path) -> list[str]:
    return [f"data.corpus={corpus}", "data.val_docs=20", f"data.cache_dir={cache}", "tokenizer.kind=bpe",
            "tokenizer.vocab_size=300", "model.preset=nano", "model.seq_len=32", "train.batch_tokens=256",
            "train.epochs=2", "train.threads=1", "train.progress=false"]


# 1 -------------------------------------------------------------------------------------------------------


def test_a_finished_run_refuses_a_new_config_naming_the_difference(small_corpus, tmp_path):
    cfg = tiny_config(small_corpus, tmp_path / "run", epochs=2)
    cfg.optim.weight_decay = 1.6
    first = train(cfg)
    other = tiny_config(small_corpus, tmp_path / "run", epochs=3)
    other.optim.weight_decay = 0.0
    with pytest.raises(DataeffError) as err:
        train(other)
    message = str(err.value)
    assert "finished run" in message and "optim.weight_decay: 1.6 → 0.0" in message and "train.epochs: 2.0 → 3.0" in message
    assert json.loads((tmp_path / "run" / "DONE").read_text()) == first  # nothing was rewritten


# 2 -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_process_waits_for_the_lock_then_refuses_another_config(small_corpus, tmp_path):
    run = tmp_path / "race"
    args = [*tiny_args(small_corpus, tmp_path / "cache"), f"run_dir={run}", "train.epochs=150", "train.log_every=1"]
    cli("prepare", *args)
    env = {**os.environ, "PYTHONPATH": SRC}
    fast = subprocess.Popen([sys.executable, "-m", "dataeff.cli", "train", *args, "optim.lr=0.01"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (run / "manifest.json").exists():
        assert fast.poll() is None, fast.stderr.read() if fast.stderr else ""
        time.sleep(0.02)
    slow = cli("train", *args, "optim.lr=0.0003")
    fast.communicate(timeout=300)
    assert fast.returncode == 0
    assert slow.returncode == 1 and "in use by pid" in slow.stderr and "different config" in slow.stderr
    assert "optim.lr: 0.01 → 0.0003" in slow.stderr
    assert load(RunConfig, run / "config.yaml").optim.lr == 0.01
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train_loss" in r]
    assert steps == sorted(set(steps))


def test_identical_processes_train_once_and_the_executor_respects_the_lock(small_corpus, tmp_path):
    cfg = tiny_config(small_corpus, tmp_path / "runs" / "x", epochs=1)
    job = dataclasses.replace(cfg, run_dir=None)
    out_dir = tmp_path / "runs" / run_hash(job)
    results = {}
    with exclusive_lock(out_dir / LOCK, "test"):
        worker = threading.Thread(target=lambda: results.update(
            jobs=run_jobs([job], ExecutorConfig(workers=1, threads_per_worker=1), tmp_path / "runs", progress=False)))
        worker.start()
        time.sleep(3)
        assert worker.is_alive() and not (out_dir / "DONE").exists()  # waiting for the lock this test holds
    worker.join(timeout=120)
    [done] = results["jobs"]
    assert done.status == "done" and (out_dir / "DONE").exists()
    stamp = (out_dir / "DONE").stat().st_mtime_ns
    assert train(dataclasses.replace(job, run_dir=str(out_dir))) == done.result
    assert (out_dir / "DONE").stat().st_mtime_ns == stamp


def test_a_killed_holder_leaves_no_stale_lock(small_corpus, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(60)", str(run / LOCK)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    started = time.perf_counter()
    train(tiny_config(small_corpus, run, epochs=1))
    assert time.perf_counter() - started < 60


# 3 -------------------------------------------------------------------------------------------------------


def test_an_edited_corpus_makes_a_new_run(small_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = dataclasses.replace(tiny_config(small_corpus, tmp_path / "unused", epochs=1), run_dir=None)
    first = train(cfg)
    before = run_hash(cfg)
    small_corpus.write_text(small_corpus.read_text().replace("cat", "cow"), encoding="utf-8")
    assert run_hash(cfg) != before
    second = train(cfg)
    assert (tmp_path / "runs" / before / "DONE").exists() and (tmp_path / "runs" / run_hash(cfg) / "DONE").exists()
    assert second["val_loss"] != first["val_loss"]
    # A fixed run_dir trained on the old text is refused, not returned.
    fixed = tiny_config(small_corpus, tmp_path / "fixed", epochs=1)
    small_corpus.write_text(small_corpus.read_text().replace("cow", "cat"), encoding="utf-8")
    train(fixed)
    small_corpus.write_text(small_corpus.read_text().replace("cat", "cow"), encoding="utf-8")
    with pytest.raises(DataeffError, match=r"finished run of a different config .*data:"):
        train(fixed)


# 4, 5 ----------------------------------------------------------------------------------------------------


def test_epochs_are_what_was_trained_and_a_step_larger_than_them_is_refused(small_corpus, tmp_path):
    result = train(tiny_config(small_corpus, tmp_path / "one", epochs=1, batch_tokens=32 * 7))
    plan = json.loads((tmp_path / "one" / "manifest.json").read_text())["plan"]
    assert result["epochs_requested"] == 1.0
    assert result["epochs"] == pytest.approx(result["steps"] * plan["batch_seqs"] / plan["windows_per_epoch"])
    with pytest.raises(DataeffError, match=r"batch_tokens=65536 is one step of .* epochs, more than train\.epochs=2"):
        train(tiny_config(small_corpus, tmp_path / "huge", epochs=2, batch_tokens=65536))
    with pytest.raises(DataeffError, match=r"batch_tokens=100 is not a multiple of model\.seq_len=32: use 96 or 128"):
        train(tiny_config(small_corpus, tmp_path / "ragged", batch_tokens=100))
    assert not (tmp_path / "huge" / "config.yaml").exists() and not (tmp_path / "ragged" / "config.yaml").exists()


# 6 -------------------------------------------------------------------------------------------------------


def test_zero_eval_tokens_are_refused_before_training(small_corpus, tmp_path):
    for field in ("train.final_eval_tokens=0", "train.eval_tokens=0"):
        out = cli("train", *tiny_args(small_corpus, tmp_path / "cache"), f"run_dir={tmp_path / 'r'}", field)
        assert out.returncode == 1 and out.stderr.count("\n") == 1 and "must be >= 1" in out.stderr
        assert "Traceback" not in out.stderr and not (tmp_path / "r" / "config.yaml").exists()


def test_a_failure_after_the_last_step_leaves_a_resumable_run_and_a_reason(small_corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = tiny_config(small_corpus, run, epochs=2)

    def broken(self, heldout):
        raise OSError("disk full")

    monkeypatch.setattr(averaging.RunAveraging, "finish", broken)
    with pytest.raises(OSError):
        train(cfg)
    failure = json.loads((run / "FAILED").read_text())
    assert "after the last step: disk full" in failure["reason"]
    steps = json.loads((run / "manifest.json").read_text())["plan"]["total_steps"]
    assert ckpt.list_checkpoints(run / "checkpoints")[-1][0] == steps
    monkeypatch.undo()
    result = train(cfg)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, steps + 1))  # no step trained twice
    assert sum("val_loss" in r and r["step"] == steps for r in rows) == 1
    clean = train(tiny_config(small_corpus, tmp_path / "clean", epochs=2))
    assert (result["val_loss"], result["train_loss"], result["steps"]) == (clean["val_loss"], clean["train_loss"], clean["steps"])


# 7 -------------------------------------------------------------------------------------------------------


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(small_corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = tiny_config(small_corpus, run, epochs=3, checkpoint_every=2, keep_checkpoints=3)
    real = averaging.RunAveraging.after_step

    def die_at_7(self, step):
        real(self, step)
        if step == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(averaging.RunAveraging, "after_step", die_at_7)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    kept = ckpt.list_checkpoints(run / "checkpoints")
    assert [s for s, _ in kept][-2:] == [4, 6]
    kept[-1][1].write_bytes(kept[-1][1].read_bytes()[:100])  # a torn write
    result = train(cfg)
    assert (run / "checkpoints" / f"{kept[-1][1].name}.corrupt").exists()
    reference = train(tiny_config(small_corpus, tmp_path / "clean", epochs=3, checkpoint_every=2, keep_checkpoints=3))
    assert result["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-6)


# 8 -------------------------------------------------------------------------------------------------------


def test_done_without_weights_restores_them_from_the_final_checkpoint(small_corpus, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(small_corpus, run, epochs=1)
    train(cfg)
    before = load_model(run).state_dict()
    (run / "model.safetensors").unlink()
    train(cfg)
    after = load_model(run).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rerunning_after_done_was_deleted_logs_the_final_row_once(small_corpus, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(small_corpus, run, epochs=1)
    first = train(cfg)
    (run / "DONE").unlink()
    assert train(cfg)["val_loss"] == first["val_loss"]
    final = [r for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r and r["step"] == first["steps"]]
    assert len(final) == 1


def test_a_run_that_starts_over_logs_each_step_once(small_corpus, tmp_path):
    # Killed after logging steps but before its first checkpoint: the rerun starts from step 0.
    run = tmp_path / "run"
    cfg = tiny_config(small_corpus, run, epochs=1)
    first = train(cfg)
    (run / "DONE").unlink()
    shutil.rmtree(run / "checkpoints")
    assert train(cfg)["val_loss"] == first["val_loss"]
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train_loss" in r]
    assert steps == sorted(set(steps)) and len(steps) > 1


# 9, 10, 11 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["optim.lr=-0.01"], ["model.seq_len=0"],
], ids=["negative-lr", "zero-context"])
def test_bad_values_are_one_line_errors(small_corpus, tmp_path, args):
    out = cli("train", *tiny_args(small_corpus, tmp_path / "cache"), f"run_dir={tmp_path / 'r'}", *args)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_eval_refuses_bad_limits_and_two_runs(small_corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(small_corpus, run, epochs=1))
    for bad in ("max_tokens=0", "max_tokens=-5", "batch_size=0"):
        out = cli("eval", str(run), bad)
        assert out.returncode == 1 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    out = cli("eval", str(run), str(run))
    assert out.returncode == 1 and "2 values for run_dir" in out.stderr and "members=[...]" in out.stderr
    out = cli("sample", str(run), "prompts=[\x07bell]", "max_tokens=2")
    assert out.returncode == 1 and "not a valid list or mapping" in out.stderr


def test_useless_values_warn_and_duplicate_yaml_keys_are_errors(tmp_path):
    with pytest.warns(DataeffWarning, match="optim.lr=0: the weights never change"):
        load(RunConfig, None, ["optim.lr=0"])
    with pytest.warns(DataeffWarning, match="weight_decay=-0.1 is negative"):
        load(RunConfig, None, ["optim.weight_decay=-0.1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(RunConfig, None, ["optim.lr=1e-3"])  # an ordinary value warns of nothing
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\ntrain:\n  epochs: 2\noptim:\n  weight_decay: 0.1\n")
    with pytest.raises(DataeffError, match=rf"{path}:5: malformed YAML: duplicate key 'optim' \(lines 1 and 5\)"):
        read_yaml(path)


# smaller -------------------------------------------------------------------------------------------------


def test_hf_generate_matches_dataeff_sample_greedily(small_corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dataeff.generate.sample import SampleConfig, sample
    from dataeff.model.hf import export_run

    run = tmp_path / "run"
    train(tiny_config(small_corpus, run, epochs=2))
    ours = sample(SampleConfig(run_dir=str(run), prompts=["the cat", "a dog ran"], max_tokens=8, temperature=0,
                               stop_at_eos=False, dtype="fp32"))
    out = export_run(run, tmp_path / "hf")
    hf, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    for row in ours:
        ids = tok(row["prompt"], return_tensors="pt")["input_ids"]
        got = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
        assert got == row["tokens"]


def test_sampling_by_default_fills_the_context(small_corpus, tmp_path):
    from dataeff.generate.sample import SampleConfig, sample

    run = tmp_path / "run"
    train(tiny_config(small_corpus, run, epochs=1))
    [row] = sample(SampleConfig(run_dir=str(run), prompts=["the"], stop_at_eos=False))
    assert len(row["tokens"]) == 32 - 2  # the context less the document start and the prompt's one token


def test_a_killed_prepare_leaves_nothing_and_stores_follow_the_umask(small_corpus, tmp_path):
    cfg = load(RunConfig, None, [f"data.corpus={small_corpus}", f"data.cache_dir={tmp_path / 'cache'}", "tokenizer.vocab_size=300"])
    stale = tmp_path / "cache" / f".{store_identity(cfg.data, cfg.tokenizer)}.abc.tmp"  # a build killed midway
    stale.mkdir(parents=True)
    old = os.umask(0o022)
    try:
        prepared = prepare(cfg.data, cfg.tokenizer, progress=False)
    finally:
        os.umask(old)
    assert not stale.exists()
    assert oct(prepared.path.stat().st_mode & 0o777) == oct(0o755)


def test_runs_on_an_empty_directory_writes_nothing(tmp_path, capsys):
    assert cli_main(["runs", str(tmp_path)]) == 0
    assert "no run directories" in capsys.readouterr().out and not list(tmp_path.iterdir())
