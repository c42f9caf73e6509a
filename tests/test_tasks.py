from __future__ import annotations

import bz2
import json
import math
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataeff import cli
from dataeff.checkpoint import save_weights
from dataeff.config import to_dict
from dataeff.ensemble import Ensemble
from dataeff.errors import DataeffError
from dataeff.model import ModelConfig, Transformer
from dataeff.tasks import (
    ClozeItem,
    MCItem,
    PairItem,
    TasksConfig,
    encode_pairs,
    evaluate_cloze,
    evaluate_mc,
    evaluate_pairs,
    load_task,
    log_prob_fn,
    read_arc,
    read_blimp,
    read_hellaswag,
    read_lambada,
    read_piqa,
    run_tasks,
    score_requests,
    subset,
)
from dataeff.tokenizer import Tokenizer, train_bpe, train_word

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "under", "big", "red", "house", "while", "small",
         "blue", "bird", "sang", "because", "it", "was", "very", "happy", "day", "for", "little", "girl", "her",
         "friend", "who", "played", "with", "stones"]


def _docs(n: int = 300) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 30)))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(_docs(), vocab_size=300)


def _model(vocab_size: int, seq_len: int = 32, seed: int = 0) -> Transformer:
    model = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=seq_len, vocab_size=vocab_size))
    # Far larger weights than the initialisation, so log-probabilities differ clearly between tokens.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if p.dim() == 1 else 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def model(tok: Tokenizer) -> Transformer:
    return _model(tok.vocab_size)


def _manual(model: Transformer, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one full forward pass over the last seq_len + 1 tokens."""
    whole = (context + continuation)[-(model.cfg.seq_len + 1) :]
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([whole[:-1]])).float(), dim=-1)[0]
    first = len(whole) - 1 - len(continuation)
    return sum(lp[first + j, t].item() for j, t in enumerate(continuation))


class Uniform:
    """Every token equally likely: a choice's log-likelihood is -(its token count)·log V."""

    seq_len = 64

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.full((*idx.shape, self.vocab_size), -math.log(self.vocab_size))


# ---------------------------------------------------------------------------------------------------------
# readers on the real files

COUNTS = {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "hellaswag": 10042, "blimp": 67000,
          "lambada_openai": 5153}


@pytest.mark.data
@pytest.mark.parametrize("name", list(COUNTS))
def test_real_task_counts_and_labels(data_dir: Path, name: str) -> None:
    items = load_task(name, data_dir)
    assert len(items) == COUNTS[name]
    for it in items:
        if isinstance(it, MCItem):
            assert len(it.choices) == {"piqa": 2}.get(name, 4) and 0 <= it.gold < len(it.choices)
            assert all(c.strip() for c in it.choices) and it.context.strip()
        elif isinstance(it, ClozeItem):
            assert it.target.strip() and not it.target.startswith(" ")
        else:
            assert it.good.strip() and it.bad.strip()
    if name == "blimp":
        per_paradigm = Counter(it.paradigm for it in items if isinstance(it, PairItem))
        assert len(per_paradigm) == 67 and set(per_paradigm.values()) == {1000}


@pytest.mark.data
def test_real_hellaswag_preprocessing(data_dir: Path) -> None:
    items = load_task("hellaswag", data_dir)
    assert items[0].context == "Roof shingle removal: A man is sitting on a roof. He"  # type: ignore[union-attr]
    texts = [t for it in items for t in (it.context, *it.choices)]  # type: ignore[union-attr]
    assert not any("[" in t and "]" in t for t in texts)
    assert not any("  " in t for t in texts)


@pytest.mark.data
def test_limit_takes_a_seeded_subset_in_file_order(data_dir: Path) -> None:
    full = load_task("arc_easy", data_dir)
    some = load_task("arc_easy", data_dir, limit=50)
    assert some == load_task("arc_easy", data_dir, limit=50, seed=0) != load_task("arc_easy", data_dir, limit=50, seed=1)
    positions = [full.index(it) for it in some]
    assert positions == sorted(positions) and positions != list(range(50))
    assert load_task("arc_easy", data_dir, limit=50, seed=None) == full[:50]


def test_subset_is_whole_when_limit_exceeds() -> None:
    items = [ClozeItem("a", str(i)) for i in range(5)]
    assert subset(items, None) == items == subset(items, 10)
    with pytest.raises(DataeffError, match="at least 1"):
        subset(items, 0)


# ---------------------------------------------------------------------------------------------------------
# readers: malformed input names the file and line


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"query": "Question: q?", "choices": ["a", "b"], "gold": 1})
    path = tmp_path / "arc.jsonl"
    path.write_text(good + "\n\n" + '{"query": "Question: q?", "choices": ["a", "b"], "gold": 1\n')
    with pytest.raises(DataeffError, match=rf"^{path}:3: malformed JSON"):
        read_arc(path)
    path.write_text(good + "\n" + json.dumps({"query": "q", "choices": ["a", "b"], "gold": 2}) + "\n")
    with pytest.raises(DataeffError, match=rf"^{path}:2: field 'gold' is 2, expected an index 0-1"):
        read_arc(path)
    path.write_text(json.dumps({"choices": ["a", "b"], "gold": 0}) + "\n")
    with pytest.raises(DataeffError, match=rf"^{path}:1: missing field 'query'"):
        read_arc(path)
    path.write_text(json.dumps({"query": "q", "choices": ["a", ""], "gold": 0}) + "\n")
    with pytest.raises(DataeffError, match=rf"^{path}:1: field 'choices'"):
        read_arc(path)
    with pytest.raises(DataeffError, match="no such file"):
        read_arc(tmp_path / "missing.jsonl")

    lam = tmp_path / "lambada.jsonl"
    lam.write_text(json.dumps({"context": "x y", "continuation": "z"}) + "\n" + json.dumps({"context": "x", "continuation": 3}) + "\n")
    with pytest.raises(DataeffError, match=rf"^{lam}:2: field 'continuation' is int, expected a string"):
        read_lambada(lam)


