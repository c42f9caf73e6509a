"""``dataeff serve`` in a child process, for code that needs an OpenAI-compatible endpoint for a while (a
pipeline stage generating a synthetic corpus offline): started on a free port, its URL read from the line it
prints once listening, stopped when the block ends."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from dataeff.config import non_default
from dataeff.errors import DataeffError
from dataeff.generate.serve import ServeConfig

_READY = "dataeff serve: "


@contextmanager
def serving(cfg: ServeConfig, timeout: float = 300.0) -> Iterator[str]:
    """Serve ``cfg`` and yield the base URL, ``http://HOST:PORT/v1`` (``port=0``: a free port)."""
    args = [sys.executable, "-m", "dataeff.cli", "serve", *(f"{k}={v}" for k, v in non_default(cfg).items())]
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, env=os.environ.copy())
        try:
            yield _wait_ready(proc, err, timeout, cfg.model)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen[str], err: IO[str], timeout: float, model: str) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                line = proc.stdout.readline()
                if line.startswith(_READY):
                    return line.removeprefix(_READY).split()[0]
                if not line and proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
    proc.kill()
    proc.wait()
    err.seek(0)
    tail = err.read().strip().splitlines()[-1:]
    why = tail[0] if tail else f"no URL within {timeout:g} s"
    raise DataeffError(f"serve: the server for model={model} did not start ({why})")
