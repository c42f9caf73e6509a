"""Sweep throughput: the local executor's default layout (one single-threaded job per core) versus one job at
a time with every core.

Small models do not scale across threads (a step is too short to split well), so running them side by side
should finish a sweep faster. Both layouts train the same runs (~0.9M parameters, a few hundred steps each) on
a synthetic corpus, after a warm-up job that starts the worker machinery. Prints both wall times, the speedup,
the share of the cores the jobs kept busy (their CPU time / (wall × cores)) and the load average, since other
processes on the machine skew both. The last line is one JSON object: parallel_s, serial_s, speedup, busy_share.

    python bench/sweep_throughput.py            # 4 runs of ~250 steps: ~1.5 minutes on 2 cores
    python bench/sweep_throughput.py --quick    # under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from train_throughput import write_corpus

from dataeff.config import from_dict
from dataeff.executor import ExecutorConfig, layout, machine_cores, run_jobs
from dataeff.order import EpochOrder
from dataeff.tokens import prepare
from dataeff.train import RunConfig


def _proc_cpu() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds) of every process, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
        except OSError:
            continue
        out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def _descendants_cpu() -> dict[int, float]:
    """CPU seconds of every live descendant: pool workers are forked by the fork server, so they are this
    process's grandchildren, which getrusage(RUSAGE_CHILDREN) only counts once the fork server exits."""
    try:
        import psutil
    except ImportError:
        procs = _proc_cpu()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        found, stack = {}, list(children.get(os.getpid(), []))
        while stack:
            pid = stack.pop()
            found[pid] = procs[pid][1]
            stack.extend(children.get(pid, []))
        return found
    found = {}
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        found[p.pid] = t.user + t.system
    return found


class CPUMeter:
    """CPU seconds the descendants spend inside the block, sampled often enough that an exiting worker
    loses at most one interval."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.start: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.last.update(_descendants_cpu())

    def __enter__(self) -> CPUMeter:
        self.start = _descendants_cpu()
        self.last = dict(self.start)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.last.update(_descendants_cpu())

    @property
    def seconds(self) -> float:
        return sum(t - self.start.get(pid, 0.0) for pid, t in self.last.items())


def timed_sweep(configs: list[RunConfig], executor: ExecutorConfig, root: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the workers) of one sweep."""
    with CPUMeter() as meter:
        start = time.perf_counter()
        results = run_jobs(configs, executor, root, progress=False)
        wall = time.perf_counter() - start
    failed = [r.error for r in results if r.status != "done"]
    if failed:
        raise SystemExit(f"a bench run did not train: {failed[0]}")
    return wall, meter.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs: under a minute")
    parser.add_argument("--runs", type=int, default=4, help="runs in the sweep")
    args = parser.parse_args()
    steps = 60 if args.quick else 250
    cores = machine_cores()
    seq_len, batch_tokens = 64, 512

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        write_corpus(tmp_path / "corpus.txt", n_docs=400)
        base = {
            "data": {"corpus": str(tmp_path / "corpus.txt"), "val_docs": 20, "cache_dir": str(tmp_path / "cache")},
            "tokenizer": {"kind": "bpe", "vocab_size": 512},
            "model": {"preset": "mini", "seq_len": seq_len},
            "train": {"batch_tokens": batch_tokens, "eval_every": 10**9, "final_eval_tokens": 4 * 1024, "progress": False},
        }
        # Tokenized once here, so neither layout pays for it.
        prepared = prepare(from_dict(RunConfig, base).data, from_dict(RunConfig, base).tokenizer, progress=False)
        split = prepared.split("train")
        windows = EpochOrder(split.tokens, split.doc_offsets, seq_len, seed=0).n

        def config(lr: float, epochs: float) -> RunConfig:
            return from_dict(RunConfig, {**base, "optim": {"lr": lr}, "train": {**base["train"], "epochs": epochs}})

        epochs = steps * (batch_tokens // seq_len) / windows
        configs = [config(1e-3 * (i + 1), epochs) for i in range(args.runs)]
        # Starts the fork server (it imports torch once) and the first-call paths outside the timings.
        run_jobs([config(1e-3, 4 * (batch_tokens // seq_len) / windows)], ExecutorConfig(workers=1),
                 tmp_path / "warmup", progress=False)

        load_before = os.getloadavg()
        parallel_s, parallel_cpu = timed_sweep(configs, ExecutorConfig(), tmp_path / "parallel")
        serial_s, serial_cpu = timed_sweep(configs, ExecutorConfig(workers=1, threads_per_worker=cores), tmp_path / "serial")
        load_after = os.getloadavg()

    speedup = serial_s / parallel_s
    busy = parallel_cpu / (parallel_s * cores)
    serial_busy = serial_cpu / (serial_s * cores)
    print(f"sweep: {args.runs} runs of {steps} steps, preset mini ({prepared.tokenizer.vocab_size}-token vocabulary), "
          f"seq {seq_len}, batch {batch_tokens} tokens; {cores} cores")
    workers, threads = layout(ExecutorConfig(), args.runs, cores)
    print(f"{f'default layout ({workers} workers × {threads} threads)':40} {parallel_s:6.1f} s, cores busy {busy:.0%}")
    print(f"{f'one run at a time (1 worker × {cores} threads)':40} {serial_s:6.1f} s, cores busy {serial_busy:.0%}")
    print(f"speedup: {speedup:.2f}x")
    print("load average (1/5/15 min) before: {:.2f} {:.2f} {:.2f}, after: {:.2f} {:.2f} {:.2f}".format(*load_before, *load_after))
    print(json.dumps({"parallel_s": round(parallel_s, 2), "serial_s": round(serial_s, 2), "speedup": round(speedup, 3),
                      "busy_share": round(busy, 3)}))


if __name__ == "__main__":
    main()