def test_piqa_labels_must_match(tmp_path: Path) -> None:
    q, labels = tmp_path / "valid.jsonl", tmp_path / "valid-labels.lst"
    q.write_text("\n".join(json.dumps({"goal": f"g{i}", "sol1": "a", "sol2": "b"}) for i in range(3)) + "\n")
    labels.write_text("0\n1\n")
    with pytest.raises(DataeffError, match=rf"^{labels}: 2 labels for the 3 questions"):
        read_piqa(q, labels)
    labels.write_text("0\n1\n2\n")
    with pytest.raises(DataeffError, match=rf"^{labels}:3: field 'label' is 2"):
        read_piqa(q, labels)
    labels.write_text("0\n1\n1\n")
    items = read_piqa(q, labels)
    assert items[2] == MCItem("Question: g2\nAnswer:", ["a", "b"], 1)


def test_hellaswag_reader_and_its_errors(tmp_path: Path) -> None:
    path = tmp_path / "hs.txt.bz2"
    item = ["Sport: A man runs. the man", "1", "jumps  high.", "falls [title] over.", "sits.", "waves."]
    path.write_bytes(bz2.compress(("\n".join(item * 2) + "\n").encode()))
    items = read_hellaswag(path)
    assert items == [MCItem("Sport: A man runs. The man", ["jumps high.", "falls. over.", "sits.", "waves."], 1)] * 2
    bad = [*item, item[0], "7", *item[2:]]
    path.write_bytes(bz2.compress("\n".join(bad).encode()))
    with pytest.raises(DataeffError, match=rf"^{path}:8: field 'label' is 7"):
        read_hellaswag(path)
    path.write_bytes(bz2.compress("\n".join(item + item[:3]).encode()))
    with pytest.raises(DataeffError, match=rf"^{path}:7: incomplete item"):
        read_hellaswag(path)


def test_blimp_reads_zip_members_and_names_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "BLiMP.zip"
    pair = {"sentence_good": "Cats sleep.", "sentence_bad": "Cats sleeps."}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data/agreement.jsonl", json.dumps(pair) + "\n" + json.dumps(pair) + "\n")
        z.writestr("data/island.jsonl", json.dumps(pair) + "\n")
        z.writestr("__MACOSX/data/._agreement.jsonl", b"\x00\x05junk")
    assert [it.paradigm for it in read_blimp(path)] == ["agreement", "agreement", "island"]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data/agreement.jsonl", json.dumps(pair) + "\n" + json.dumps({"sentence_good": "x"}) + "\n")
    with pytest.raises(DataeffError, match=rf"^{path}:data/agreement.jsonl:2: missing field 'sentence_bad'"):
        read_blimp(path)


# ---------------------------------------------------------------------------------------------------------
# scoring


def test_encode_pairs_moves_trailing_space_and_prefixes_eos(tok: Tokenizer) -> None:
    (ctx, cont), (ctx2, cont2) = encode_pairs(tok, [("the cat ", "sat"), ("the cat", " sat")])
    assert ctx == ctx2 == [tok.eos_id, *tok.encode("the cat")] and cont == cont2 == tok.encode(" sat")
    assert encode_pairs(tok, [("", "the cat")]) == [([tok.eos_id], tok.encode("the cat"))]


