from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize, minimize_scalar

import dataeff.ensemble as ens
from dataeff.checkpoint import save_weights
from dataeff.config import to_dict
from dataeff.ensemble import (
    Ensemble,
    EnsembleSpec,
    combine_log_probs,
    ensemble_nll,
    evaluate_ensemble,
    load_ensemble,
    mixture_weights,
    read_ensemble,
    save_ensemble,
)
from dataeff.errors import DataeffError
from dataeff.evaluate import batches, evaluate
from dataeff.evaluate_run import load_model
from dataeff.model import ModelConfig, Transformer
from dataeff.sample import SampleConfig, generate, sample
from dataeff.tokenizer import Tokenizer, train_word
from dataeff.tokens import TokenSplit

WORDS = ["cat", "dog", "sat", "ran", "on", "the", "mat", "big", "red", "house", "tree", "bird", "sang", "and",
         "then", "it", "was", "day", "girl", "boy"]
SEQ = 16
BATCH = 4  # 30 full windows: batches of 4, one of 2, then the ragged window alone


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_word([" ".join(WORDS)], vocab_size=len(WORDS) + 2, min_frequency=1)


def _model(vocab: int, seed: int, scale: float = 0.3, base: Transformer | None = None) -> Transformer:
    """Random weights far from initialisation (peaked distributions), or ``base``'s plus noise of ``scale``."""
    model = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=4, seq_len=SEQ, vocab_size=vocab))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = scale * torch.randn(p.shape, generator=g)
            if base is not None:
                p.copy_(base.get_parameter(name) + noise)
            else:
                p.copy_(1.0 + noise if p.dim() == 1 else noise)
    return model.eval()


def _run_dir(path: Path, model: Transformer, tok: Tokenizer) -> Path:
    path.mkdir(parents=True)
    tok.save(path / "tokenizer.json")
    (path / "manifest.json").write_text(json.dumps({"model": to_dict(model.cfg)}))
    save_weights(path / "model.safetensors", model, {"model": to_dict(model.cfg)})
    return path


def _sampled(model: Transformer, windows: int, ragged: int, seed: int) -> np.ndarray:
    """Tokens sampled from ``model`` window by window, each window seeing only its own context, exactly as
    evaluation windows do: so ``model`` is the true distribution of every scored target."""
    g = torch.Generator().manual_seed(seed)
    tokens = [int(torch.randint(model.cfg.vocab_size, (1,), generator=g))]
    for i in range(windows + 1):
        new = generate(model, [[tokens[-1]]], max_new_tokens=SEQ, temperature=1.0, stop_at_eos=False, generator=g,
                       dtype="fp32")[0]
        tokens.extend(new if i < windows else new[:ragged])
    return np.asarray(tokens, dtype=np.uint16)


