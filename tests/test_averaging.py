from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train import tiny_config as train_tiny_config

from dataeff import averaging
from dataeff import checkpoint as ckpt
from dataeff.averaging import (
    EMA,
    Heldout,
    average_weights,
    snapshot_ensemble_nll,
    snapshot_paths,
    snapshot_steps,
)
from dataeff.errors import DataeffError
from dataeff.evaluate import batches
from dataeff.evaluate_run import EvalConfig, run_eval
from dataeff.model import ModelConfig, Transformer
from dataeff.train import RunConfig, train

VOCAB, SEQ = 50, 16


def _model(seed: int = 0, vocab: int = VOCAB) -> Transformer:
    return Transformer(ModelConfig(preset="nano", vocab_size=vocab, seq_len=SEQ), init_seed=seed)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _sgd_steps(model: Transformer, n: int, seed: int = 0):
    """Yield after each of ``n`` SGD steps on random tokens."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, VOCAB, (4, SEQ + 1), generator=g)
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
        yield


def tiny_config(corpus: Path, run_dir: Path, **train_over) -> RunConfig:
    # fp32: averaged weights are compared exactly between runs, which bf16 autocast would blur.
    return train_tiny_config(corpus, run_dir, **{"dtype": "fp32", **train_over})


# ---------------------------------------------------------------------------------------------------------
# EMA


def test_ema_is_the_debiased_exponential_average_of_the_weights_after_each_step():
    decay, steps = 0.8, 6
    model = _model()
    ema = EMA(model, decay)
    history = []
    for _ in _sgd_steps(model, steps):
        ema.update()
        history.append(_params(model))
    # By hand: weights after step i weigh decay^(steps-i), normalised; the initialisation weighs nothing.
    coef = [decay ** (steps - 1 - i) for i in range(steps)]
    expected = {n: sum(c * h[n] for c, h in zip(coef, history, strict=True)) / sum(coef) for n in history[0]}
    out = _model(seed=7)
    ema.copy_to(out)
    for n, p in out.named_parameters():
        torch.testing.assert_close(p, expected[n], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(p, history[-1][n])  # an average, not the last weights


def test_ema_first_update_is_the_weights_themselves():
    model = _model()
    ema = EMA(model, 0.999)
    next(_sgd_steps(model, 1))
    ema.update()
    out = _model(seed=3)
    ema.copy_to(out)
    for (_, a), (_, b) in zip(out.named_parameters(), model.named_parameters(), strict=True):
        assert torch.equal(a, b)


def test_ema_state_round_trip_continues_exactly():
    a, b = _model(), _model()
    ema_a, ema_b = EMA(a, 0.9), EMA(b, 0.9)
    steps_a, steps_b = _sgd_steps(a, 6), _sgd_steps(b, 6)
    for _ in range(3):
        next(steps_a), next(steps_b)
        ema_a.update(), ema_b.update()
    # b "resumes": a fresh EMA of its model takes over the saved state.
    resumed = EMA(b, 0.9)
    resumed.load_state({k: v.clone() for k, v in ema_b.state().items()}, "test")
    for _ in range(3):
        next(steps_a), next(steps_b)
        ema_a.update(), resumed.update()
    for x, y in zip(ema_a.shadow, resumed.shadow, strict=True):
        assert torch.equal(x, y)


def test_ema_state_that_does_not_fit_is_refused():
    ema = EMA(_model(), 0.9)
    with pytest.raises(DataeffError, match=r"ckpt\.safetensors: holds no EMA state"):
        ema.load_state({}, "ckpt.safetensors")
    other = EMA(_model(vocab=VOCAB + 1), 0.9).state()
    with pytest.raises(DataeffError, match=r"ckpt\.safetensors: EMA state does not fit the model \(first mismatch: embed.weight\)"):
        ema.load_state(other, "ckpt.safetensors")


# ---------------------------------------------------------------------------------------------------------
# snapshots, SWA and the snapshot ensemble


@pytest.mark.parametrize(("total", "n", "fraction"), [(100, 4, 0.25), (37, 3, 0.5), (10, 10, 1.0), (9, 1, 0.1)])
def test_snapshot_steps_are_evenly_spaced_over_the_end_of_the_run(total, n, fraction):
    steps = snapshot_steps(total, n, fraction)
    window = round(fraction * total)
    assert len(steps) == n and steps[-1] == total
    assert all(a < b for a, b in itertools.pairwise(steps))
    assert steps[0] > total - window
    gaps = np.diff([total - window, *steps])
    assert gaps.max() - gaps.min() <= 1


def test_snapshot_steps_refuse_bad_values():
    assert snapshot_steps(50, 0, 0.25) == []
    with pytest.raises(DataeffError, match=r"train\.snapshots=-1 must be >= 0"):
        snapshot_steps(50, -1, 0.25)
    for fraction in (0.0, 1.5, math.nan):
        with pytest.raises(DataeffError, match=r"train\.snapshot_fraction=.* must be in \(0, 1\]"):
            snapshot_steps(50, 2, fraction)
    with pytest.raises(DataeffError, match=r"train\.snapshots=6 exceeds the 5 steps"):
        snapshot_steps(20, 6, 0.25)


def _saved(tmp_path: Path, models: list[Transformer]) -> list[Path]:
    paths = [ckpt.checkpoint_path(tmp_path / "snapshots", i + 1) for i in range(len(models))]
    for m, path in zip(models, paths, strict=True):
        ckpt.save_weights(path, m)
    return paths


def test_average_weights_is_the_mean_of_the_files(tmp_path):
    members = [_model(seed=s).state_dict() for s in (1, 2, 3)]
    paths = _saved(tmp_path, [_model(seed=s) for s in (1, 2, 3)])
    assert snapshot_paths(tmp_path) == paths
    out = average_weights(paths, _model(seed=9))
    for name, value in out.state_dict().items():
        torch.testing.assert_close(value, torch.stack([m[name] for m in members]).mean(0))
    # A training checkpoint averages as its weights.
    model = _model(seed=4)
    ckpt.save_checkpoint(tmp_path / "ckpt.safetensors", model, [torch.optim.SGD(model.parameters(), lr=0.1)], step=1)
    mixed = average_weights([paths[0], tmp_path / "ckpt.safetensors"], _model(seed=9))
    torch.testing.assert_close(mixed.embed.weight, (members[0]["embed.weight"] + model.embed.weight.detach()) / 2)


def test_average_weights_refuses_mismatched_files(tmp_path):
    paths = _saved(tmp_path, [_model()])
    ckpt.save_weights(tmp_path / "wide.safetensors", _model(vocab=VOCAB + 1))
    with pytest.raises(DataeffError, match=r"wide\.safetensors: weights do not match those of .*step_000000001"):
        average_weights([paths[0], tmp_path / "wide.safetensors"], _model())
    with pytest.raises(DataeffError, match=r"wide\.safetensors: weights do not fit the model"):
        average_weights([tmp_path / "wide.safetensors"], _model())


def _brute_force_ensemble_nll(models: list[Transformer], heldout: Heldout) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for x, y in batches(heldout.tokens, heldout.seq_len, heldout.batch_size, heldout.max_tokens):
            probs = torch.stack([F.softmax(m.eval()(x).double(), dim=-1) for m in models]).mean(0)
            out.append(-probs.gather(-1, y.unsqueeze(-1)).squeeze(-1).log().flatten())
    return torch.cat(out)


def test_snapshot_ensemble_matches_brute_force_and_beats_its_members(tmp_path):
    # Trained a little apart, so the members disagree and the ensemble has something to gain.
    models = [_model(seed=s) for s in (1, 2, 3)]
    for s, m in enumerate(models):
        for _ in _sgd_steps(m, 3, seed=s):
            pass
    paths = _saved(tmp_path, models)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=5 * SEQ + 7).astype(np.uint16)
    heldout = Heldout(tokens, n_bytes=400, n_words=80, seq_len=SEQ, batch_size=2, dtype="fp32")
    nll, member_losses = snapshot_ensemble_nll(paths, _model(seed=9), heldout)
    assert nll.numel() == len(tokens) - 1
    torch.testing.assert_close(nll, _brute_force_ensemble_nll(models, heldout), rtol=1e-5, atol=1e-6)
    for m, loss in zip(models, member_losses, strict=True):
        assert loss == pytest.approx(heldout.score(m).loss, rel=1e-6)
    # -log mean p <= mean -log p token by token (Jensen), hence on average.
    member_nll = torch.stack([_brute_force_ensemble_nll([m], heldout) for m in models])
    assert (nll <= member_nll.mean(0) + 1e-9).all()
    assert heldout.summarize(nll).loss < sum(member_losses) / len(member_losses)


# ---------------------------------------------------------------------------------------------------------
# in the trainer


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.read_safetensors(path)[0]


def test_run_writes_ema_snapshots_swa_and_scores_them(small_corpus, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_config(small_corpus, run, ema=0.9, snapshots=3, snapshot_fraction=0.5))
    steps = snapshot_steps(result["steps"], 3, 0.5)
    assert snapshot_paths(run) == [ckpt.checkpoint_path(run / "snapshots", s) for s in steps]
    snaps = [_tensors(p) for p in snapshot_paths(run)]
    final = _tensors(run / "model.safetensors")
    assert all(torch.equal(snaps[-1][k], final[k]) for k in final)  # the last snapshot is the final model
    swa = _tensors(run / "model_swa.safetensors")
    for k in final:
        torch.testing.assert_close(swa[k], torch.stack([s[k] for s in snaps]).mean(0))

    def scored(path: Path) -> dict:
        return run_eval(EvalConfig(run_dir=str(run), checkpoint=str(path), dtype="fp32"))

    for kind, path in (("ema", run / "model_ema.safetensors"), ("swa", run / "model_swa.safetensors")):
        ev = scored(path)
        assert result[f"val_loss_{kind}"] == pytest.approx(ev["loss"], rel=1e-6)
        assert result[f"val_bpb_{kind}"] == pytest.approx(ev["bpb"], rel=1e-6)
    assert _tensors(run / "model_ema.safetensors").keys() == final.keys()
    member_losses = [scored(p)["loss"] for p in snapshot_paths(run)]
    assert result["val_loss_snapshot_mean"] == pytest.approx(sum(member_losses) / 3, rel=1e-6)
    assert result["val_loss_snapshot_ensemble"] <= result["val_loss_snapshot_mean"]
    assert result["val_bpb_snapshot_ensemble"] > 0
    # Every training checkpoint carries the EMA, updated once per optimizer step.
    for step, path in ckpt.list_checkpoints(run / "checkpoints"):
        assert int(ckpt.load_extra_tensors(path)["ema.updates"]) == step


def test_run_without_averaging_writes_none_of_it(small_corpus, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_config(small_corpus, run, epochs=1, snapshots=1))
    assert not any(k.endswith(("_ema", "_swa", "_snapshot_ensemble")) for k in result)
    assert not (run / "model_ema.safetensors").exists() and not (run / "model_swa.safetensors").exists()
    assert [p.name for p in snapshot_paths(run)] == [f"step_{result['steps']:09d}.safetensors"]
    assert all(ckpt.load_extra_tensors(p) == {} for _, p in ckpt.list_checkpoints(run / "checkpoints"))


class _Killed(Exception):
    pass


def test_killed_and_resumed_run_ends_with_the_same_ema_and_snapshots(small_corpus, tmp_path, monkeypatch):
    over = {"ema": 0.9, "snapshots": 3, "snapshot_fraction": 0.5, "checkpoint_every": 2}
    whole_cfg, killed_cfg = (tiny_config(small_corpus, tmp_path / name, **over) for name in ("whole", "killed"))
    for c in (whole_cfg, killed_cfg):
        c.model.dropout = 0.1  # resumption must restore the dropout randomness too
    whole = train(whole_cfg)
    steps = snapshot_steps(whole["steps"], 3, 0.5)
    # Killed just after the second snapshot; the last checkpoint is older, so steps are replayed past it.
    kill_at = steps[1]
    last_ckpt = (kill_at - 1) // 2 * 2
    assert steps[0] <= last_ckpt < kill_at

    real_after_step = averaging.RunAveraging.after_step

    def after_step_then_die(self, step):
        real_after_step(self, step)
        if step == kill_at:
            raise _Killed

    monkeypatch.setattr(averaging.RunAveraging, "after_step", after_step_then_die)
    with pytest.raises(_Killed):
        train(killed_cfg)
    monkeypatch.undo()
    run = tmp_path / "killed"
    assert not (run / "DONE").exists() and ckpt.list_checkpoints(run / "checkpoints")[-1][0] == last_ckpt
    written = {p: p.stat().st_mtime_ns for p in snapshot_paths(run)}
    assert len(written) == 2

    resumed = train(killed_cfg)
    for p, stamp in written.items():
        assert p.stat().st_mtime_ns == stamp  # a snapshot already written is not redone
    for name in ("model_ema.safetensors", "model_swa.safetensors", "model.safetensors"):
        a, b = _tensors(tmp_path / "whole" / name), _tensors(run / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for key in ("val_loss", "val_loss_ema", "val_loss_swa", "val_loss_snapshot_ensemble"):
        assert resumed[key] == whole[key], key


@pytest.mark.parametrize(("over", "message"), [
    ({"ema": 1.0}, r"train\.ema=1\.0 must be in \[0, 1\)"),
    ({"ema": -0.5}, r"train\.ema=-0\.5 must be in \[0, 1\)"),
    ({"snapshots": -2}, r"train\.snapshots=-2 must be >= 0"),
    ({"snapshots": 100000}, r"train\.snapshots=100000 exceeds the \d+ steps"),
    ({"snapshots": 2, "snapshot_fraction": 0.0}, r"train\.snapshot_fraction=0\.0 must be in \(0, 1\]"),
], ids=["ema=1", "ema<0", "snapshots<0", "too-many-snapshots", "fraction=0"])
def test_bad_averaging_config_is_refused_before_the_run_starts(small_corpus, tmp_path, over, message):
    run = tmp_path / "run"
    with pytest.raises(DataeffError, match=message):
        train(tiny_config(small_corpus, run, epochs=1, **over))
    assert not (run / "config.yaml").exists()
