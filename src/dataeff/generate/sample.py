"""Sampling from a trained run or an ensemble of runs: for reading what a model learned, and for
sequence-level distillation, where a student trains on documents sampled from a teacher (ensemble).

Decoding is batched and KV-cached, through the model's own incremental path
(:meth:`~dataeff.model.transformer.Transformer.prefill` and ``decode_step`` on a preallocated cache). The model
keeps one position counter per cache, so rows of a batch must
share their prompt length: prompts are grouped by length and each group decodes as its own batches. An
ensemble keeps one cache per member and samples each token from the members' combined distribution
(:func:`dataeff.ensemble.combine_log_probs`, the probability mixture by default).

By default a prompt plus its new tokens must fit the model's context of ``seq_len`` tokens, and a longer
request is refused, never truncated. With ``slide=True`` generation goes on past the context with a sliding
window: the model always sees a window of at most ``seq_len`` tokens that starts at position 0, as in
training; when the next prediction would need ``seq_len + 1`` tokens, the window drops its oldest tokens and
keeps the newest :func:`slide_keep` (three quarters of the context), whose cache is rebuilt by one prefill.
A prompt longer than the context starts from its last ``slide_keep`` tokens. Rebuilding every quarter of a
context, rather than at every token, keeps the cost of a step near that of plain decoding while every
prediction still sees at least three quarters of a context of the text before it.

``dtype="bf16"`` computes as ``torch.autocast`` does in training and evaluation: bf16 matmuls, an fp32
residual stream, fp32 RoPE, softmax and log-probabilities.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from dataeff.config import option
from dataeff.data.tokenizer import Tokenizer
from dataeff.errors import DataeffError
from dataeff.eval.ensemble import Combine, Ensemble, combine_log_probs, load_ensemble
from dataeff.fsutil import atomic_path
from dataeff.model.transformer import StepWeights, Transformer
from dataeff.train.dist import resolve_dtype
from dataeff.train.rundir import load_model

if TYPE_CHECKING:
    from dataeff.generate.guided import Guide, RowMasks

Dtype = Literal["auto", "bf16", "fp32"]


@dataclass
class SampleConfig:
    run_dir: str = option("", "the run directory to sample from (or members, for an ensemble)")
    members: list[str] = option([], "run directories of an ensemble to sample from, or one ensemble.json, instead of run_dir")
    combine: Combine | None = option(None, "how ensemble members combine per token: prob or logit averaging "
                                           "(default: an ensemble.json's mode, else prob)")
    prompts: list[str] = option([""], "prompts; each starts a new document, and an empty one samples unconditionally")
    prompt_file: str | None = option(None, "read prompts from this file instead, one per line")
    max_tokens: int | None = option(None, "new tokens per sample at most; with the prompt they must fit the model's "
                                          "context unless slide is on (default: as many as fit after the longest "
                                          "prompt; with slide, one context's worth)")
    slide: bool = option(False, "generate past the model's context with a sliding window (the newest three "
                                "quarters of a context are kept when it slides)")
    temperature: float = option(1.0, "softmax temperature; 0 is greedy decoding")
    top_k: int = option(0, "sample among the k most likely tokens only (0: all)")
    top_p: float = option(1.0, "sample among the most likely tokens holding this much probability (1: all)")
    num_samples: int = option(1, "samples per prompt")
    batch_size: int = option(16, "sequences decoded together")
    seed: int = option(0, "sampling seed: the same seed and settings give the same samples", min=0)
    stop_at_eos: bool = option(True, "end a sample at the end-of-document token")
    dtype: Dtype = option("auto", "bf16 (autocast), fp32, or auto: bf16 where the device computes it natively, else fp32")
    device: str = option("auto", "auto, cpu, cuda or mps")
    out: str | None = option(None, "write the samples to this JSONL file (written atomically)")

    def __post_init__(self) -> None:
        _check_sampling("sample.", self.temperature, self.top_k, self.top_p)
        for name in ("max_tokens", "num_samples", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise DataeffError(f"sample.{name}: {getattr(self, name)} must be at least 1")


def _check_sampling(prefix: str, temperature: float, top_k: int, top_p: float) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise DataeffError(f"{prefix}temperature: {temperature} must be a number >= 0 (0 is greedy)")
    if top_k < 0:
        raise DataeffError(f"{prefix}top_k: {top_k} must be >= 0 (0 turns it off)")
    if not 0 < top_p <= 1:
        raise DataeffError(f"{prefix}top_p: {top_p} must be in (0, 1] (1 turns it off)")


def _next_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``(batch, V)`` logits or log-probabilities; temperature, then top-k, then top-p
    (HF's order)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits / temperature if temperature != 1 else logits
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1:
        ranked, order = scores.sort(dim=-1, descending=True)
        probs = ranked.softmax(dim=-1)
        # Keep the smallest head of the ranking holding top_p; the most likely token always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        scores = scores.scatter(-1, order, ranked.masked_fill(drop, -math.inf))
    # Inverse-CDF sampling with one uniform per row: torch.multinomial draws one exponential per vocabulary
    # entry, ~10x slower here. Zero-probability tokens add no CDF mass, so a strict search never lands on one.
    cdf = scores.softmax(dim=-1).cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=generator.device).to(total.device)
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def slide_keep(seq_len: int) -> int:
    """Tokens a sliding window keeps when it slides: the newest three quarters of a context of ``seq_len``."""
    return max(1, seq_len - max(1, seq_len // 4))


def generate(
    model: Transformer | Ensemble,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    stop_at_eos: bool = True,
    generator: torch.Generator,
    batch_size: int = 16,
    dtype: Dtype = "fp32",
    slide: bool = False,
    guide: Guide | None = None,
) -> list[list[int]]:
    """The new tokens for each prompt (non-empty token lists), in order.

    A row that samples ``eos_id`` (with ``stop_at_eos``) ends with it; the others run to ``max_new_tokens``.
    Rows are sampled from one ``generator``, so results depend on the seed, the settings and the batching,
    and on nothing else. Dropout is off while sampling. ``slide=True`` generates past the model's context
    with a sliding window (see the module docstring); without it a request that does not fit is refused.
    ``guide`` constrains the prompts it holds a schema for to answers matching it
    (:mod:`dataeff.generate.guided`), masking row by row; the other rows sample as without it.
    """
    _check_sampling("generate: ", temperature, top_k, top_p)
    if max_new_tokens < 1 or batch_size < 1:
        raise DataeffError(f"generate: max_new_tokens={max_new_tokens} and batch_size={batch_size} must be at least 1")
    members = model.members if isinstance(model, Ensemble) else [model]
    vocab = members[0].cfg.vocab_size
    seq_len = min(m.cfg.seq_len for m in members)
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise DataeffError(f"generate: prompt {i} is empty; start it with the end-of-document token")
        if not all(0 <= t < vocab for t in ids):
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise DataeffError(f"generate: prompt {i} has token id {bad}, outside the vocabulary of {vocab}")
        if not slide and len(ids) + max_new_tokens - 1 > seq_len:
            raise DataeffError(f"generate: a prompt of {len(ids)} tokens plus {max_new_tokens} new tokens exceeds "
                               f"the model's context of {seq_len} tokens (slide=True generates past it)")
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompt_ids):
        by_length.setdefault(len(ids), []).append(i)
    stop = eos_id if stop_at_eos else None
    results: list[list[int]] = [[] for _ in prompt_ids]
    device = members[0].embed.weight.device
    modes = [m.training for m in members]
    try:
        for m in members:
            m.eval()
        with torch.inference_mode():
            compute = resolve_dtype(device, dtype)
            weights = [m.step_weights(compute, min(batch_size, len(prompt_ids))) for m in members]
            for rows in by_length.values():
                for start in range(0, len(rows), batch_size):
                    chunk = rows[start : start + batch_size]
                    prompts = torch.tensor([list(prompt_ids[i]) for i in chunk], dtype=torch.long, device=device)
                    new = _decode(members, weights, model, prompts, max_new_tokens, stop,
                                  lambda scores: _next_tokens(scores, temperature, top_k, top_p, generator),
                                  seq_len if slide else None, guide.rows(chunk) if guide is not None else None)
                    for i, tokens in zip(chunk, new, strict=True):
                        results[i] = tokens
    finally:
        for m, mode in zip(members, modes, strict=True):
            m.train(mode)
    return results


def _decode(members: list[Transformer], weights: list[StepWeights], model: Transformer | Ensemble,
            prompts: torch.Tensor, max_new_tokens: int, stop: int | None, pick: Callable[[torch.Tensor], torch.Tensor],
            window: int | None, masks: RowMasks | None = None) -> list[list[int]]:
    """New tokens per row; ``window`` (the context, when sliding) bounds the tokens the model sees at once;
    ``masks`` forbids, per row, the tokens its grammar does not allow."""
    b, length = prompts.shape
    keep = slide_keep(window) if window is not None else 0
    cache_len = window if window is not None else length + max_new_tokens - 1
    context = prompts if window is None or length <= window else prompts[:, -keep:]
    caches = [m.new_cache(b, cache_len, w) for m, w in zip(members, weights, strict=True)]
    logits = [m.prefill(context, c) for m, c in zip(members, caches, strict=True)]
    seen = context.shape[1]  # tokens in the caches
    out = torch.empty(b, max_new_tokens, dtype=torch.long, device=prompts.device)
    done = torch.zeros(b, dtype=torch.bool, device=prompts.device)
    n = max_new_tokens
    for i in range(max_new_tokens):
        if isinstance(model, Ensemble):
            scores = combine_log_probs([F.log_softmax(x, dim=-1) for x in logits], model.mode, model.weights)
        else:
            scores = logits[0]
        if masks is None:
            tokens = pick(scores)
        else:
            tokens = pick(masks.apply(scores))
            masks.advance(tokens)
        out[:, i] = tokens
        if stop is not None:
            done |= tokens == stop
            if bool(done.all()):
                n = i + 1
                break
        if i + 1 >= max_new_tokens:
            continue
        if seen == window:
            # The window is full: it slides, and one prefill rebuilds the caches from its newest tokens.
            recent = torch.cat([prompts, out[:, : i + 1]], dim=1)[:, -keep:]
            for c in caches:
                c.reset()
            logits = [m.prefill(recent, c) for m, c in zip(members, caches, strict=True)]
            seen = keep
        else:
            logits = [m.decode_step(tokens, c) for m, c in zip(members, caches, strict=True)]
            seen += 1
    rows = out[:, :n].tolist()
    if stop is None:
        return rows
    # Finished rows kept decoding alongside the others; their tokens after the stop are dropped here.
    return [row[: row.index(stop) + 1] if stop in row else row for row in rows]


def _prompts(cfg: SampleConfig) -> list[str]:
    if cfg.prompt_file is None:
        return list(cfg.prompts)
    path = Path(cfg.prompt_file)
    if not path.is_file():
        raise DataeffError(f"sample.prompt_file: {path}: no such file")
    return path.read_text(encoding="utf-8").splitlines()


def sample(cfg: SampleConfig) -> list[dict[str, Any]]:
    """Rows ``{prompt, completion, tokens, stopped_at_eos}``, ``num_samples`` per prompt in prompt order.

    ``tokens`` are the completion's ids without the end-of-document token that stopped it. Every prompt is
    encoded after an end-of-document token, as every document but a corpus's first follows one in training.
    """
    if bool(cfg.run_dir) == bool(cfg.members):
        raise DataeffError("sample: set run_dir (one model) or members (an ensemble), e.g. `dataeff sample runs/abc`")
    model: Transformer | Ensemble
    if cfg.members:
        model = load_ensemble(cfg.members, cfg.combine, device=cfg.device)
        device = model.members[0].embed.weight.device
        source = model.names[0]
    else:
        model = load_model(cfg.run_dir, device=cfg.device)
        device = model.embed.weight.device
        source = cfg.run_dir
    tokenizer = Tokenizer.load(Path(source) / "tokenizer.json")
    prompts = [p for p in _prompts(cfg) for _ in range(cfg.num_samples)]
    eos = tokenizer.eos_id
    encoded = [[eos, *tokenizer.encode(p)] for p in prompts]
    max_new = cfg.max_tokens
    if max_new is None and cfg.slide:
        max_new = model.seq_len
    if max_new is None:
        longest = max(map(len, encoded))
        max_new = model.seq_len - longest
        if max_new < 1:
            raise DataeffError(f"sample: a prompt of {longest} tokens fills the model's context of {model.seq_len}")
    outputs = generate(
        model, encoded,
        max_new_tokens=max_new, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, eos_id=eos,
        stop_at_eos=cfg.stop_at_eos, generator=torch.Generator(device=device).manual_seed(cfg.seed),
        batch_size=cfg.batch_size, dtype=cfg.dtype, slide=cfg.slide,
    )
    rows = []
    for prompt, tokens in zip(prompts, outputs, strict=True):
        stopped = cfg.stop_at_eos and tokens[-1] == eos
        kept = tokens[:-1] if stopped else tokens
        rows.append({"prompt": prompt, "completion": tokenizer.decode(kept), "tokens": kept, "stopped_at_eos": stopped})
    if cfg.out:
        with atomic_path(cfg.out) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows
