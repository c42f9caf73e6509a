from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataeff.checkpoint import save_weights
from dataeff.config import to_dict
from dataeff.ensemble import EnsembleSpec, save_ensemble
from dataeff.errors import DataeffError
from dataeff.model import ModelConfig, Transformer
from dataeff.tasks import ClozeItem, EnsembleLogProbs, MCItem, evaluate_cloze, evaluate_mc, log_prob_fn
from dataeff.tokenizer import Tokenizer, train_bpe

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "under", "big", "red", "house", "while", "small",
         "blue", "bird", "sang", "because", "it", "was", "very", "happy", "day"]
SEQ_LEN = 16


@pytest.fixture(scope="module")
def lm_eval() -> ModuleType:
    return pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def adapter(lm_eval: ModuleType) -> ModuleType:
    import dataeff.lm_eval_adapter

    return dataeff.lm_eval_adapter


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    rng = np.random.default_rng(0)
    return train_bpe([" ".join(rng.choice(WORDS, size=12)) + "." for _ in range(300)], vocab_size=300)


@pytest.fixture(scope="module")
def model(tok: Tokenizer) -> Transformer:
    model = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=SEQ_LEN, vocab_size=tok.vocab_size))
    # Far larger weights than the initialisation, so log-probabilities differ clearly between tokens.
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if p.dim() == 1 else 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _save_run(path: Path, model: Transformer, tok: Tokenizer) -> Path:
    path.mkdir(parents=True)
    save_weights(path / "model.safetensors", model)
    (path / "manifest.json").write_text(json.dumps({"model": to_dict(model.cfg)}))
    tok.save(path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, model: Transformer, tok: Tokenizer) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    return _save_run(root / "a", model, tok), _save_run(root / "b", model, tok)


def _lp(model: Transformer, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0]


def _instances(lm_eval: ModuleType, kind: str, args: list[tuple[Any, ...]]) -> list[Any]:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_missing_lm_eval_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    monkeypatch.delitem(sys.modules, "dataeff.lm_eval_adapter", raising=False)
    monkeypatch.delitem(sys.modules, "dataeff.eval.lm_eval_adapter", raising=False)
    with pytest.raises(DataeffError, match=r"^dataeff.lm_eval_adapter needs lm-evaluation-harness: pip install lm-eval$"):
        importlib.import_module("dataeff.eval.lm_eval_adapter")


def test_loglikelihood_by_hand(lm_eval: ModuleType, adapter: ModuleType, runs: tuple[Path, Path],
                               model: Transformer, tok: Tokenizer) -> None:
    lm = adapter.DataeffLM.create_from_arg_string(f"run_dir={runs[0]},batch_size=2", {"device": "cpu"})
    args = [("the cat sat on the", " mat"), ("", "the dog ran"), ("a bird ", "sang because it was happy"),
            ("the big red house " * 6, "and the small blue bird")]
    got = lm.loglikelihood(_instances(lm_eval, "loglikelihood", args), disable_tqdm=True)
    for (context, continuation), (ll, greedy) in zip(args, got, strict=True):
        stripped = context.rstrip()
        ctx = [tok.eos_id, *tok.encode(stripped)]
        cont = tok.encode(context[len(stripped) :] + continuation)
        whole = (ctx + cont)[-(SEQ_LEN + 1) :]
        lp = _lp(model, whole[:-1])[len(whole) - 1 - len(cont) :]
        assert ll == pytest.approx(sum(lp[j, t].item() for j, t in enumerate(cont)), abs=1e-4)
        assert greedy == all(int(lp[j].argmax()) == t for j, t in enumerate(cont))


def test_loglikelihood_rolling_by_hand(lm_eval: ModuleType, adapter: ModuleType, runs: tuple[Path, Path],
                                       model: Transformer, tok: Tokenizer) -> None:
    lm = adapter.DataeffLM(run_dir=str(runs[0]), device="cpu", batch_size=3)
    text = "the cat sat on a mat and the dog ran under the big red house while a small blue bird sang because it was"
    tokens = tok.encode(text)
    assert len(tokens) > 2 * SEQ_LEN
    # Windows of SEQ_LEN predictions; each window's input is the SEQ_LEN tokens before its last prediction.
    expected, start, seq = 0.0, 0, [tok.eos_id, *tokens]
    while start < len(tokens):
        end = min(start + SEQ_LEN, len(tokens))
        offset = max(0, end - SEQ_LEN)
        lp = _lp(model, seq[offset:end])
        expected += sum(lp[j - offset, tokens[j]].item() for j in range(start, end))
        start = end
    got = lm.loglikelihood_rolling(_instances(lm_eval, "loglikelihood_rolling", [(text,), ("",)]), disable_tqdm=True)
    assert got[0] == pytest.approx(expected, abs=1e-4) and got[1] == 0.0


def _greedy(model: Transformer, tok: Tokenizer, context: str, max_new: int) -> str:
    ids, new = [tok.eos_id, *tok.encode(context)], []
    for _ in range(max_new):
        token = int(_lp(model, ids[-SEQ_LEN:])[-1].argmax())
        if token == tok.eos_id:
            break
        ids.append(token)
        new.append(token)
    return tok.decode(new)