def test_mc_log_likelihood_equals_full_forward(tok: Tokenizer, model: Transformer) -> None:
    items = [MCItem("the dog ran under the", ["big red house.", "mat", "small blue bird sang because"], 0),
             MCItem("a happy day for the little", ["girl", "friend who played with stones."], 1)]
    pairs = encode_pairs(tok, [(it.context, " " + c) for it in items for c in it.choices])
    fn = log_prob_fn(model)
    scores = score_requests(fn, pairs, batch_size=2)
    expected = [_manual(model, c, k) for c, k in pairs]
    np.testing.assert_allclose([s for s, _ in scores], expected, rtol=1e-5, atol=1e-5)
    unbatched = score_requests(fn, pairs, batch_size=1)
    np.testing.assert_allclose([s for s, _ in unbatched], expected, rtol=1e-5, atol=1e-5)
    assert [g for _, g in unbatched] == [g for _, g in scores]
    result = evaluate_mc(fn, tok, items, batch_size=3)
    manual_acc = np.mean([int(np.argmax(expected[:3]) == 0), int(np.argmax(expected[3:]) == 1)])
    assert result["acc"] == manual_acc and result["n"] == 2
    assert result["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_greedy_flag_is_argmax_of_every_token(tok: Tokenizer, model: Transformer) -> None:
    context = [tok.eos_id, *tok.encode("the cat sat on")]
    greedy = []
    with torch.no_grad():
        for _ in range(3):
            greedy.append(int(model(torch.tensor([context + greedy]))[0, -1].argmax()))
    other = [(greedy[0] + 1) % tok.vocab_size, *greedy[1:]]
    (_, yes), (_, no) = score_requests(log_prob_fn(model), [(context, greedy), (context, other)])
    assert yes and not no


def test_acc_norm_differs_from_acc_when_lengths_differ() -> None:
    word_tok = train_word(["ox big hippopotamus the answer is"] * 3, vocab_size=20)
    # Uniform: "ox" (1 token, 2 bytes) is likelier than "big hippopotamus" (2 tokens, 16 bytes), but less per byte.
    items = [MCItem("the answer is", ["ox", "big hippopotamus"], 1)]
    result = evaluate_mc(Uniform(word_tok.vocab_size), word_tok, items)
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0


def test_blimp_tie_counts_wrong(tok: Tokenizer, model: Transformer) -> None:
    fn = log_prob_fn(model)
    tie = evaluate_pairs(fn, tok, [PairItem("the cat sat.", "the cat sat.", "same")])
    assert tie["acc"] == 0.0 and tie["chance"] == 0.5
    a, b = "the cat sat on a mat.", "the mat sat on a cat."
    both = evaluate_pairs(fn, tok, [PairItem(a, b, "p1"), PairItem(b, a, "p2")])
    assert both["acc"] == 0.5 and sorted(both["paradigms"].values()) == [0.0, 1.0]
    # The whole sentence counts, its first token included (predicted from end-of-document).
    (ll, _), = score_requests(fn, encode_pairs(tok, [("", a)]))
    assert ll == pytest.approx(_manual(model, [tok.eos_id], tok.encode(a)), abs=1e-5)


def test_cloze_accuracy_and_perplexity(tok: Tokenizer, model: Transformer) -> None:
    items = [ClozeItem("the dog ran under the big red", "house"), ClozeItem("a small blue bird", "sang")]
    fn = log_prob_fn(model)
    result = evaluate_cloze(fn, tok, items)
    scores = score_requests(fn, encode_pairs(tok, [(it.context, " " + it.target) for it in items]))
    assert result["perplexity"] == pytest.approx(math.exp(-np.mean([s for s, _ in scores])))
    assert result["acc"] == np.mean([g for _, g in scores]) and result["n"] == 2 and result["chance"] == 0.0


def test_ensemble_of_identical_members_scores_like_one(tok: Tokenizer, model: Transformer) -> None:
    twin = _model(tok.vocab_size)
    items = [MCItem("the dog ran", ["under the house.", "on a mat."], 0), MCItem("a bird", ["sang", "sat"], 1)]
    pairs = encode_pairs(tok, [(it.context, " " + c) for it in items for c in it.choices])
    single = score_requests(log_prob_fn(model), pairs)
    paired = score_requests(log_prob_fn(Ensemble([model, twin], "prob")), pairs)
    np.testing.assert_allclose([s for s, _ in paired], [s for s, _ in single], rtol=1e-5, atol=1e-5)
    assert [g for _, g in paired] == [g for _, g in single]
    assert evaluate_mc(log_prob_fn(Ensemble([model, twin])), tok, items) == evaluate_mc(log_prob_fn(model), tok, items)


def test_truncation_keeps_the_continuation(tok: Tokenizer) -> None:
    short = _model(tok.vocab_size, seq_len=16)
    context = [tok.eos_id, *tok.encode("the dog ran under the big red house while a small bird sang")]
    continuation = tok.encode(" because it was")
    assert len(context) + len(continuation) > 17 and len(continuation) < 16
    (ll, _), = score_requests(log_prob_fn(short), [(context, continuation)])
    assert ll == pytest.approx(_manual(short, context, continuation), abs=1e-5)
    # Only the last context tokens matter: dropping the start changes nothing.
    (cut, _), = score_requests(log_prob_fn(short), [(context[-(17 - len(continuation)) :], continuation)])
    assert cut == pytest.approx(ll, abs=1e-5)
    # A continuation longer than the context: windows of 16 predictions, each after the 16 tokens before its last.
    long = tok.encode(" the cat sat on a mat and the dog ran under the big red house while a small bird sang")
    assert len(long) > 16
    (ll, greedy), = score_requests(log_prob_fn(short), [(context, long)])
    whole, expected, hand_greedy = context + long, 0.0, True
    for start in range(len(context), len(whole), 16):
        end = min(start + 16, len(whole))
        with torch.no_grad():
            lp = F.log_softmax(short(torch.tensor([whole[end - 17 : end - 1]])).float(), dim=-1)[0, 16 - (end - start) :]
        expected += sum(lp[j, t].item() for j, t in enumerate(whole[start:end]))
        hand_greedy &= all(int(lp[j].argmax()) == t for j, t in enumerate(whole[start:end]))
    assert ll == pytest.approx(expected, abs=1e-4) and greedy == hand_greedy


# ---------------------------------------------------------------------------------------------------------
# run_tasks and the command


def _run_dir(path: Path, model: Transformer, tok: Tokenizer) -> Path:
    path.mkdir(parents=True)
    save_weights(path / "model.safetensors", model)
    (path / "manifest.json").write_text(json.dumps({"model": to_dict(model.cfg)}))
    tok.save(path / "tokenizer.json")
    return path


def test_tasks_command_on_a_local_data_dir(tmp_path: Path, tok: Tokenizer, model: Transformer,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data" / "arc").mkdir(parents=True)
    (tmp_path / "data" / "lambada_openai").mkdir(parents=True)
    arc = [{"query": "Question: what sat on the mat?", "choices": ["the cat", "a dog", "a bird", "the house"], "gold": 0},
           {"query": "Question: what sang?", "choices": ["a stone", "a bird", "the red house", "a day"], "gold": 1}]
    (tmp_path / "data" / "arc" / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    (tmp_path / "data" / "lambada_openai" / "lambada_openai.jsonl").write_text(
        json.dumps({"context": "the cat sat on the", "continuation": "mat"}) + "\n")
    monkeypatch.setenv("DATAEFF_DATA_DIR", str(tmp_path / "data"))
    run = _run_dir(tmp_path / "run", model, tok)
    twin = _run_dir(tmp_path / "twin", model, tok)

    out = tmp_path / "tasks.json"
    assert cli.main(["tasks", str(run), "tasks=[arc_easy,lambada_openai]", f"out={out}", "progress=false",
                     "device=cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    items = load_task("arc_easy")
    assert printed["tasks"]["arc_easy"] == pytest.approx(evaluate_mc(log_prob_fn(model), tok, items))
    assert printed["tasks"]["lambada_openai"]["n"] == 1 and printed["tasks"]["lambada_openai"]["acc_stderr"] is None

    ensemble = run_tasks(TasksConfig(members=[str(run), str(twin)], tasks=["arc_easy"], progress=False, device="cpu"))
    assert ensemble["tasks"]["arc_easy"] == pytest.approx(printed["tasks"]["arc_easy"])
    with pytest.raises(DataeffError, match="exactly one of"):
        run_tasks(TasksConfig(run_dir=str(run), members=[str(twin)]))
    with pytest.raises(DataeffError, match="did you mean 'hellaswag'"):
        run_tasks(TasksConfig(run_dir=str(run), tasks=["helaswag"]))
