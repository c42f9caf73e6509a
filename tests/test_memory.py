"""keep_freed_memory: a large block freed and allocated again comes back without new page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A child process, so malloc's settings do not leak into the test session. Like a training step, it allocates
# and frees two 64 MiB tensors (above glibc's largest mmap threshold), a few times to settle the heap, then ten
# times more, and prints the minor page faults those ten cost.
_CHILD = """
import resource, sys, torch
from dataeff.train.memory import keep_freed_memory
accepted = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():
    x, y = torch.ones(2**24), torch.ones(2**24)
    del x, y
for _ in range(8):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(accepted, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True).stdout
    accepted, faults = out.split()
    return accepted == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    accepted, kept = _faults("keep")
    _, default = _faults("default")
    if not accepted:
        pytest.skip("this libc has no mallopt (musl)")
    pages = 10 * 2 * 64 * 2**20 // 4096
    assert default > pages // 2  # by default every allocation maps fresh pages
    assert kept < default // 4  # settled: at most a step's worth now and then
