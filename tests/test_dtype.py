"""``dtype=auto``: bf16 only where the device computes it natively, since emulated bf16 is slower than fp32."""

from __future__ import annotations

import pytest
import torch

from dataeff.train import dist

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_cache():
    dist.native_bf16.cache_clear()
    yield
    dist.native_bf16.cache_clear()


def test_explicit_dtypes_are_kept() -> None:
    assert dist.resolve_dtype(CPU, "bf16") == "bf16" and dist.resolve_dtype(CPU, "fp32") == "fp32"


@pytest.mark.parametrize(("avx512_bf16", "amx", "want"), [(False, False, "fp32"), (True, False, "bf16"),
                                                          (False, True, "bf16")])
def test_auto_follows_the_cpus_bf16_support(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool,
                                            want: str) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(dist, "_arm_bf16", lambda: False)
    assert dist.resolve_dtype(CPU, "auto") == want
    with dist.autocast(CPU, "auto"):
        out = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert out.dtype == (torch.bfloat16 if want == "bf16" else torch.float32)


def test_a_torch_without_the_private_queries_falls_back_to_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(dist, "_arm_bf16", lambda: False)
    assert dist.resolve_dtype(CPU, "auto") == "fp32"
