from __future__ import annotations

import pytest
import torch

from dataeff.errors import DataeffError
from dataeff.model import PRESETS, KVCache, ModelConfig, Transformer, count_parameters


@pytest.mark.parametrize("preset", ["nano", "micro", "mini", "small"])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_is_exact(preset, qk_norm, tie):
    cfg = ModelConfig(preset=preset, vocab_size=517, qk_norm=qk_norm, tie_embeddings=tie)
    model = Transformer(cfg)
    counts = count_parameters(cfg)
    assert model.num_parameters() == counts["total"]
    assert counts["total"] == counts["non_embedding"] + counts["embedding"]


def test_presets_span_the_range():
    sizes = {p: count_parameters(ModelConfig(preset=p, vocab_size=32000))["non_embedding"] for p in PRESETS}
    assert min(sizes.values()) < 1e5 and max(sizes.values()) > 1e9
    assert list(sizes.values()) == sorted(sizes.values())


def test_init_seed_controls_weights():
    cfg = ModelConfig(preset="nano", vocab_size=64)
    a, b, c = Transformer(cfg, init_seed=1), Transformer(cfg, init_seed=1), Transformer(cfg, init_seed=2)
    assert torch.equal(a.embed.weight, b.embed.weight)
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_causality_and_kv_cache_match_full_forward():
    cfg = ModelConfig(preset="mini", vocab_size=100, n_kv_heads=2, qk_norm=True, seq_len=32)
    model = Transformer(cfg).eval()
    x = torch.randint(0, 100, (2, 20))
    full = model(x)
    y = x.clone()
    y[:, 15:] = (y[:, 15:] + 1) % 100
    assert torch.allclose(model(y)[:, :15], full[:, :15], atol=1e-5)  # the future does not leak
    cache = KVCache(model.cfg, 2, 32, torch.device("cpu"), torch.float32)
    parts = [model(x[:, :12], cache=cache), model(x[:, 12:16], cache=cache)]
    parts += [model(x[:, i : i + 1], cache=cache) for i in range(16, 20)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_loss_is_log_vocab_at_init_and_context_is_enforced():
    cfg = ModelConfig(preset="nano", vocab_size=256, seq_len=16, init_std=1e-4)
    model = Transformer(cfg)
    x = torch.randint(0, 256, (3, 16))
    assert model(x, x).item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=1e-2)
    with pytest.raises(DataeffError, match="exceeds the model's context"):
        model(torch.randint(0, 256, (1, 17)))


def test_bad_shapes_are_refused():
    with pytest.raises(DataeffError, match="did you mean 'mini'"):
        ModelConfig(preset="minni").resolved()
    with pytest.raises(DataeffError, match="not divisible by n_heads"):
        ModelConfig(d_model=100, n_heads=3).resolved()
