from __future__ import annotations

import pytest
import torch

from dataeff import checkpoint as ckpt
from dataeff.errors import DataeffError
from dataeff.model import ModelConfig, Transformer
from dataeff.train import OptimConfig, build_optimizers


def _trained(seed=0, name="adamw"):
    model = Transformer(ModelConfig(preset="nano", vocab_size=50, seq_len=16), init_seed=seed)
    opts = build_optimizers(model, OptimConfig(name=name, weight_decay=1.6))
    x = torch.randint(0, 50, (4, 17))
    for _ in range(2):
        model(x[:, :-1], x[:, 1:]).backward()
        for o in opts:
            o.step()
            o.zero_grad()
    return model, opts


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_checkpoint_restores_model_optimizer_and_rng(tmp_path, name):
    model, opts = _trained(name=name)
    torch.manual_seed(123)
    path = ckpt.checkpoint_path(tmp_path, 2)
    ckpt.save_checkpoint(path, model, opts, step=2, extra={"note": "x"})
    expected_draw = torch.rand(3)

    fresh, fresh_opts = _trained(seed=9, name=name)
    step, extra = ckpt.load_checkpoint(path, fresh, fresh_opts)
    assert step == 2 and extra == {"note": "x"}
    assert torch.equal(torch.rand(3), expected_draw)  # RNG state came back
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for oa, ob in zip(opts, fresh_opts, strict=True):
        for sa, sb in zip(oa.state.values(), ob.state.values(), strict=True):
            for key in sa:
                assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key]))


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, opts = _trained()
    path = ckpt.checkpoint_path(tmp_path, 2)
    ckpt.save_checkpoint(path, model, opts, step=2)
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, model, opts, step=3)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    fresh, fresh_opts = _trained(seed=5)
    assert ckpt.load_checkpoint(path, fresh, fresh_opts)[0] == 2


def test_corrupt_file_is_named(tmp_path):
    bad = tmp_path / "step_000000001.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    model, opts = _trained()
    with pytest.raises(DataeffError, match=r"step_000000001\.safetensors: corrupt"):
        ckpt.load_checkpoint(bad, model, opts)


def test_prune_keeps_newest(tmp_path):
    model, opts = _trained()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, step), model, opts, step)
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]


def test_extra_tensors_round_trip_and_default_to_none(tmp_path):
    model, opts = _trained()
    extra = {"ema.weights.embed.weight": torch.randn(3, 4), "ema.updates": torch.tensor(7)}
    with_extra, without = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ckpt.save_checkpoint(with_extra, model, opts, step=2, extra_tensors=extra)
    ckpt.save_checkpoint(without, model, opts, step=2)
    loaded = ckpt.load_extra_tensors(with_extra)
    assert loaded.keys() == extra.keys() and all(torch.equal(loaded[k], v) for k, v in extra.items())
    assert ckpt.load_extra_tensors(without) == {}
    # The extra tensors are invisible to the model and optimizer loaders.
    fresh, fresh_opts = _trained(seed=9)
    assert ckpt.load_checkpoint(with_extra, fresh, fresh_opts)[0] == 2
    ckpt.load_weights(with_extra, fresh)
    assert torch.equal(fresh.embed.weight, model.embed.weight)
