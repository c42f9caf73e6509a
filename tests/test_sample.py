from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dataeff.checkpoint import save_weights
from dataeff.cli import main
from dataeff.config import from_dict, to_dict
from dataeff.ensemble import Ensemble
from dataeff.errors import DataeffError
from dataeff.fsutil import read_jsonl
from dataeff.model import ModelConfig, Transformer
from dataeff.sample import SampleConfig, _next_tokens, generate, sample, slide_keep
from dataeff.tokenizer import Tokenizer, train_word

VOCAB = 61
CONFIGS = {
    "tied": {},
    "untied-gqa": {"tie_embeddings": False, "n_kv_heads": 2, "rope_theta": 500.0},
    "qknorm-mqa": {"qk_norm": True, "n_kv_heads": 1},
}
# Three lengths, one of them split over two batches (batch_size=2): every bucketing path runs.
PROMPTS = [[1, 2, 3], [4], [5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15, 16]]


def _model(seed: int = 7, scale: float = 0.3, **overrides: object) -> Transformer:
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, seq_len=24, vocab_size=VOCAB, **overrides)  # type: ignore[arg-type]
    model = Transformer(cfg)
    # Large, distinct weights give peaked distributions, so argmax is never decided by rounding.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + scale * noise if p.dim() == 1 else scale * noise)
    return model.eval()


def _gen(model: Transformer | Ensemble, prompts: list[list[int]], n: int = 8, seed: int = 0, **kw: object) -> list[list[int]]:
    kw = {"temperature": 0.0, "batch_size": 2, **kw}
    return generate(model, prompts, max_new_tokens=n, generator=torch.Generator().manual_seed(seed), **kw)  # type: ignore[arg-type]


def _uncached(log_probs, prompts: list[list[int]], n: int, temperature: float = 0.0, top_k: int = 0,
              top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
    """The reference: equal-length prompts in one batch, the full forward pass recomputed for every token."""
    g = torch.Generator().manual_seed(seed)
    seqs = torch.tensor(prompts)
    with torch.no_grad():
        for _ in range(n):
            tok = _next_tokens(log_probs(seqs)[:, -1], temperature, top_k, top_p, g)
            seqs = torch.cat([seqs, tok[:, None]], dim=1)
    return seqs[:, len(prompts[0]) :].tolist()


def _uncached_slid(log_probs, prompts: list[list[int]], n: int, window: int, temperature: float = 0.0,
                   seed: int = 0) -> list[list[int]]:
    """The sliding-window rule recomputed from scratch: every token is predicted by a full forward pass over
    the window, which starts at 0 and, whenever it would exceed ``window`` tokens, jumps to the newest
    ``slide_keep(window)``."""
    g = torch.Generator().manual_seed(seed)
    seqs, start = torch.tensor(prompts), 0
    with torch.no_grad():
        for _ in range(n):
            if seqs.shape[1] - start > window:
                start = seqs.shape[1] - slide_keep(window)
            tok = _next_tokens(log_probs(seqs[:, start:])[:, -1], temperature, 0, 1.0, g)
            seqs = torch.cat([seqs, tok[:, None]], dim=1)
    return seqs[:, len(prompts[0]) :].tolist()


def _single(model: Transformer):
    return lambda seqs: F.log_softmax(model(seqs).float(), dim=-1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_with_cache_equals_full_recompute(name: str) -> None:
    model = _model(**CONFIGS[name])  # type: ignore[arg-type]
    expected = [_uncached(_single(model), [p], 10)[0] for p in PROMPTS]
    assert _gen(model, PROMPTS, 10) == expected
    # One prompt alone gives the same tokens as in a batch.
    assert _gen(model, PROMPTS[3:4], 10) == expected[3:4]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 10, 0.9)])
