"""Local models behind the client and ``dataeff serve``: a dataeff run, an ensemble, or a Hugging Face causal LM.

:func:`load_local` tells them apart by what the path holds: a run directory (``manifest.json`` and
``model.safetensors``), an ``ensemble.json``, or a Hugging Face model directory (``config.json``). dataeff
models and ensembles decode through dataeff's KV-cached sampler (:func:`dataeff.sample.generate`), every
prompt after an end-of-document token as in training; Hugging Face models through ``transformers``'
``generate`` with left padding. Chat messages become text through the tokenizer's own chat template where a
Hugging Face tokenizer has one, else through :mod:`dataeff.generate.llm.template`.

A prompt that does not fit the model's context with its ``max_tokens`` is refused with both sizes
(:class:`ContextTooLong`), never truncated. A request with a JSON Schema (``GenParams.schema``) is decoded
under it (:mod:`dataeff.generate.guided`) by dataeff models and ensembles with a byte-level BPE tokenizer;
Hugging Face models and word-level runs refuse it. Concurrent requests are decoded together by a
:class:`Batcher`: it waits a few milliseconds for requests to join, then decodes up to ``batch_size`` with equal sampling
settings in one batch, in a worker thread, one batch at a time; requests with and without a schema share a
batch, each row masked by its own. A seed makes a batch reproducible: rows of
one batch share one generator.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dataeff.data.tokenizer import Tokenizer
from dataeff.errors import DataeffError
from dataeff.eval.ensemble import Ensemble, load_ensemble, resolve_members
from dataeff.generate.guided import Guide, Vocabulary
from dataeff.generate.llm.cache import Answer
from dataeff.generate.llm.config import LLMConfig
from dataeff.generate.llm.sampling import Completion, GenParams, context_error
from dataeff.generate.llm.template import STOP, chat_to_text, cut_at_stop
from dataeff.generate.sample import generate
from dataeff.model.transformer import Transformer
from dataeff.train.dist import pick_device
from dataeff.train.rundir import load_model


def _fingerprint(paths: Sequence[Path]) -> str:
    """Names, sizes and modification times of a model's files: retraining into the same path changes it."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


class LocalModel(ABC):
    name: str
    context: int
    fingerprint: str
    stops: tuple[str, ...] = STOP  # the chat template's end of turn

    @abstractmethod
    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> str: ...

    @abstractmethod
    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids as the model sees them."""

    @abstractmethod
    def generate_ids(self, prompts: list[list[int]], params: GenParams,
                     schemas: Sequence[str | None]) -> list[tuple[list[int], bool]]:
        """New token ids per prompt, each under its JSON Schema if it has one, and whether the row ended at
        end-of-document."""

    @abstractmethod
    def check_schema(self, schema: str) -> None:
        """``ValueError`` naming the problem if this model cannot decode answers matching ``schema``."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        # The last new token is sampled, never fed back, so it needs no position.
        if prompt_tokens + max_tokens - 1 > self.context:
            raise context_error(prompt_tokens, max_tokens, self.context)

    def generate_batch(self, prompts: list[list[int]], params: GenParams,
                       schemas: Sequence[str | None] | None = None) -> list[Completion]:
        out = []
        rows = self.generate_ids(prompts, params, schemas or [params.schema] * len(prompts))
        for ids, (new, eos) in zip(prompts, rows, strict=True):
            text = self.decode(new)
            cut, stopped = cut_at_stop(text, params.stop)
            n = len(new) + int(eos)
            if stopped:
                # The fewest new tokens whose text already holds the stop sequence.
                n = bisect.bisect_left(range(1, len(new) + 1), True,
                                       key=lambda k: cut_at_stop(self.decode(new[:k]), params.stop)[1]) + 1
            out.append(Completion(cut, len(ids), n, "stop" if eos or stopped else "length"))
        return out


