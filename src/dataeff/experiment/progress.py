"""One line for a whole pipeline: the stage, runs done of those planned, the time elapsed, and an ETA.

A stage hands the executor its work batch by batch (the tuner asks for a round at a time), so the runs planned
are the runs known so far: the count grows as stages submit work. The ETA is the measured mean time of the jobs
that ran in this pipeline times the jobs still to run, shared among the workers; jobs skipped as already done
count as done and take no time. On a terminal a background thread redraws the line every second, so the clock
moves while a long run trains.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from tqdm.auto import tqdm


def clock(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class PipelineProgress:
    """The pipeline's progress line; the executor reports each batch it starts and each job it finishes."""

    def __init__(self, *, enabled: bool = True, file: TextIO | None = None, refresh: float = 1.0):
        self.stage = ""
        self.planned = 0
        self.done = 0
        self.failed = 0
        self.workers = 1
        self.job_seconds: list[float] = []
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self._file = file
        self._bar = tqdm(total=None, bar_format="{desc}", disable=not enabled, file=file, dynamic_ncols=True,
                         leave=True)
        self._stop = threading.Event()
        self._ticker = None
        # Redrawn every second on a terminal; in a log, only when something happens.
        if enabled and getattr(file or sys.stderr, "isatty", lambda: False)():
            self._ticker = threading.Thread(target=self._tick, args=(refresh,), daemon=True, name="dataeff-progress")
            self._ticker.start()

    def enter(self, stage: str) -> None:
        with self._lock:
            self.stage = stage
        self.draw()

    def batch(self, pending: int, skipped: int, workers: int) -> None:
        """A batch of jobs: ``pending`` will run on ``workers`` workers; ``skipped`` were already done."""
        with self._lock:
            self.planned += pending + skipped
            self.done += skipped
            self.workers = max(1, workers)
        self.draw()

    def finished(self, seconds: float, *, failed: bool = False) -> None:
        with self._lock:
            self.done += 1
            self.failed += failed
            self.job_seconds.append(seconds)
        self.draw()

    def eta(self) -> float | None:
        """Seconds until the runs planned so far are done (None before any job has been timed)."""
        with self._lock:
            remaining = self.planned - self.done
            if not self.planned:
                return None  # nothing submitted yet: no estimate, not "0s"
            if not remaining:
                return 0.0
            if not self.job_seconds:
                return None
            mean = sum(self.job_seconds) / len(self.job_seconds)
            return mean * remaining / min(self.workers, remaining)

    def line(self) -> str:
        eta = self.eta()
        with self._lock:
            failed = f" ({self.failed} failed)" if self.failed else ""
            return (f"pipeline · {self.stage or 'starting'} · runs {self.done}/{self.planned}{failed} · "
                    f"{clock(time.perf_counter() - self.started)} elapsed · ETA "
                    f"{'?' if eta is None else clock(eta)}")

    def write(self, message: str) -> None:
        """A message above the line, which stays last."""
        self._bar.write(message, file=self._file)

    def draw(self) -> None:
        self._bar.set_description_str(self.line(), refresh=True)

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            self.draw()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self.draw()
        self._bar.close()