def test_generate_until_by_hand(lm_eval: ModuleType, adapter: ModuleType, runs: tuple[Path, Path],
                                model: Transformer, tok: Tokenizer) -> None:
    lm = adapter.DataeffLM(run_dir=str(runs[0]), device="cpu")
    context = "the cat sat on the big red house and the dog"
    full = _greedy(model, tok, context, 24)  # runs past the 16-token context
    assert len(full) >= 6
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    requests = [(context, {"until": [], "max_gen_toks": 24}), (context, {"until": [stop], "max_gen_toks": 24}),
                (context, {"max_gen_toks": 3, "do_sample": False})]
    got = lm.generate_until(_instances(lm_eval, "generate_until", requests), disable_tqdm=True)
    assert got == [full, full.split(stop)[0], _greedy(model, tok, context, 3)]
    with pytest.raises(DataeffError, match="'top_k' is not supported"):
        lm.generate_until(_instances(lm_eval, "generate_until", [(context, {"top_k": 5})]), disable_tqdm=True)


def test_members_make_an_ensemble(lm_eval: ModuleType, adapter: ModuleType, runs: tuple[Path, Path]) -> None:
    a, b = runs
    pair = adapter.DataeffLM.create_from_arg_string(f"members={a},{b},combine=prob,device=cpu")
    one = adapter.DataeffLM.create_from_arg_string(f"run_dir={a},device=cpu")
    assert isinstance(pair.fn, EnsembleLogProbs) and len(pair.fn.ensemble) == 2
    requests = _instances(lm_eval, "loglikelihood", [("the cat", " sat on the mat"), ("a dog", " ran")])
    got, ref = pair.loglikelihood(requests, disable_tqdm=True), one.loglikelihood(requests, disable_tqdm=True)
    np.testing.assert_allclose([x for x, _ in got], [x for x, _ in ref], rtol=1e-5, atol=1e-5)
    # lm-eval's command passes model_args as a dict, with a list as a string and its own default device.
    cli = adapter.DataeffLM.create_from_arg_obj({"members": f"[{a},{b}]", "device": "cpu"}, {"device": "cuda:0", "batch_size": 1})
    assert len(cli.fn.ensemble) == 2 and cli.device == torch.device("cpu") and cli.batch_size == 1
    # A saved ensemble.json is an ensemble too; its tokenizer comes from its first member.
    saved = save_ensemble(EnsembleSpec(name="pair", members=[str(a), str(b)]), a.parent / "ensemble.json")
    from_file = adapter.DataeffLM.create_from_arg_string(f"members={saved},device=cpu")
    assert len(from_file.fn.ensemble) == 2
    np.testing.assert_allclose([x for x, _ in from_file.loglikelihood(requests, disable_tqdm=True)],
                               [x for x, _ in got], rtol=1e-6, atol=1e-6)
    with pytest.raises(DataeffError, match="exactly one of"):
        adapter.DataeffLM.create_from_arg_string(f"run_dir={a},members={b}")
    with pytest.raises(DataeffError, match="unknown key 'pretrained'"):
        adapter.DataeffLM.create_from_arg_string(f"pretrained={a}")


MC = [MCItem("the cat sat on the", ["mat", "big red house", "dog"], 0),
      MCItem("a small blue", ["bird", "house while it was", "day"], 1),
      MCItem("the dog ran under", ["the big red house", "a mat"], 1),
      MCItem("it was a very", ["happy day", "cat", "small blue bird sang"], 2)]
CLOZE = [ClozeItem("the cat sat on the", "mat"), ClozeItem("a small blue bird", "sang"),
         ClozeItem("the dog ran under the big red", "house")]


def _task_yaml(name: str, data: Path, body: str, cache: Path) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {cache}\ntest_split: test\n{body}")


def test_simple_evaluate_matches_our_scorer(lm_eval: ModuleType, adapter: ModuleType, runs: tuple[Path, Path],
                                            model: Transformer, tok: Tokenizer, tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager

    mc, cloze = tmp_path / "mc.jsonl", tmp_path / "cloze.jsonl"
    mc.write_text("".join(json.dumps({"context": it.context, "choices": it.choices, "gold": it.gold}) + "\n" for it in MC))
    cloze.write_text("".join(json.dumps({"context": it.context, "target": it.target}) + "\n" for it in CLOZE))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(_task_yaml("dataeff_test_mc", mc, (
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: choices\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"), tmp_path / "hf"))
    (tasks / "cloze.yaml").write_text(_task_yaml("dataeff_test_cloze", cloze, (
        "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: \"{{' ' + target}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n"), tmp_path / "hf"))

    results = lm_eval.simple_evaluate(
        model="dataeff", model_args=f"run_dir={runs[0]},device=cpu", tasks=["dataeff_test_mc", "dataeff_test_cloze"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), bootstrap_iters=0, log_samples=False,
    )["results"]
    ours_mc = evaluate_mc(log_prob_fn(model), tok, MC)
    ours_cloze = evaluate_cloze(log_prob_fn(model), tok, CLOZE)
    assert results["dataeff_test_mc"]["acc,none"] == pytest.approx(ours_mc["acc"])
    assert results["dataeff_test_mc"]["acc_norm,none"] == pytest.approx(ours_mc["acc_norm"])
    assert 0 < ours_mc["acc"] < 1
    assert results["dataeff_test_cloze"]["acc,none"] == pytest.approx(ours_cloze["acc"])
    assert results["dataeff_test_cloze"]["perplexity,none"] == pytest.approx(ours_cloze["perplexity"], rel=1e-5)
    assert math.isfinite(ours_cloze["perplexity"])