class DataeffModel(LocalModel):
    """A dataeff run directory or ensemble.json, through dataeff's sampler."""

    def __init__(self, path: Path, device: str, dtype: str, batch_size: int):
        self.model: Any
        if path.is_file():
            self.model = load_ensemble(str(path), device=device)
            members = [Path(m) for m in resolve_members(str(path))[0]]
            self.context = min(m.cfg.seq_len for m in self.model.members)
            self.device = self.model.members[0].embed.weight.device
            files = [path, *(m / "model.safetensors" for m in members)]
            first = members[0]
        else:
            self.model = load_model(path, device=device)
            assert isinstance(self.model, Transformer)
            self.context = self.model.cfg.seq_len
            self.device = self.model.embed.weight.device
            files, first = [path / "model.safetensors"], path
        self.tokenizer = Tokenizer.load(first / "tokenizer.json")
        self.name = path.stem if path.is_file() else path.name
        self.fingerprint = _fingerprint(files)
        self.dtype, self.batch_size = dtype, batch_size
        self._vocabulary: Vocabulary | None = None

    @property
    def vocabulary(self) -> Vocabulary:
        """The tokenizer as the grammar engine reads it; built at the first guided request (a few ms)."""
        if self._vocabulary is None:
            members = self.model.members if isinstance(self.model, Ensemble) else [self.model]
            self._vocabulary = Vocabulary(self.tokenizer, members[0].cfg.vocab_size)
        return self._vocabulary

    def check_schema(self, schema: str) -> None:
        self.vocabulary.matcher(schema)

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
        return chat_to_text(messages)

    def encode(self, prompt: str) -> list[int]:
        return [self.tokenizer.eos_id, *self.tokenizer.encode(prompt)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def generate_ids(self, prompts: list[list[int]], params: GenParams,
                     schemas: Sequence[str | None]) -> list[tuple[list[int], bool]]:
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        eos = self.tokenizer.eos_id
        rows = generate(self.model, prompts, max_new_tokens=params.max_tokens, temperature=params.temperature,
                        top_p=params.top_p, eos_id=eos, stop_at_eos=True,
                        generator=torch.Generator(device=self.device).manual_seed(seed),
                        batch_size=self.batch_size, dtype=self.dtype,  # type: ignore[arg-type]
                        guide=Guide(self.vocabulary, schemas) if any(s is not None for s in schemas) else None)
        return [(r[:-1], True) if r and r[-1] == eos else (r, False) for r in rows]


class HFModel(LocalModel):
    """A Hugging Face causal LM directory, through ``transformers``."""

    def __init__(self, path: Path, device: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataeffError(f"{path}: not a loadable Hugging Face causal LM ({first})") from None
        self.device = pick_device(device)
        self.model = self.model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        # Padding sits under a zero attention mask, so any id will do where the tokenizer names none.
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else min(self.eos_ids, default=0)
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or self.tokenizer.model_max_length)
        self.name = path.name
        self.fingerprint = _fingerprint(sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json")))
        if getattr(self.tokenizer, "chat_template", None):
            self.stops = ()

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return str(self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))
        return chat_to_text(messages)

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def check_schema(self, schema: str) -> None:
        raise ValueError("response_format: guided decoding is implemented for dataeff runs and ensembles, not for "
                         "Hugging Face models; send no response_format (the client still validates the answer)")

    def generate_ids(self, prompts: list[list[int]], params: GenParams,
                     schemas: Sequence[str | None]) -> list[tuple[list[int], bool]]:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        pad = self.pad
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        sample = params.temperature > 0
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=params.max_tokens, do_sample=sample,
                temperature=params.temperature if sample else None, top_p=params.top_p if sample else None,
                top_k=None, pad_token_id=pad,
            )
        rows = []
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            rows.append((row[:end], True) if end is not None else (row, False))
        return rows


def load_local(path: str, device: str = "auto", dtype: str = "auto", batch_size: int = 16) -> LocalModel:
    p = Path(path)
    if not path:
        raise DataeffError("llm.model: set the local model's path (a run directory, ensemble.json or HF model directory)")
    if p.is_dir() and (p / "ensemble.json").is_file():
        p = p / "ensemble.json"
    if p.is_file() and p.suffix == ".json":
        return DataeffModel(p, device, dtype, batch_size)
    if p.is_dir() and (p / "manifest.json").is_file():
        return DataeffModel(p, device, dtype, batch_size)
    if p.is_dir() and (p / "config.json").is_file():
        return HFModel(p, device)
    raise DataeffError(f"{p}: not a dataeff run directory (manifest.json), an ensemble.json, or a Hugging Face model "
                       f"directory (config.json)")


class Batcher:
    """Concurrent requests to one :class:`LocalModel`, decoded together in a worker thread."""

    def __init__(self, model: LocalModel, batch_size: int, max_wait: float = 0.005):
        self.model, self.batch_size, self.max_wait = model, batch_size, max_wait
        self.pending: list[tuple[list[int], GenParams, asyncio.Future[Completion]]] = []
        self.task: asyncio.Task[None] | None = None

    async def generate(self, prompt: str, params: GenParams) -> Completion:
        params.check()
        ids = self.model.encode(prompt)
        self.model.check(len(ids), params.max_tokens)
        if params.schema is not None:
            self.model.check_schema(params.schema)
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        self.pending.append((ids, params, future))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self.pending:
            await asyncio.sleep(self.max_wait)  # let requests arriving together share a batch
            # Rows of a batch share their sampling settings (the seed is the first row's); each has its schema.
            group = replace(self.pending[0][1], seed=None, schema=None)
            batch = [item for item in self.pending
                     if replace(item[1], seed=None, schema=None) == group][: self.batch_size]
            self.pending = [item for item in self.pending if not any(item is b for b in batch)]
            try:
                outs = await asyncio.to_thread(self.model.generate_batch, [b[0] for b in batch], batch[0][1],
                                               [b[1].schema for b in batch])
            except Exception as e:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(e)
            else:
                for (_, _, future), out in zip(batch, outs, strict=True):
                    if not future.done():
                        future.set_result(out)


class LocalBackend:
    """The client's ``local`` backend: chat requests answered by a :class:`LocalModel` on this machine."""

    def __init__(self, cfg: LLMConfig):
        self.cfg = cfg
        self.model = load_local(cfg.model, cfg.device, cfg.dtype, cfg.batch_size)
        self.model_id = f"local:{self.model.name}:{self.model.fingerprint}"
        self.batcher = Batcher(self.model, cfg.batch_size)

    async def complete(self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]) -> tuple[Answer, Mapping[str, str]]:
        gp = GenParams.from_mapping(params, self.cfg.max_tokens)
        gp = replace(gp, stop=gp.stop + self.model.stops)
        c = await self.batcher.generate(self.model.chat_prompt(messages), gp)
        return Answer(c.text.strip(), c.finish_reason, c.prompt_tokens, c.completion_tokens), {}

    async def aclose(self) -> None:
        return None

