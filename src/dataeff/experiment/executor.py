"""Run many jobs: a process pool on one machine, or Ray tasks on a cluster.

A job is any function named by its dotted path, ``fn(config, out_dir) -> metrics``, with a config dataclass
and an output directory: training runs (:func:`run_jobs`), and the pipeline's other heavy work (sampling a
teacher, scoring tasks), so that on Ray it all runs on the cluster. Every job is a pure function of its
config, so the executor decides from the directory alone what is left to do: DONE jobs are skipped without
starting a worker, FAILED ones are skipped unless asked to retry, and partial ones (a killed sweep) start
again (a training run resumes from its last checkpoint). A job that raises never takes the sweep down: it is
written as a FAILED marker and reported.

A training run's directory is described by its ``config.yaml``; any other job's by ``job.yaml`` (its function
and config), so a directory is never taken for another config's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tqdm.auto import tqdm

from dataeff.config import config_hash, dump_yaml, from_dict, option, read_yaml, to_dict
from dataeff.errors import DataeffError
from dataeff.train.config import RunConfig
from dataeff.train.identity import recorded_identity, run_hash, run_identity
from dataeff.train.rundir import FAILED, mark_done, mark_failed, read_failure, read_result, run_lock, status

if TYPE_CHECKING:
    from dataeff.experiment.progress import PipelineProgress


@dataclass
class ExecutorConfig:
    backend: Literal["local", "ray"] = option("local", "local (a process pool on this machine) or ray")
    workers: int = option(0, "jobs run at once (0: auto, one per thread group of the machine's cores)")
    threads_per_worker: int = option(
        0, "torch threads per job (0: auto: workers × threads = cores; a single job gets every core)")
    retry_failed: bool = option(False, "train runs again whose directory holds a FAILED marker")
    ray_address: str | None = option(
        None, "ray: null starts a local Ray instance on this machine's cores; auto or host:port joins a cluster"
    )
    cpus_per_job: float = option(0, "ray: CPUs reserved per job (0: threads_per_worker)")
    gpus_per_job: float = option(0, "GPUs per job; above 0 the jobs train on cuda")


Outcome = tuple[Literal["done", "failed"], dict[str, Any] | None, str | None, float]
TRAIN = "dataeff.train.loop:train_job"
JOB_FILE = "job.yaml"


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn(config, out_dir)`` returns the metrics its DONE marker holds.

    ``fn`` is ``"package.module:function"``; ``config`` a config dataclass, rebuilt in the worker from its
    plain form (so it crosses process and machine boundaries as data, never as a pickle of code).
    """

    fn: str
    config: Any
    out_dir: Path

    def identity(self) -> dict[str, Any]:
        return {"fn": self.fn, "config": run_identity(self.config) if self.fn == TRAIN else to_dict(self.config)}


@dataclass(frozen=True)
class JobResult:
    config: Any  # the job's config (a RunConfig for training runs)
    run_dir: Path  # the job's output directory
    status: Literal["done", "skipped", "failed"]  # skipped: nothing ran (DONE already, or FAILED and not retried)
    result: dict[str, Any] | None  # the DONE metrics
    error: str | None  # one line: why it failed now or before
    seconds: float


