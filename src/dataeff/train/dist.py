"""Device choice and data-parallel setup: one process per device under torchrun, or one plain process."""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

from dataeff.errors import DataeffError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def single(cls, device: torch.device) -> DistInfo:
        """One process alone on ``device``."""
        return cls(0, 1, 0, device)


def memory_bytes(device: torch.device) -> int:
    """The memory a model on ``device`` can use: the GPU's, or the machine's physical memory."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise DataeffError("train.device=cuda but no CUDA device is visible")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(requested)


def setup(requested_device: str) -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # TF32 matmuls keep fp32 master weights exact while using tensor cores for the rest.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def teardown(info: DistInfo) -> None:
    if info.distributed and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        tdist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        value = value.clone()
        tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
        value /= info.world_size
    return value


@functools.cache
def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls in hardware. A CPU without AVX512-BF16 or AMX (AVX2 machines,
    most AMD EPYCs before Zen 4) emulates them: measured 10-25x slower than fp32 on one such machine, where
    bf16 autocast is a slowdown, not the speedup it is elsewhere."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    # torch.cpu has no public query for these ISA extensions; the private ones are guarded so a torch that
    # drops them falls back to fp32, which is always correct.
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if any(getattr(torch.cpu, name, lambda: False)() for name in checks):
        return True
    return _arm_bf16()


def _arm_bf16() -> bool:
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return any(line.startswith("Features") and " bf16" in line for line in info.splitlines())


def resolve_dtype(device: torch.device, dtype: str) -> str:
    """``auto`` is bf16 where the device computes it natively and fp32 elsewhere; bf16 and fp32 stay as set."""
    if dtype == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return dtype


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast (fp32 master weights, fp32 reductions); fp32 runs without it. ``auto`` as in
    :func:`resolve_dtype`."""
    if resolve_dtype(device, dtype) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
