from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataeff import checkpoint as ckpt
from dataeff.config import from_dict, load, to_dict
from dataeff.errors import DataeffError
from dataeff.executor import ExecutorConfig, layout, run_jobs
from dataeff.experiment.executor import worker_cores
from dataeff.experiment.progress import PipelineProgress
from dataeff.fsutil import read_jsonl
from dataeff.train import RunConfig, run_hash

SRC = str(Path(__file__).resolve().parents[1] / "src")


def job(corpus: Path, cache: Path, lr: float = 1e-2, **train_over) -> RunConfig:
    """A ~1 s run: nano model, 192-token batches, one epoch over the small corpus."""
    return from_dict(RunConfig, {
        "data": {"corpus": str(corpus), "val_docs": 20, "cache_dir": str(cache)},
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "model": {"preset": "nano", "seq_len": 32},
        "optim": {"lr": lr, "weight_decay": 0.8},
        "train": {"epochs": 1, "batch_tokens": 192, "eval_every": 10**6, "progress": False, **train_over},
    })


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", object_store_memory=128 * 1024**2)
    yield
    ray.shutdown()


@pytest.fixture(params=["local", "ray"])
def backend(request) -> str:
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    return request.param


def stamps(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for pattern in ("*/metrics.jsonl", "*/DONE", "*/FAILED") for p in root.glob(pattern)}


def test_layout_shares_the_cores():
    auto = ExecutorConfig()
    assert layout(auto, n_jobs=4, cores=2) == (2, 1)
    assert layout(auto, n_jobs=1, cores=2) == (1, 2)  # a lone job gets every core
    assert layout(auto, n_jobs=3, cores=8) == (3, 2)
    assert layout(ExecutorConfig(workers=1), n_jobs=4, cores=2) == (1, 2)
    assert layout(ExecutorConfig(threads_per_worker=2), n_jobs=4, cores=8) == (4, 2)
    assert layout(ExecutorConfig(workers=4, threads_per_worker=3), n_jobs=2, cores=2) == (2, 3)
    assert layout(ExecutorConfig(backend="ray", cpus_per_job=2), n_jobs=8, cores=8) == (4, 2)


def test_each_worker_is_pinned_to_cores_of_its_own():
    cores = [0, 1, 2, 3]
    assert [worker_cores(i, 2, 2, cores) for i in range(2)] == [[0, 1], [2, 3]]
    assert [worker_cores(i, 4, 1, cores) for i in range(4)] == [[0], [1], [2], [3]]
    # Workers started later (replacing dead ones) wrap around the slots.
    assert worker_cores(5, 4, 1, cores) == [1]
    assert worker_cores(0, 1, 8, [4, 6]) == [4, 6]


