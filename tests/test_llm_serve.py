"""`dataeff serve` and the client's local backend on real (tiny) models: a dataeff run trained here, an
ensemble of two, and the run exported as a Hugging Face Llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from llm_fault_server import ThreadServer
from test_train import tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from dataeff.data.tokenizer import Tokenizer
from dataeff.eval.ensemble import EnsembleSpec, load_ensemble, save_ensemble
from dataeff.generate.llm import LLMConfig, Request, chat_to_text, run_job
from dataeff.generate.sample import generate
from dataeff.generate.serve import ServeConfig, build_app
from dataeff.model.hf import export_run
from dataeff.train.loop import train
from dataeff.train.rundir import load_model

SRC = Path(__file__).resolve().parents[1] / "src"
WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "big", "red", "house", "tree", "and", "then", "day"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(0)
    corpus = root / "small.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(WORDS, size=int(rng.integers(5, 30)))) + "."
                                  for _ in range(200)) + "\n", encoding="utf-8")
    a, b = root / "run-a", root / "run-b"
    for run, seed in ((a, 0), (b, 1)):
        cfg = tiny_config(corpus, run, epochs=6, dtype="fp32", init_seed=seed)
        cfg.tokenizer.vocab_size = 280  # what 14 words support
        train(cfg)
    return {"run": a, "ensemble": save_ensemble(EnsembleSpec("pair", [str(a), str(b)]), root / "pair.json"),
            "hf": export_run(a, root / "hf", eos_token="<|endoftext|>")}


def greedy(kind: str, path: Path, runs: dict[str, Path], text: str, max_tokens: int) -> str:
    """The model's greedy continuation of ``text``, computed without the server or the client."""
    if kind == "hf":
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        ids = tok(text, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
        eos = model.generation_config.eos_token_id
        return tok.decode(out[: out.index(eos)] if eos in out else out, skip_special_tokens=True)
    tokenizer = Tokenizer.load(runs["run"] / "tokenizer.json")
    model = load_ensemble(str(path)) if kind == "ensemble" else load_model(path)
    eos = tokenizer.eos_id
    [new] = generate(model, [[eos, *tokenizer.encode(text)]], max_new_tokens=max_tokens, temperature=0.0, eos_id=eos,
                     generator=torch.Generator().manual_seed(0))
    return tokenizer.decode(new[:-1] if new[-1] == eos else new)


def test_serve_answers_chat_completions_and_models_like_openai(models):
    run = models["run"]
    app = build_app(ServeConfig(model=str(run), dtype="fp32", device="cpu"))
    messages = [{"role": "user", "content": "the cat sat"}]
    with ThreadServer(app) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        [listed] = client.models.list().data
        assert listed.id == "run-a" and listed.model_extra["max_model_len"] == 32

        chat = client.chat.completions.create(model="run-a", messages=messages, max_tokens=8, temperature=0)
        expected = greedy("run", run, models, chat_to_text(messages), 8).split("\nUser:")[0].strip()
        assert expected and chat.choices[0].message.content == expected
        tokenizer = Tokenizer.load(run / "tokenizer.json")
        assert chat.usage.prompt_tokens == 1 + len(tokenizer.encode(chat_to_text(messages)))
        assert 1 <= chat.usage.completion_tokens <= 8

        streamed = client.chat.completions.create(model="run-a", messages=messages, max_tokens=8, temperature=0,
                                                  stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected

        done = client.completions.create(model="run-a", prompt=["the dog", "a big"], max_tokens=5, temperature=0, n=2)
        texts = [c.text for c in done.choices]
        assert texts == [greedy("run", run, models, p, 5) for p in ("the dog", "the dog", "a big", "a big")]
        assert all(t.strip() for t in texts)

        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="run-a", messages=[{"role": "user", "content": "the " * 40}],
                                           max_tokens=4)
        assert refused.value.code == "context_length_exceeded" and "context is 32 tokens" in refused.value.message
        with pytest.raises(openai.NotFoundError, match="serves 'run-a'"):
            client.chat.completions.create(model="gpt-4o", messages=messages)


@pytest.mark.parametrize("kind", ["run", "ensemble", "hf"])
def test_local_backend_answers_from_a_run_an_ensemble_and_a_hugging_face_model(models, tmp_path, kind):
    path = models[kind]
    cfg = LLMConfig(backend="local", model=str(path), cache=str(tmp_path / "cache.sqlite"), temperature=0.0,
                    max_tokens=6, dtype="fp32", device="cpu", progress=False, max_retries=3)
    prompts = ["the cat", "a red house", "then the dog ran", "the " * 40]
    requests = [Request([{"role": "user", "content": p}]) for p in prompts]
    job = run_job(cfg, requests)
    *answers, long = job.results
    for prompt, r in zip(prompts, answers, strict=False):
        want = greedy(kind, path, models, chat_to_text([{"role": "user", "content": prompt}]), 6)
        assert r.ok and r.text and r.text == want.split("\nUser:")[0].strip() and 1 <= r.completion_tokens <= 6
    assert not long.ok and "context is 32 tokens" in long.error and long.attempts == 1
    again = run_job(cfg, requests)
    assert [r.cached for r in again.results] == [True, True, True, False]


def test_serve_command_starts_the_test_model_on_a_free_port():
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-m", "dataeff.cli", "serve", "test", "port=0"], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("dataeff serve: http://127.0.0.1:") and line.rstrip().endswith("(model test)")
        url = line.split()[2]
        with urllib.request.urlopen(f"{url}/models", timeout=10) as r:
            assert json.load(r)["data"][0]["id"] == "test"
    finally:
        proc.terminate()
        proc.wait(10)