def machine_cores() -> int:
    # The affinity mask, not the machine, bounds what this process may use (containers, taskset).
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def layout(cfg: ExecutorConfig, n_jobs: int, cores: int) -> tuple[int, int]:
    """(workers, threads per worker): by default the jobs share the cores evenly, one thread each when
    there are at least as many jobs as cores, and never more workers than jobs. On Ray a job uses as many
    threads as the CPUs it reserves."""
    per_job = cfg.threads_per_worker or (int(cfg.cpus_per_job) if cfg.backend == "ray" else 0)
    workers = cfg.workers or (max(1, cores // per_job) if per_job else cores)
    workers = max(1, min(workers, n_jobs))
    return workers, per_job or max(1, cores // workers)


def _check(cfg: ExecutorConfig) -> None:
    for name in ("workers", "threads_per_worker", "cpus_per_job", "gpus_per_job"):
        if getattr(cfg, name) < 0:
            raise DataeffError(f"executor.{name}={getattr(cfg, name)} must be 0 (auto) or positive")


def _one_line(e: BaseException) -> str:
    if isinstance(e, DataeffError):
        return str(e)
    first = next((line for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _describe(job: Job) -> dict[str, Any]:
    """What a job's directory records of it: a run's config.yaml holds its config; any other job's job.yaml
    holds its function and config."""
    return {"fn": job.fn, "config": to_dict(job.config)}


def _recorded(job: Job) -> dict[str, Any] | None:
    """The identity of the job whose record ``job.out_dir`` holds (None when it holds none)."""
    if job.fn == TRAIN:
        recorded = recorded_identity(job.out_dir)
        return None if recorded is None else {"fn": TRAIN, "config": recorded}
    path = job.out_dir / JOB_FILE
    if not path.exists():
        return None
    data = read_yaml(path)[0]
    return {"fn": data.get("fn"), "config": data.get("config")}


def _owns(job: Job) -> bool:
    """Whether ``job.out_dir`` is this job's: a directory holding another config's work must not be marked."""
    try:
        recorded = _recorded(job)
    except DataeffError:
        return False
    return recorded is None or recorded == job.identity()


def _exit_with(driver: int) -> None:
    # A worker's parent is the fork server, not the driver: without this a SIGKILLed sweep leaves its workers
    # training on, competing with the rerun that resumes the same runs.
    while True:
        time.sleep(1.0)
        try:
            os.kill(driver, 0)
        except ProcessLookupError:
            os._exit(1)


def worker_cores(slot: int, workers: int, threads: int, cores: list[int]) -> list[int]:
    """The cores worker ``slot`` (0-based) of ``workers`` is pinned to: its own ``threads`` of the driver's
    ``cores``, so two workers never share a core (wrapping around when the workers want more than exist)."""
    start = (slot % workers) * threads
    return [cores[(start + i) % len(cores)] for i in range(max(1, min(threads, len(cores))))]


def _init_worker(threads: int, environ: dict[str, str], driver: int, slots: Any, workers: int,
                 cores: list[int]) -> None:
    threading.Thread(target=_exit_with, args=(driver,), daemon=True, name="dataeff-driver-watch").start()
    # A fork server keeps the environment it started with; jobs must see the driver's as of this sweep.
    os.environ.clear()
    os.environ.update(environ)
    # Libraries that start their own thread pools later (OpenMP, MKL) read these; torch is told directly.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    # Each worker on cores of its own: without pinning the kernel migrates a worker's threads onto its
    # neighbour's core, and OpenMP's barriers then wait on a thread that is not running.
    with slots.get_lock():
        slot = slots.value
        slots.value += 1
    if hasattr(os, "sched_setaffinity") and cores:
        os.sched_setaffinity(0, worker_cores(slot, workers, threads, cores))
    import torch

    torch.set_num_threads(threads)
    # A training job has no independent ops to overlap: inter-op threads would only compete for the share.
    with contextlib.suppress(RuntimeError):  # the pool already started in this process
        torch.set_num_interop_threads(1)


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def _run_job(data: dict[str, Any]) -> Outcome:
    """Run one job; any exception becomes a FAILED marker and an error line, never a crashed sweep."""
    start = time.perf_counter()
    cls = _resolve(data["config_type"])
    job = Job(data["fn"], from_dict(cls, data["config"], source="<executor job>"), Path(data["out_dir"]))
    # Reached with a FAILED marker only when retrying; removing it lets a new failure be told from the old one.
    (job.out_dir / FAILED).unlink(missing_ok=True)
    try:
        if job.fn == TRAIN:
            result = _resolve(job.fn)(job.config, job.out_dir)  # train() locks its run directory itself
        else:
            with run_lock(job.out_dir):
                # Another process may have finished it while this one waited for the lock.
                if status(job.out_dir) == "done":
                    return "done", read_result(job.out_dir), None, time.perf_counter() - start
                dump_yaml(_describe(job), job.out_dir / JOB_FILE)
                result = _resolve(job.fn)(job.config, job.out_dir)
                mark_done(job.out_dir, result)
    except Exception as e:
        error = _one_line(e)
        if status(job.out_dir) != "failed" and _owns(job):
            if job.fn == TRAIN and not (job.out_dir / "config.yaml").exists():
                dump_yaml(job.config, job.out_dir / "config.yaml")  # so the failed run is self-describing and indexable
            details = {} if isinstance(e, DataeffError) else {"traceback": traceback.format_exc()}
            mark_failed(job.out_dir, error, **details)
        return "failed", None, error, time.perf_counter() - start
    return "done", result, None, time.perf_counter() - start


def _died(e: BaseException) -> Outcome:
    # The worker itself is gone (killed, out of memory): no marker, so the next sweep resumes the run.
    return "failed", None, f"worker died before the job finished ({_one_line(e)}); rerun to resume it", 0.0


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver where there is one, else spawn; never a plain fork of the driver, which may have run torch
    ops already: its child would inherit OpenMP thread pools in an undefined state. The fork server only
    imports torch, and the optimizers' lazy import of torch._dynamo (seconds), so every worker forked from
    it starts ready instead of paying for both again."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["dataeff.experiment.executor", "dataeff.train.loop", "torch._dynamo"])
    return ctx


def _run_local(jobs: dict[Path, dict[str, Any]], workers: int, threads: int, on_done: Callable[[Path, Outcome], None]) -> None:
    ctx = _mp_context()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    # Pinning pays only when the workers' threads fill the machine; past that they must share cores anyway.
    pinned = cores if workers * threads <= len(cores) else []
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(threads, dict(os.environ), os.getpid(), ctx.Value("i", 0), workers, pinned))
    try:
        futures = {pool.submit(_run_job, data): key for key, data in jobs.items()}
        for future in as_completed(futures):
            try:
                outcome = future.result()
            except Exception as e:
                outcome = _died(e)
            on_done(futures[future], outcome)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise DataeffError("executor.backend=ray needs Ray: pip install 'dataeff[ray]'") from None
    return ray


def _start_ray(cfg: ExecutorConfig) -> Any:
    """The Ray API with a cluster attached: one already initialised, the one at ray_address, or a new local one."""
    ray = _import_ray()
    if not ray.is_initialized():
        if cfg.ray_address is None:
            # No runtime_env: workers on this machine import dataeff from the driver's environment as it is.
            ray.init(num_cpus=machine_cores(), include_dashboard=False, logging_level="warning",
                     object_store_memory=256 * 1024**2)
        else:
            ray.init(address=cfg.ray_address, logging_level="warning")
    return ray


def _run_ray(ray: Any, jobs: dict[Path, dict[str, Any]], cfg: ExecutorConfig, threads: int,
             on_done: Callable[[Path, Outcome], None]) -> None:
    task = ray.remote(num_cpus=cfg.cpus_per_job or threads, num_gpus=cfg.gpus_per_job)(_run_job)
    queue = list(jobs.items())
    # Ray schedules by reserved CPUs; `workers` additionally caps how many jobs are in flight.
    limit = cfg.workers or len(queue)
    in_flight: dict[Any, Path] = {}
    while queue or in_flight:
        while queue and len(in_flight) < limit:
            key, data = queue.pop(0)
            in_flight[task.remote(data)] = key
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        key = in_flight.pop(ready[0])
        try:
            outcome = ray.get(ready[0])
        except Exception as e:
            outcome = _died(e)
        on_done(key, outcome)


def run(jobs: list[Job], cfg: ExecutorConfig, *, progress: bool = True, desc: str = "jobs",
        tracker: PipelineProgress | None = None) -> list[JobResult]:
    """Run every job (once, however often it is listed) and return one result per job, in order. With a
    ``tracker`` (a pipeline's progress line) the batch and each finished job are reported to it, and this
    batch's own bar shows only if ``progress`` asks for it too."""
    _check(cfg)
    unique: dict[Path, Job] = {}
    for job in jobs:
        first = unique.setdefault(job.out_dir, job)
        if first.identity() != job.identity():
            raise DataeffError(f"{job.out_dir}: set as the directory of two different jobs "
                               f"({config_hash(first.identity())} and {config_hash(job.identity())})")

    results: dict[Path, JobResult] = {}
    for d, job in unique.items():
        if not _owns(job):
            results[d] = JobResult(job.config, d, "failed", None, f"{d}: holds another config's work; choose another "
                                   "directory, or delete that one", 0.0)
            continue
        st = status(d)
        if st == "done":
            results[d] = JobResult(job.config, d, "skipped", read_result(d), None, 0.0)
        elif st == "failed" and not cfg.retry_failed:
            results[d] = JobResult(job.config, d, "skipped", None, read_failure(d).get("reason", "failed"), 0.0)
    pending = [d for d in unique if d not in results]
    if tracker is not None and not pending:
        tracker.batch(0, len(results), 1)

    if pending:
        ray = _start_ray(cfg) if cfg.backend == "ray" else None
        cores = int(ray.cluster_resources().get("CPU", 0)) if ray is not None else 0
        workers, threads = layout(cfg, len(pending), cores or machine_cores())
        if tracker is not None:
            tracker.batch(len(pending), len(results), workers)
        payload = {d: {"fn": unique[d].fn, "out_dir": str(d), "config": to_dict(_placed(unique[d], cfg, threads)),
                       "config_type": f"{type(unique[d].config).__module__}:{type(unique[d].config).__qualname__}"}
                   for d in pending}
        bar = tqdm(total=len(unique), initial=len(results), desc=desc, unit="job", disable=not progress,
                   dynamic_ncols=True)
        failed = 0

        def on_done(d: Path, outcome: Outcome) -> None:
            nonlocal failed
            state, result, error, seconds = outcome
            results[d] = JobResult(unique[d].config, d, state, result, error, seconds)
            failed += state == "failed"
            bar.update(1)
            bar.set_postfix(failed=failed)
            if tracker is not None:
                tracker.finished(seconds, failed=state == "failed")

        try:
            if ray is not None:
                _run_ray(ray, payload, cfg, threads, on_done)
            else:
                _run_local(payload, workers, threads, on_done)
        finally:
            bar.close()

    # Duplicates share their job's outcome but keep their own config object.
    return [dataclasses.replace(results[job.out_dir], config=job.config) for job in jobs]


def _placed(job: Job, cfg: ExecutorConfig, threads: int) -> Any:
    """A training run's config as its worker runs it: its share of the threads, no progress bar of its own, on
    a GPU when the job reserves one. Other jobs get their threads from the worker."""
    if job.fn != TRAIN:
        return job.config
    device = {"device": "cuda"} if cfg.gpus_per_job > 0 else {}
    c = job.config
    return dataclasses.replace(c, run_dir=str(job.out_dir),
                               train=dataclasses.replace(c.train, threads=threads, progress=False, **device))


def run_jobs(configs: list[RunConfig], cfg: ExecutorConfig, root: str | Path, *, progress: bool = True,
             tracker: PipelineProgress | None = None) -> list[JobResult]:
    """Train every config (once, however often it is listed) and return one result per config, in order.

    A config's run directory is its own ``run_dir`` if set, else ``<root>/<run_hash(config)>``.
    """
    _check(cfg)
    root = Path(root)
    jobs = [Job(TRAIN, c, Path(c.run_dir) if c.run_dir else root / run_hash(c)) for c in configs]
    seen: dict[Path, RunConfig] = {}
    for j in jobs:
        first = seen.setdefault(j.out_dir, j.config)
        if run_identity(first) != run_identity(j.config):
            raise DataeffError(f"{j.out_dir}: run_dir is set by two different configs ({run_hash(first)} and "
                               f"{run_hash(j.config)})")
    return run(jobs, cfg, progress=progress, desc="runs", tracker=tracker)