def test_sampling_with_cache_equals_full_recompute(temperature: float, top_k: int, top_p: float) -> None:
    model = _model(**CONFIGS["untied-gqa"], scale=0.1)  # type: ignore[arg-type]
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    kw = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": 3}
    ours = _gen(model, prompts, 12, batch_size=8, **kw)
    assert ours == _uncached(_single(model), prompts, 12, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "expected"), [
    (1.0, 0, 1.0, [0.0, 0.5, 0.3, 0.15, 0.05]),
    (0.5, 0, 1.0, [0.0, 0.25 / 0.365, 0.09 / 0.365, 0.0225 / 0.365, 0.0025 / 0.365]),
    (1.0, 2, 1.0, [0.0, 0.625, 0.375, 0.0, 0.0]),
    (1.0, 0, 0.7, [0.0, 0.625, 0.375, 0.0, 0.0]),
    (1.0, 0, 0.5, [0.0, 1.0, 0.0, 0.0, 0.0]),
])
def test_sampler_frequencies(temperature: float, top_k: int, top_p: float, expected: list[float]) -> None:
    # Token 0 has probability zero and comes first, where an inverse-CDF search would land by mistake.
    log_probs = torch.tensor([[-float("inf"), *torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()]]).expand(40_000, -1)
    tokens = _next_tokens(log_probs, temperature, top_k, top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert freq[0] == 0 and torch.allclose(freq, torch.tensor(expected), atol=0.01)


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    model = _model(scale=0.1)
    greedy = _gen(model, PROMPTS)
    assert _gen(model, PROMPTS, temperature=1.0, top_k=1, seed=5) == greedy
    assert _gen(model, PROMPTS, temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_seeds_reproduce_and_differ() -> None:
    model = _model(scale=0.1)
    prompts = [[1]] * 6
    a = _gen(model, prompts, 16, temperature=1.0, seed=1)
    assert a == _gen(model, prompts, 16, temperature=1.0, seed=1)
    assert a != _gen(model, prompts, 16, temperature=1.0, seed=2)
    assert len({tuple(r) for r in a}) > 1  # rows of one batch draw different tokens


def test_eos_stops_only_its_row() -> None:
    model = _model()
    full = _gen(model, PROMPTS, 10)
    eos = full[0][2]

    def cut(row: list[int]) -> list[int]:
        return row[: row.index(eos) + 1] if eos in row else row

    stopped = _gen(model, PROMPTS, 10, eos_id=eos)
    assert stopped == [cut(r) for r in full]
    assert stopped[0][-1] == eos and len(stopped[0]) <= 3
    assert any(len(r) == 10 for r in stopped)
    assert _gen(model, PROMPTS, 10, eos_id=eos, stop_at_eos=False) == full
    # A batch whose rows all stop ends early, each row at its own end-of-document token.
    first = full[1][0]
    assert _gen(model, [PROMPTS[1]] * 3, 10, eos_id=first) == [[first]] * 3


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_ensemble_of_identical_members_samples_like_one(mode: str) -> None:
    model = _model(scale=0.1)
    ensemble = Ensemble([model, model], mode)  # type: ignore[arg-type]
    prompts = [[1, 2], [3, 4], [5, 6]]
    kw = {"temperature": 1.0, "seed": 4, "batch_size": 8}
    assert _gen(ensemble, prompts, 16, **kw) == _gen(model, prompts, 16, **kw)


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_ensemble_samples_from_combined_distribution(mode: str) -> None:
    members = [_model(seed=1, scale=0.1), _model(seed=2, scale=0.1, **CONFIGS["untied-gqa"])]  # type: ignore[arg-type]
    ensemble = Ensemble(members, mode, weights=torch.tensor([0.7, 0.3]))  # type: ignore[arg-type]
    prompts = [[1, 2], [3, 4], [5, 6]]
    assert _gen(ensemble, prompts, 12, batch_size=8) == _uncached(ensemble.log_probs, prompts, 12)
    sampled = _gen(ensemble, prompts, 12, batch_size=8, temperature=1.0, seed=9)
    assert sampled == _uncached(ensemble.log_probs, prompts, 12, temperature=1.0, seed=9)
    # The mixture is a different distribution from either member's.
    assert all(sampled != _gen(m, prompts, 12, batch_size=8, temperature=1.0, seed=9) for m in members)


def test_bf16_follows_autocast_forward() -> None:
    """bf16 rounds differently from autocast's cast-per-op, so greedy paths may part at near-ties; every token
    chosen must be the autocast forward pass's argmax or within rounding of it."""
    model = _model(scale=0.1, **CONFIGS["untied-gqa"])  # type: ignore[arg-type]
    out = _gen(model, PROMPTS, 10, dtype="bf16")
    gaps = []
    for prompt, new in zip(PROMPTS, out, strict=True):
        seq = torch.tensor([prompt + new])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lp = F.log_softmax(model(seq).float(), dim=-1)[0, len(prompt) - 1 : -1]
        chosen = lp.gather(-1, torch.tensor(new)[:, None]).squeeze(-1)
        gaps.append(lp.max(-1).values - chosen)
    gap = torch.cat(gaps)
    assert gap.max() < 0.1 and (gap == 0).float().mean() > 0.9


def test_hf_generate_greedy_parity() -> None:
    from dataeff.hf import to_hf

    model = _model(**CONFIGS["untied-gqa"])  # type: ignore[arg-type]
    hf = to_hf(model)
    for prompts in ([[1, 2, 3], [5, 6, 7], [14, 15, 16]], [[8, 9, 10, 11, 12]]):
        x = torch.tensor(prompts)
        with torch.no_grad():
            theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)
        assert _gen(model, prompts, 12) == theirs[:, x.shape[1] :].tolist()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sliding_window_equals_full_recompute_of_the_same_rule(name: str) -> None:
    model = _model(**CONFIGS[name])  # type: ignore[arg-type]
    # 3 x 24 new tokens slide the 24-token window several times; a 30-token prompt starts already slid.
    prompts = [[1, 2, 3], list(range(1, 31)), [5]]
    expected = [_uncached_slid(_single(model), [p], 70, window=24)[0] for p in prompts]
    assert _gen(model, prompts, 70, slide=True) == expected
    # Sampling draws the same tokens as the reference of the same rule and seed.
    batch = [[1, 2, 3], [4, 5, 6]]
    assert _gen(model, batch, 50, slide=True, temperature=1.0, seed=3) == _uncached_slid(
        _single(model), batch, 50, window=24, temperature=1.0, seed=3)


def test_sliding_ensemble_and_short_requests() -> None:
    members = [_model(seed=1, scale=0.1), _model(seed=2, scale=0.1, **CONFIGS["untied-gqa"])]  # type: ignore[arg-type]
    ensemble = Ensemble(members, "prob")  # type: ignore[arg-type]
    prompts = [[1, 2], [3, 4]]
    assert _gen(ensemble, prompts, 40, slide=True, batch_size=8) == _uncached_slid(ensemble.log_probs, prompts, 40, 24)
    # A request that fits never slides: the same tokens as without slide.
    model = members[0]
    assert _gen(model, PROMPTS, 10, slide=True) == _gen(model, PROMPTS, 10)
    assert slide_keep(24) == 18 and slide_keep(2) == 1 and slide_keep(1) == 1


def test_generate_refuses_bad_requests() -> None:
    model = _model()
    cases = [
        ({"prompts": [[1], []]}, "prompt 1 is empty"),
        ({"prompts": [[1, VOCAB]]}, f"token id {VOCAB}"),
        ({"prompts": [[1] * 20], "max_new_tokens": 6}, "20 tokens plus 6 new tokens exceeds the model's context of 24"),
        ({"temperature": -0.5}, "temperature: -0.5"),
        ({"top_p": 0.0}, "top_p: 0.0"),
        ({"top_k": -1}, "top_k: -1"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ]
    for kw, message in cases:
        args = {"prompts": [[1]], "max_new_tokens": 4, **kw}
        with pytest.raises(DataeffError, match=message) as e:
            generate(model, args.pop("prompts"), generator=torch.Generator(), **args)  # type: ignore[arg-type]
        assert "\n" not in str(e.value)
    # Exactly filling the context is allowed: the last new token is never fed back.
    assert len(_gen(model, [[1] * 20], 5)[0]) == 5


@pytest.mark.parametrize(("key", "value", "message"), [
    ("temperature", -1, "sample.temperature: -1.0 must be a number >= 0"),
    ("temperature", "nan", "field .temperature.: .nan. is not a finite number"),
    ("top_p", 1.5, r"sample.top_p: 1.5 must be in \(0, 1\]"),
    ("top_p", 0, "sample.top_p: 0.0"),
    ("top_k", -3, "sample.top_k: -3 must be >= 0"),
    ("max_tokens", 0, "sample.max_tokens: 0 must be at least 1"),
    ("num_samples", 0, "sample.num_samples: 0"),
    ("batch_size", -2, "sample.batch_size: -2"),
    ("dtype", "fp16", "'fp16' is not one of 'auto', 'bf16', 'fp32'"),
])
def test_config_refuses_out_of_range(key: str, value: object, message: str) -> None:
    with pytest.raises(DataeffError, match=message) as e:
        from_dict(SampleConfig, {key: value})
    assert "\n" not in str(e.value)


def _run_dir(root: Path, name: str, words: list[str]) -> Path:
    """A minimal finished run: a word tokenizer and a model whose every next token is equally likely."""
    run = root / name
    run.mkdir()
    tok = train_word([" ".join(words)], vocab_size=len(words) + 2, min_frequency=1)
    tok.save(run / "tokenizer.json")
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, seq_len=16, vocab_size=tok.vocab_size, tie_embeddings=False).resolved()
    model = Transformer(cfg)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # type: ignore[union-attr]
    (run / "manifest.json").write_text(json.dumps({"model": to_dict(cfg)}))
    save_weights(run / "model.safetensors", model, {"model": to_dict(cfg)})
    return run


def test_sample_from_run_and_ensemble(tmp_path: Path) -> None:
    words = ["cat", "dog", "sat", "ran", "on", "mat"]
    run = _run_dir(tmp_path, "run", words)
    cfg = SampleConfig(run_dir=str(run), prompts=["the cat", ""], max_tokens=4, num_samples=10, seed=3,
                       out=str(tmp_path / "out" / "samples.jsonl"))
    rows = sample(cfg)
    assert [r["prompt"] for r in rows] == ["the cat"] * 10 + [""] * 10
    assert read_jsonl(tmp_path / "out" / "samples.jsonl") == rows
    eos = 1  # train_word's <eos>
    for r in rows:
        assert set(r) == {"prompt", "completion", "tokens", "stopped_at_eos"}
        assert eos not in r["tokens"] and r["completion"] == " ".join(
            ["<unk>", "<eos>", *sorted(words)][t] for t in r["tokens"])
        assert len(r["tokens"]) < 4 if r["stopped_at_eos"] else len(r["tokens"]) == 4
    assert {r["stopped_at_eos"] for r in rows} == {True, False}
    assert sample(cfg) == rows

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("dog sat\n\nmat\n", encoding="utf-8")
    rows = sample(SampleConfig(run_dir=str(run), prompt_file=str(prompt_file), max_tokens=3, stop_at_eos=False))
    assert [r["prompt"] for r in rows] == ["dog sat", "", "mat"]
    assert all(len(r["tokens"]) == 3 and not r["stopped_at_eos"] for r in rows)

    ensemble = SampleConfig(members=[str(run), str(run)], max_tokens=4, num_samples=4, dtype="fp32")
    assert sample(ensemble) == sample(SampleConfig(run_dir=str(run), max_tokens=4, num_samples=4, dtype="fp32"))
    other = _run_dir(tmp_path, "other", ["a", "b"])
    with pytest.raises(DataeffError, match="different tokenizer"):
        sample(SampleConfig(members=[str(run), str(other)]))
    for bad in (SampleConfig(), SampleConfig(run_dir=str(run), members=[str(run)])):
        with pytest.raises(DataeffError, match="set run_dir"):
            sample(bad)
    with pytest.raises(DataeffError, match="context of 16"):
        sample(SampleConfig(run_dir=str(run), prompts=["cat " * 10], max_tokens=8))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_dir(tmp_path, "run", ["cat", "dog"])
    assert main(["sample", str(run), "max_tokens=3", "prompts=[cat, dog]", "num_samples=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == ["cat", "cat", "dog", "dog"]
    assert main(["sample", str(run), "temperature=-1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sample.temperature: -1.0" in err


def test_teacher_corpus_documents_outgrow_the_context(tmp_path: Path) -> None:
    from dataeff.experiment.stages.distillation import TeacherSampleConfig, sample_teacher

    run = _run_dir(tmp_path, "run", ["cat", "dog", "sat", "ran", "on", "mat"])
    out = tmp_path / "job"
    out.mkdir()
    cfg = TeacherSampleConfig(members=[str(run), str(run)], combine="prob", tokens=600, max_tokens=40,
                              temperature=1.0, batch=16, seed=0, device="cpu", dtype="fp32")
    stats = sample_teacher(cfg, out)
    tokenizer = Tokenizer.load(run / "tokenizer.json")
    lengths = [len(tokenizer.encode(r["text"])) for r in read_jsonl(out / "samples.jsonl")]
    assert stats["tokens"] >= 600 and max(lengths) > 16 and max(lengths) <= 40  # the teacher's context is 16


def test_decode_step_is_the_forward_pass_one_token_at_a_time() -> None:
    from dataeff.model.transformer import packed_linear

    model = _model(**CONFIGS["untied-gqa"])  # type: ignore[arg-type]
    seq = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]])
    with torch.inference_mode():
        full = model(seq).float()
        cache = model.new_cache(2, 8, model.step_weights("fp32", 2))
        steps = [model.prefill(seq[:, :3], cache)] + [model.decode_step(seq[:, i], cache) for i in range(3, 8)]
        assert cache.pos == 8
        torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 2:], rtol=1e-4, atol=1e-4)
        with pytest.raises(DataeffError, match="full"):
            model.decode_step(seq[:, 0], cache)
        cache.reset()
        torch.testing.assert_close(model.prefill(seq, cache), full[:, -1], rtol=1e-4, atol=1e-4)
        # The plain F.linear fallback of the oneDNN packing computes the same step.
        plain = model.new_cache(2, 8, model.step_weights("fp32", 2, linear=lambda w, dt, _: lambda x: F.linear(x, w.to(dt))))
        model.prefill(seq[:, :3], plain)
        torch.testing.assert_close(model.decode_step(seq[:, 3], plain), full[:, 3], rtol=1e-4, atol=1e-4)
    w = torch.randn(5, 7)
    x = torch.randn(3, 7)
    torch.testing.assert_close(packed_linear(w, torch.float32, 3)(x), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_packing_falls_back_to_f_linear_without_the_private_operators(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataeff.model import transformer

    class NoMkldnn:
        def __getattr__(self, name: str) -> object:
            raise AttributeError(name)

    monkeypatch.setattr(transformer.torch, "ops", type("Ops", (), {"mkldnn": NoMkldnn()})())
    w, x = torch.randn(5, 7), torch.randn(3, 7)
    linear = transformer.packed_linear(w, torch.float32, 3)
    torch.testing.assert_close(linear(x), F.linear(x, w))
    monkeypatch.undo()
    model = _model(**CONFIGS["qknorm-mqa"])  # type: ignore[arg-type]
    packed = _gen(model, PROMPTS, 10)
    monkeypatch.setattr(transformer.torch, "ops", type("Ops", (), {"mkldnn": NoMkldnn()})())
    assert _gen(model, PROMPTS, 10) == packed