def _split(tokens: np.ndarray, name: str) -> TokenSplit:
    return TokenSplit(name, tokens, np.asarray([0, len(tokens)]), n_bytes=4 * len(tokens), n_words=len(tokens) // 2)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> dict:
    """Three members: the model the data is sampled from, a noisy copy of it, and an unrelated model."""
    root = tmp_path_factory.mktemp("ensemble")
    truth = _model(tok.vocab_size, seed=1)
    models = [truth, _model(tok.vocab_size, seed=2, scale=0.15, base=truth), _model(tok.vocab_size, seed=3)]
    dirs = [str(_run_dir(root / name, m, tok)) for name, m in zip(["good", "noisy", "other"], models, strict=True)]
    val = _split(_sampled(truth, 30, 5, seed=10), "val")
    fitness = _split(_sampled(truth, 30, 5, seed=11), "fitness")
    return {"root": root, "models": models, "dirs": dirs, "val": val, "fitness": fitness}


def _reference(models: list[Transformer], split: TokenSplit, mode: str, weights: torch.Tensor | None = None) -> float:
    """Mean NLL of the ensemble of ``models`` from full forward passes combined by ``combine_log_probs``."""
    nats, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches(split.tokens, SEQ, BATCH):
            lps = [F.log_softmax(m(x).float(), dim=-1) for m in models]
            nll = ensemble_nll(combine_log_probs(lps, mode, weights), y)  # type: ignore[arg-type]
            nats += float(nll.double().sum())
            count += nll.numel()
    return nats / count


def _target_log_probs(models: list[Transformer], split: TokenSplit) -> np.ndarray:
    """(K, T) log-probabilities of every scored target under each model."""
    rows = []
    with torch.no_grad():
        for m in models:
            parts = [F.log_softmax(m(x).float(), dim=-1).gather(-1, y[..., None]).reshape(-1)
                     for x, y in batches(split.tokens, SEQ, BATCH)]
            rows.append(torch.cat(parts).double().numpy())
    return np.stack(rows)


def _mean_ll(log_probs: np.ndarray, w: np.ndarray) -> float:
    return float(np.mean(np.log(w @ np.exp(log_probs))))


# ---------------------------------------------------------------------------------------------------------
# evaluation


def test_one_member_and_each_member_score_as_evaluate(world: dict) -> None:
    val = world["val"]
    ev = evaluate_ensemble(world["dirs"], val, batch_size=BATCH)  # bf16, as evaluate() defaults
    assert ev.k == [1, 2, 3] and ev.names == world["dirs"]
    for i, run in enumerate(world["dirs"]):
        single = evaluate(load_model(run), val.tokens, n_bytes=val.n_bytes, n_words=val.n_words, seq_len=SEQ,
                          batch_size=BATCH)
        got = ev.members[i]
        assert got.tokens == single.tokens == val.n_tokens - 1
        assert (got.loss, got.bpb, got.word_ppl) == pytest.approx((single.loss, single.bpb, single.word_ppl), rel=1e-9)
        if i == 0:
            assert ev.prob is not None and ev.logit is not None
            assert ev.prob[0].loss == pytest.approx(single.loss, rel=1e-9)
            assert ev.logit[0].loss == pytest.approx(single.loss, rel=1e-5)  # log_softmax of log-probs: float noise


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_prefix_losses_equal_brute_force(world: dict, mode: str) -> None:
    ev = evaluate_ensemble(world["dirs"], world["val"], modes=(mode,), batch_size=BATCH, dtype="fp32")
    curve = ev.prob if mode == "prob" else ev.logit
    assert curve is not None and (ev.logit if mode == "prob" else ev.prob) is None
    expected = [_reference(world["models"][:k], world["val"], mode) for k in ev.k]
    assert [r.loss for r in curve] == pytest.approx(expected, rel=2e-6)
    # The members differ, so the curve is not flat: a wrong prefix would show.
    assert len({round(x, 4) for x in expected}) == 3


def _load_tracker(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch the loader to record, at each load, how many previously loaded members are still alive."""
    alive: list[weakref.ref] = []
    counts: list[int] = []

    def tracked(*args: object, **kwargs: object) -> Transformer:
        gc.collect()
        counts.append(sum(r() is not None for r in alive))
        model = load_model(*args, **kwargs)  # type: ignore[arg-type]
        alive.append(weakref.ref(model))
        return model

    monkeypatch.setattr(ens, "load_model", tracked)
    return counts


def test_resident_streaming_and_spilled_paths_agree(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    kw = {"fitness": world["fitness"], "batch_size": BATCH}
    counts = _load_tracker(monkeypatch)
    resident = evaluate_ensemble(world["dirs"], world["val"], resident=True, **kw).to_dict()
    assert counts == [0, 1, 2]
    counts.clear()
    streamed = evaluate_ensemble(world["dirs"], world["val"], resident=False, **kw).to_dict()
    assert counts == [0, 0, 0]  # one member loaded at a time
    assert streamed == resident
    monkeypatch.setattr(ens, "SPILL_BYTES", 0)  # the running sum goes to a memmap
    assert evaluate_ensemble(world["dirs"], world["val"], resident=False, **kw).to_dict() == resident

    for budget, pattern in ((0, [0, 0, 0]), (2**40, [0, 1, 2])):
        monkeypatch.setattr(ens, "RESIDENT_BYTES", budget)
        counts.clear()
        assert evaluate_ensemble(world["dirs"], world["val"], **kw).to_dict() == resident
        assert counts == pattern
    assert json.loads(json.dumps(resident)) == resident


def test_probability_mode_skips_full_vocabulary_work(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = F.log_softmax

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(F, "log_softmax", spy)
    for resident in (True, False):
        ev = evaluate_ensemble(world["dirs"], world["val"], modes=("prob",), batch_size=BATCH, resident=resident)
        assert ev.logit is None and ev.prob is not None
    assert not calls
    evaluate_ensemble(world["dirs"], world["val"], modes=("logit",), batch_size=BATCH)
    assert calls


def test_learned_weights_are_the_optimum_on_the_fitness_split(world: dict) -> None:
    models, val, fitness = world["models"], world["val"], world["fitness"]
    ev = evaluate_ensemble(world["dirs"], val, fitness=fitness, batch_size=BATCH, dtype="fp32")
    assert ev.weights is not None and ev.weighted is not None and ev.weights_learned
    w = np.asarray(ev.weights)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)

    lp = _target_log_probs(models, fitness)
    uniform = np.full(3, 1 / 3)
    assert _mean_ll(lp, w) > _mean_ll(lp, uniform) + 0.05
    # The brute-force optimum over the simplex, by a general-purpose constrained optimiser.
    best = minimize(lambda v: -_mean_ll(lp, v), uniform, method="SLSQP", bounds=[(0, 1)] * 3,
                    constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1}], options={"ftol": 1e-14, "maxiter": 500})
    assert _mean_ll(lp, w) >= -best.fun - 1e-9
    assert w == pytest.approx(np.clip(best.x, 0, 1), abs=2e-3)
    # The model the data came from takes most of the weight.
    assert w.argmax() == 0 and w[0] > 0.5

    assert ev.weighted.loss == pytest.approx(_reference(models, val, "prob", torch.tensor(ev.weights)), rel=2e-6)
    # Weights fitted on one sample of the distribution help on another.
    assert ev.prob is not None and ev.weighted.loss < ev.prob[-1].loss


def test_mixture_weights_match_a_grid_and_an_optimiser() -> None:
    rng = np.random.default_rng(0)
    # Two members with an interior optimum: each is better on half of the tokens.
    lp2 = np.log(np.stack([np.where(np.arange(400) % 2, 0.6, 0.1), np.where(np.arange(400) % 2, 0.05, 0.5)]))
    w2 = mixture_weights(lp2)
    best = minimize_scalar(lambda a: -_mean_ll(lp2, np.array([a, 1 - a])), bounds=(0, 1), method="bounded",
                           options={"xatol": 1e-12})
    assert 0.05 < best.x < 0.95 and w2[0] == pytest.approx(best.x, abs=1e-5)
    grid = np.linspace(0, 1, 10001)
    assert _mean_ll(lp2, w2) >= max(_mean_ll(lp2, np.array([a, 1 - a])) for a in grid) - 1e-12

    # Four members, one useless everywhere: its optimal weight is 0 (the boundary of the simplex).
    lp4 = np.log(rng.dirichlet(np.ones(8), size=(4, 300))[..., 0])
    lp4[3] = lp4[:3].min(axis=0) - 2.0
    w4 = mixture_weights(lp4)
    best4 = minimize(lambda v: -_mean_ll(lp4, v), np.full(4, 0.25), method="SLSQP", bounds=[(0, 1)] * 4,
                     constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1}], options={"ftol": 1e-15, "maxiter": 1000})
    assert _mean_ll(lp4, w4) >= -best4.fun - 1e-10
    assert w4[3] < 1e-6 and w4.sum() == pytest.approx(1.0)


def test_explicit_and_saved_weights_are_used(world: dict, tmp_path: Path) -> None:
    models, val = world["models"], world["val"]
    given = [3.0, 1.0, 0.0]
    ev = evaluate_ensemble(world["dirs"], val, fitness=world["fitness"], weights=given, batch_size=BATCH, dtype="fp32")
    assert ev.weights == pytest.approx([0.75, 0.25, 0.0]) and not ev.weights_learned
    assert ev.weighted is not None
    expected = _reference(models, val, "prob", torch.tensor(given))
    assert ev.weighted.loss == pytest.approx(expected, rel=2e-6)

    path = save_ensemble(EnsembleSpec("weighted", world["dirs"], "prob", given), tmp_path)
    saved = evaluate_ensemble(path, val, batch_size=BATCH, dtype="fp32")
    assert saved.weighted == ev.weighted and saved.weights == ev.weights
    assert saved.to_dict() == evaluate_ensemble([str(path)], val, batch_size=BATCH, dtype="fp32").to_dict()
    with pytest.raises(DataeffError, match="2 weights for 3 members"):
        evaluate_ensemble(world["dirs"], val, weights=[1, 1])


# ---------------------------------------------------------------------------------------------------------
# the saved ensemble


def test_save_read_round_trip(tmp_path: Path) -> None:
    spec = EnsembleSpec("demo x3", ["runs/a", str(tmp_path / "b"), "c"], "logit", [1, 2, 0.5])
    path = save_ensemble(spec, tmp_path / "out")
    assert path == tmp_path / "out" / "ensemble.json"
    assert read_ensemble(path) == read_ensemble(tmp_path / "out") == spec
    assert json.loads(path.read_text())["members"] == ["runs/a", str(tmp_path / "b"), "c"]  # stored as given
    other = save_ensemble(EnsembleSpec("plain", [Path("x")]), tmp_path / "named.json")
    assert other == tmp_path / "named.json" and read_ensemble(other) == EnsembleSpec("plain", ["x"], "prob", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["named.json", "out"]  # no temporary files left


def test_load_ensemble_from_a_saved_file(world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = world["root"]
    monkeypatch.chdir(root)
    spec = EnsembleSpec("rel", ["good", "noisy"], "logit", [1.0, 3.0])  # relative to the working directory
    path = save_ensemble(spec, tmp_path / "ens")
    ensemble = load_ensemble(path)
    assert ensemble.mode == "logit" and ensemble.names == ["good", "noisy"]
    x = torch.tensor([[1, 2, 3, 4, 5]])
    lps = [F.log_softmax(m(x).float(), dim=-1) for m in world["models"][:2]]
    expected = combine_log_probs(lps, "logit", torch.tensor([1.0, 3.0]))
    assert torch.allclose(ensemble.log_probs(x), expected, atol=1e-6)
    assert torch.allclose(load_ensemble(path, "prob").log_probs(x), combine_log_probs(lps, "prob", torch.tensor([1.0, 3.0])),
                          atol=1e-6)
    assert torch.allclose(Ensemble.from_spec(spec).log_probs(x), expected, atol=1e-6)
    assert load_ensemble([str(path)]).mode == "logit"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataeffError, match="ensemble member good: no such run directory"):
        load_ensemble(path)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", r"ensemble.json:1: malformed JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"name": "x"}', "missing field 'members'"),
    ('{"name": "x", "members": []}', "field 'members'"),
    ('{"name": "x", "members": ["a", 3]}', r"field 'members\[1\]'"),
    ('{"name": 5, "members": ["a"]}', "field 'name'"),
    ('{"name": "x", "members": ["a"], "combine": "mean"}', "field 'combine': 'mean'"),
    ('{"name": "x", "members": ["a", "b"], "weights": [1]}', "field 'weights': 1 weights for 2 members"),
    ('{"name": "x", "members": ["a", "b"], "weights": [1, -0.5]}', r"field 'weights\[1\]': -0.5"),
    ('{"name": "x", "members": ["a", "b"], "weights": [true, 1]}', r"field 'weights\[0\]'"),
    ('{"name": "x", "members": ["a", "b"], "weights": [0, 0]}', "sum to 0"),
    ('{"name": "x", "members": ["a"], "weights": "1"}', "field 'weights'"),
    ('{"name": "x", "members": ["a"], "member": ["b"]}', "unknown field 'member'"),
    ('{"version": 2, "name": "x", "members": ["a"]}', "field 'version': 2"),
])
def test_malformed_ensemble_file_names_file_and_field(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "ensemble.json"
    path.write_text(content)
    for read in (read_ensemble, load_ensemble, lambda p: evaluate_ensemble(p, _split(np.zeros(4, np.uint16), "v"))):
        with pytest.raises(DataeffError, match=message) as e:
            read(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_invalid_spec_and_missing_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataeffError, match=r"ensemble 'x': field 'weights\[0\]'"):
        EnsembleSpec("x", ["a"], weights=[float("nan")])
    with pytest.raises(DataeffError, match="no such ensemble file"):
        read_ensemble(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------------
# bad members


def _bad_members(root: Path, tok: Tokenizer, good: Transformer) -> dict[str, tuple[Path, str]]:
    """name -> (run directory, what the error must say besides the member)."""
    cases: dict[str, tuple[Path, str]] = {}
    other_tok = train_word([" ".join(f"w{i}" for i in range(len(WORDS)))], vocab_size=tok.vocab_size, min_frequency=1)
    cases["tokenizer"] = (_run_dir(root / "tokenizer", good, other_tok), "different tokenizer")
    cases["vocab"] = (_run_dir(root / "vocab", _model(tok.vocab_size + 3, seed=4), tok), "has vocabulary 25")
    missing = _run_dir(root / "missing", good, tok)
    (missing / "model.safetensors").unlink()
    cases["missing"] = (missing, "model.safetensors: not found")
    truncated = _run_dir(root / "truncated", good, tok)
    blob = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    cases["truncated"] = (truncated, "corrupt or unreadable safetensors")
    garbage = _run_dir(root / "garbage", good, tok)
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    cases["garbage"] = (garbage, "corrupt or unreadable safetensors")
    manifest = _run_dir(root / "manifest", good, tok)
    (manifest / "manifest.json").write_text("{oops")
    cases["manifest"] = (manifest, "manifest.json: malformed JSON")
    # A header that reads but weights of another shape: found only when the member loads.
    shape = _run_dir(root / "shape", good, tok)
    small = Transformer(ModelConfig(d_model=16, n_layers=2, n_heads=4, seq_len=SEQ, vocab_size=tok.vocab_size))
    save_weights(shape / "model.safetensors", small)
    cases["shape"] = (shape, "weights do not fit the model")
    cases["nodir"] = (root / "nodir", "no such run directory")
    return cases


def test_bad_members_are_refused_by_name(world: dict, tok: Tokenizer, tmp_path: Path) -> None:
    val = world["val"]
    for name, (run, message) in _bad_members(tmp_path, tok, world["models"][0]).items():
        members = [world["dirs"][0], world["dirs"][1], str(run)]
        attempts = [
            lambda m=members: load_ensemble(m),
            lambda m=members: evaluate_ensemble(m, val, batch_size=BATCH, resident=True),
            lambda m=members: evaluate_ensemble(m, val, batch_size=BATCH, resident=False, modes=("prob", "logit")),
        ]
        for attempt in attempts:
            with pytest.raises(DataeffError, match=message) as e:
                attempt()
            assert str(run) in str(e.value) and "\n" not in str(e.value), name


def test_evaluate_refuses_bad_arguments(world: dict) -> None:
    val = world["val"]
    cases = [
        ({"modes": ("mean",)}, "mode 'mean'"),
        ({"seq_len": SEQ + 1}, "seq_len 17 must be in 1..16"),
        ({"dtype": "fp16"}, "dtype 'fp16'"),
        ({"batch_size": 0}, "batch_size 0"),
    ]
    for kw, message in cases:
        with pytest.raises(DataeffError, match=message):
            evaluate_ensemble(world["dirs"], val, **kw)  # type: ignore[arg-type]
    with pytest.raises(DataeffError, match="split 'bad': token id 99 is outside the members' vocabulary of 22"):
        evaluate_ensemble(world["dirs"], _split(np.asarray([1, 2, 99], np.uint16), "bad"))
    with pytest.raises(DataeffError, match="split 'one': no tokens to score"):
        evaluate_ensemble(world["dirs"], _split(np.asarray([1], np.uint16), "one"))
    with pytest.raises(DataeffError, match="no member run directories"):
        evaluate_ensemble([], val)


def test_sample_and_tasks_accept_a_saved_ensemble(world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataeff.tasks import TasksConfig, run_tasks

    pair = [world["dirs"][0], world["dirs"][2]]
    path = save_ensemble(EnsembleSpec("pair", pair, "logit"), tmp_path)
    kw = {"prompts": ["the cat", ""], "max_tokens": 4, "num_samples": 3, "dtype": "fp32", "device": "cpu"}
    from_file = sample(SampleConfig(members=[str(path)], **kw))  # type: ignore[arg-type]
    assert from_file == sample(SampleConfig(members=pair, combine="logit", **kw))  # type: ignore[arg-type]
    # The saved mode counts: the same members by probability averaging sample otherwise.
    assert from_file != sample(SampleConfig(members=pair, **kw))  # type: ignore[arg-type]

    (tmp_path / "data" / "arc").mkdir(parents=True)
    arc = [{"query": "Question: what sat?", "choices": ["the cat", "a dog", "the red house"], "gold": 0},
           {"query": "Question: what sang?", "choices": ["a tree", "the bird", "it"], "gold": 1}]
    (tmp_path / "data" / "arc" / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    monkeypatch.setenv("DATAEFF_DATA_DIR", str(tmp_path / "data"))
    task_kw = {"tasks": ["arc_easy"], "progress": False, "device": "cpu"}
    scored = run_tasks(TasksConfig(members=[str(path)], **task_kw))  # type: ignore[arg-type]
    assert scored == run_tasks(TasksConfig(members=pair, combine="logit", **task_kw))  # type: ignore[arg-type]
    assert scored["combine"] == "logit" and scored["members"] == pair