def test_bad_executor_settings_are_one_line_errors(small_corpus, tmp_path, monkeypatch):
    with pytest.raises(DataeffError, match=r"executor.workers=-1 must be 0 \(auto\) or positive"):
        run_jobs([], ExecutorConfig(workers=-1), tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(DataeffError, match=r"pip install 'dataeff\[ray\]'"):
        run_jobs([job(small_corpus, tmp_path / "cache")], ExecutorConfig(backend="ray"), tmp_path / "runs", progress=False)
    a, b = job(small_corpus, tmp_path / "cache"), job(small_corpus, tmp_path / "cache", lr=3e-3)
    a.run_dir = b.run_dir = str(tmp_path / "same")
    with pytest.raises(DataeffError, match="run_dir is set by two different configs"):
        run_jobs([a, b], ExecutorConfig(), tmp_path / "runs", progress=False)


def test_sweep_runs_each_config_once_and_a_rerun_trains_nothing(small_corpus, tmp_path, backend):
    root, cache = tmp_path / "runs", tmp_path / "cache"
    configs = [job(small_corpus, cache, lr=lr) for lr in (3e-3, 1e-2, 3e-2)]
    cfg = ExecutorConfig(backend=backend, workers=2, threads_per_worker=1)
    tracker = PipelineProgress(enabled=False)
    first = run_jobs([*configs, configs[1]], cfg, root, progress=False, tracker=tracker)
    assert [r.status for r in first] == ["done"] * 4
    assert (tracker.planned, tracker.done, tracker.workers, len(tracker.job_seconds)) == (3, 3, 2, 3)
    # The directory name is the config hash; the duplicate ran once and shares its run.
    assert sorted(p.name for p in root.iterdir()) == sorted(run_hash(c) for c in configs)
    assert first[3].run_dir == first[1].run_dir and first[3].result == first[1].result
    assert all(r.result and r.result["steps"] > 5 and r.seconds > 0 for r in first)
    saved = load(RunConfig, first[0].run_dir / "config.yaml")
    assert saved.train.threads == 1 and saved.train.progress is False

    before = stamps(root)
    again = run_jobs(configs, cfg, root, progress=False, tracker=tracker)
    assert [r.status for r in again] == ["skipped"] * 3
    assert (tracker.planned, tracker.done, len(tracker.job_seconds)) == (6, 6, 3)  # skipped: done, never timed
    assert [r.result for r in again] == [r.result for r in first[:3]]
    assert stamps(root) == before


def test_a_failing_job_is_recorded_and_not_retried_unless_asked(small_corpus, tmp_path, backend):
    root, cache = tmp_path / "runs", tmp_path / "cache"
    good = [job(small_corpus, cache, lr=lr) for lr in (3e-3, 1e-2)]
    bad = job(small_corpus, cache, batch_tokens=16)  # valid config, fails only once training plans its batches
    cfg = ExecutorConfig(backend=backend, workers=2, threads_per_worker=1)
    results = run_jobs([good[0], bad, good[1]], cfg, root, progress=False)
    assert [r.status for r in results] == ["done", "failed", "done"]
    message = "train.batch_tokens=16 is smaller than one sequence (model.seq_len=32)"
    assert results[1].error == message and results[1].result is None
    failed_dir = results[1].run_dir
    assert json.loads((failed_dir / "FAILED").read_text())["reason"] == message
    assert (failed_dir / "config.yaml").exists()  # a failed run still says what it was

    before = stamps(root)
    again = run_jobs([good[0], bad, good[1]], cfg, root, progress=False)
    assert [(r.status, r.error) for r in again] == [("skipped", None), ("skipped", message), ("skipped", None)]
    assert stamps(root) == before

    retried = run_jobs([good[0], bad, good[1]], dataclasses.replace(cfg, retry_failed=True), root, progress=False)
    assert [r.status for r in retried] == ["skipped", "failed", "skipped"]
    assert retried[1].error == message
    after = stamps(root)
    assert after[failed_dir / "FAILED"] != before[failed_dir / "FAILED"]
    assert {p: s for p, s in after.items() if failed_dir not in p.parents} == {
        p: s for p, s in before.items() if failed_dir not in p.parents
    }


_SWEEP = """
import json, sys
from dataeff.config import from_dict
from dataeff.executor import ExecutorConfig, run_jobs
from dataeff.train import RunConfig
configs = [from_dict(RunConfig, c) for c in json.load(open(sys.argv[1]))]
run_jobs(configs, ExecutorConfig(workers=2, threads_per_worker=1), sys.argv[2], progress=False)
"""


@pytest.mark.slow
def test_killed_sweep_resumes_and_trains_no_finished_run_again(small_corpus, tmp_path):
    root, cache = tmp_path / "runs", tmp_path / "cache"
    # Long enough (several checkpoints each) to be caught between checkpoints.
    configs = [job(small_corpus, cache, lr=lr, epochs=6, checkpoint_every=3, log_every=1) for lr in (1e-3, 3e-3, 1e-2, 3e-2)]
    spec = tmp_path / "configs.json"
    spec.write_text(json.dumps([to_dict(c) for c in configs]))
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _SWEEP, str(spec), str(root)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def partial_with_checkpoint() -> list[Path]:
        return [d for d in root.glob("*") if not (d / "DONE").exists() and ckpt.list_checkpoints(d / "checkpoints")]

    deadline = time.time() + 120
    while time.time() < deadline and not (list(root.glob("*/DONE")) and partial_with_checkpoint()):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "sweep ended before the kill"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its workers, as a lost machine would
    proc.wait()
    done_before = {p.parent: p.stat().st_mtime_ns for p in root.glob("*/DONE")}
    resumed = partial_with_checkpoint()
    assert done_before and resumed

    results = run_jobs(configs, ExecutorConfig(workers=2, threads_per_worker=1), root, progress=False)
    assert all((r.run_dir / "DONE").exists() for r in results)
    for r in results:
        assert r.status == ("skipped" if r.run_dir in done_before else "done")
        steps = [row["step"] for row in read_jsonl(r.run_dir / "metrics.jsonl") if "train_loss" in row]
        assert steps == list(range(1, r.result["steps"] + 1)), f"{r.run_dir}: steps repeated or missing"
    for run_dir, stamp in done_before.items():
        assert (run_dir / "DONE").stat().st_mtime_ns == stamp, f"{run_dir} was trained again"
