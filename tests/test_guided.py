"""Guided JSON decoding in `dataeff serve` and the client's local backend, on tiny dataeff runs trained here
(a byte-level BPE and a word-level one): answers that parse and validate, cut ones that say so, refused
schemas, the unconstrained path as it was, and EntiGraph getting entities and relation texts from such a
model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import openai
import pytest
import torch
from llm_fault_server import ThreadServer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from test_train import tiny_config

from dataeff.data.tokenizer import Tokenizer
from dataeff.generate.guided import Guide, Vocabulary
from dataeff.generate.llm import LLMConfig, Request, chat_to_text, run_job
from dataeff.generate.llm.sampling import json_schema_of
from dataeff.generate.sample import generate
from dataeff.generate.serve import ServeConfig, build_app
from dataeff.synth.entigraph import EntiGraphConfig, entigraph_job
from dataeff.train.loop import train
from dataeff.train.rundir import load_model

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "big", "red", "house", "Anna", "Ben", "Paris", "and"]


class Card(BaseModel):
    """Bounded everywhere, so a guided answer always fits in ``max_tokens`` and finishes."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=12)
    tags: list[Annotated[str, StringConstraints(max_length=6)]] = Field(max_length=3)
    size: int = Field(ge=0, le=99)


CARD = {"type": "json_schema", "json_schema": {"name": "card", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["name", "tags", "size"],
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 6}},
                   "size": {"type": "integer", "minimum": 0, "maximum": 99}}}}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A BPE run and a word-level run (which guided decoding refuses), context 256."""
    root = tmp_path_factory.mktemp("guided")
    rng = np.random.default_rng(0)
    text = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 30)))) + "." for _ in range(150)]
    shaped = [json.dumps({"name": f"{a} {b}", "tags": [c, d], "size": int(rng.integers(1, 9))})
              for a, b, c, d in rng.choice(WORDS[:8], size=(50, 4))]
    out = {}
    for kind, vocab in (("bpe", 290), ("word", 100)):
        corpus = root / f"{kind}.txt"
        corpus.write_text("\n\n".join(text + shaped) + "\n", encoding="utf-8")
        cfg = tiny_config(corpus, root / kind, epochs=1, dtype="fp32")
        cfg.model.seq_len = 256
        cfg.tokenizer.kind, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency = kind, vocab, 1
        train(cfg)
        out[kind] = root / kind
    return out


@pytest.fixture(scope="module")
def server(runs):
    with ThreadServer(build_app(ServeConfig(model=str(runs["bpe"]), name="tiny", dtype="fp32", device="cpu"))) as s:
        yield openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0)


def test_json_schema_answers_parse_and_validate_for_every_seed(server):
    for seed in range(6):
        chat = server.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the cat"}],
                                              max_tokens=120, temperature=1.0, seed=seed, response_format=CARD)
        [choice] = chat.choices
        card = Card.model_validate_json(choice.message.content)  # raises if it does not parse or validate
        assert list(json.loads(choice.message.content)) == ["name", "tags", "size"]  # the schema's order
        assert choice.finish_reason == "stop" and len(card.name) <= 12 and len(card.tags) <= 3
        assert all(len(t) <= 6 for t in card.tags)
    # vLLM's guided_json and /v1/completions take the same schema.
    done = server.completions.create(model="tiny", prompt="a dog", max_tokens=120, seed=1,
                                     extra_body={"guided_json": CARD["json_schema"]["schema"]})
    Card.model_validate_json(done.choices[0].text)


def test_json_object_answers_an_object_and_a_cut_answer_says_length(server):
    answers = [server.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Ben ran"}],
                                              max_tokens=150, seed=seed, response_format={"type": "json_object"},
                                              ).choices[0] for seed in range(4)]
    finished = [a for a in answers if a.finish_reason == "stop"]
    assert finished and all(isinstance(json.loads(a.message.content), dict) for a in finished)
    assert all(a.message.content.startswith("{") for a in answers)
    long = {"type": "json_schema", "json_schema": {"name": "long", "schema": {
        "type": "object", "properties": {"text": {"type": "string", "minLength": 200}}, "required": ["text"]}}}
    cut = server.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the"}], max_tokens=8,
                                         seed=0, response_format=long)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 8
    assert cut.choices[0].message.content.startswith('{"text":')  # the chat answer is stripped


def test_a_schema_the_engine_cannot_honour_is_refused_naming_it(server, runs):
    messages = [{"role": "user", "content": "the cat"}]
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                           "unevaluatedProperties": False}}}
    with pytest.raises(openai.BadRequestError) as refused:
        server.chat.completions.create(model="tiny", messages=messages, response_format=bad)
    assert "unevaluatedProperties" in refused.value.message and refused.value.param == "response_format"
    with pytest.raises(openai.BadRequestError, match="'xml' is not one of text, json_object, json_schema"):
        server.chat.completions.create(model="tiny", messages=messages, response_format={"type": "xml"})


def test_a_word_level_model_refuses_a_schema_and_still_writes_free_text(runs):
    with pytest.raises(ValueError, match="needs a byte-level BPE tokenizer"):
        Vocabulary(Tokenizer.load(runs["word"] / "tokenizer.json"), 100)
    messages = [{"role": "user", "content": "the cat"}]
    with ThreadServer(build_app(ServeConfig(model=str(runs["word"]), name="w", dtype="fp32", device="cpu"))) as s:
        client = openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="w", messages=messages, max_tokens=60, response_format=CARD)
        assert refused.value.param == "response_format" and "json_mode=off" in refused.value.message
        free = client.chat.completions.create(model="w", messages=messages, max_tokens=6, seed=0)
        assert free.usage.completion_tokens >= 1


def test_the_unconstrained_path_samples_exactly_as_the_plain_sampler(server, runs):
    tokenizer = Tokenizer.load(runs["bpe"] / "tokenizer.json")
    model = load_model(runs["bpe"])
    messages = [{"role": "user", "content": "the big dog"}]
    prompt = [tokenizer.eos_id, *tokenizer.encode(chat_to_text(messages))]
    for seed in (0, 3):
        [new] = generate(model, [prompt], max_new_tokens=12, temperature=1.0, eos_id=tokenizer.eos_id,
                         generator=torch.Generator().manual_seed(seed))
        want = tokenizer.decode(new[:-1] if new[-1] == tokenizer.eos_id else new).split("\nUser:")[0].strip()
        got = server.chat.completions.create(model="tiny", messages=messages, max_tokens=12, seed=seed)
        assert got.choices[0].message.content == want
    # Rows are masked one by one: in a batch of a constrained and a free row, only the first is JSON.
    schema = json_schema_of(CARD)
    rows = generate(model, [prompt, prompt], max_new_tokens=120, eos_id=tokenizer.eos_id,
                    generator=torch.Generator().manual_seed(0),
                    guide=Guide(Vocabulary(tokenizer, model.cfg.vocab_size), [schema, None]))
    Card.model_validate_json(tokenizer.decode(rows[0][:-1]))
    assert not tokenizer.decode(rows[1]).startswith('{"name": "')


def test_the_local_backend_decodes_a_schema_request_under_its_schema(runs, tmp_path):
    cfg = LLMConfig(backend="local", model=str(runs["bpe"]), cache=str(tmp_path / "cache.sqlite"), max_tokens=120,
                    dtype="fp32", device="cpu", progress=False, seed=0, max_reasks=0)
    job = run_job(cfg, [Request([{"role": "user", "content": f"the {w}"}], schema=Card) for w in WORDS[:5]])
    assert all(r.ok and isinstance(r.parsed, Card) for r in job.results), [r.error for r in job.results]
    assert job.summary.reasks == 0 and job.summary.parse_failures == 0


def test_entigraph_against_a_guided_server_gets_entities_and_writes_relation_texts(runs, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Anna met Ben in Paris.", "the dog ran.", "Ben sat on a big red house.",
                                                                  "a cat and a dog."]))
    prompts = {}
    for name, text in (("entities", "List entities.\n=== user ===\n{document}\n"),
                       ("pair", "Relate.\n=== user ===\n{document} {entities} {focus}\n"),
                       ("triple", "Relate.\n=== user ===\n{document} {entities} {focus}\n")):
        prompts[f"{name}_prompt"] = str(tmp_path / f"{name}.txt")
        Path(prompts[f"{name}_prompt"]).write_text(text)
    with ThreadServer(build_app(ServeConfig(model=str(runs["bpe"]), name="tiny", dtype="fp32", device="cpu"))) as s:
        llm = LLMConfig(base_url=s.url, model="tiny", api_key_env="", cache=str(tmp_path / "cache.sqlite"),
                        progress=False, max_tokens=16, temperature=1.0, seed=0, max_reasks=0, timeout=60)
        metrics = entigraph_job(EntiGraphConfig(input=str(docs), llm=llm, entity_max_tokens=200, max_entities=3,
                                                summary_max_chars=40, triples=1, **prompts), tmp_path / "out")
    documents = [json.loads(line) for line in (tmp_path / "out" / "documents.jsonl").read_text().splitlines()]
    assert metrics["entities"] > 0 and metrics["relation_texts"] > 0, documents
    # Bounded (a 40-character summary, 3 entities of <= 60), these answers fit their 200 tokens: none fails.
    assert {d["status"] for d in documents} <= {"done", "no_entities"}, documents
    records = [json.loads(line) for line in (tmp_path / "out" / "corpus.jsonl").read_text().splitlines()]
    assert all(len(r["text"]) <= 40 for r in records if r["kind"] == "summary")  # the schema's maxLength
    assert {r["kind"] for r in records} >= {"summary", "pair"}
    assert metrics["relation_texts"] == sum(r["kind"] in ("pair", "triple") for r in records)
