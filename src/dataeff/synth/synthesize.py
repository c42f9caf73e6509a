"""``dataeff synthesize``: SBP's synthetic corpus, sampled from the synthesizer conditioned on seed documents.

Seeds are drawn uniformly from the world's documents: the draws are ``samples_per_seed`` seeded permutations of
the documents one after the other, so every document is a seed once before any is a seed twice, and none more
than ``samples_per_seed`` times. Each draw gives one sample of d2 ~ p(· | d1) from the KV-cached sampler
(:func:`dataeff.generate.sample.generate`), the seed cut to the prompt share of the context it was trained
with (:func:`dataeff.synth.synthesizer.side_budgets`), then an end-of-document token. A sample ends at its end token or at ``max_tokens``; with ``slide`` it may run past
the context with a sliding window.

Work goes in shards of ``shard_size`` draws, each a pure function of the config and its index (its own
sampling seed), written atomically as ``shard_XXXXX.jsonl`` with its counts in ``shard_XXXXX.json``, so a
killed job resumes from its finished shards. A shard's samples are deduplicated (exact, and MinHash candidates
confirmed by true Jaccard: :class:`dataeff.synth.dedup.NearDup`) against the world's documents, against the
samples kept by earlier shards and among themselves; only the kept ones are written. Shards are added until
the kept samples hold ``tokens`` tokens (end tokens included), then ``synthetic.jsonl`` is written, one record
``{"text": d2, "seed": seed document index, "seed_text": seed}`` per sample, which a run reads through
``data.synthetic``. ``synthesize.json`` holds the identity and the counts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from dataeff.config import option, section, to_dict
from dataeff.data.corpora import file_sha256
from dataeff.data.tokenizer import Tokenizer
from dataeff.data.tokens import TokenSplit, load_prepared
from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_write_json, atomic_write_text
from dataeff.generate.sample import generate
from dataeff.synth.dedup import NearDup, NearDupConfig
from dataeff.synth.embed import document_text
from dataeff.synth.synthesizer import check_tokenizer, side_budgets
from dataeff.train.dist import pick_device
from dataeff.train.rundir import load_model

OUTPUT = "synthetic.jsonl"
SUMMARY = "synthesize.json"
PLAN = "plan.json"


@dataclass
class SynthesizeConfig:
    synthesizer: str = option("", "the synthesizer's run directory (`dataeff synthesizer`)")
    store: str = option("", "the world's token store directory: its documents are the seeds")
    split: str = option("train", "the store's split the seeds are drawn from")
    tokens: int = option(0, "synthetic tokens to produce (end-of-document tokens included), after dedup", min=0)
    samples_per_seed: int = option(1, "samples drawn for each seed document at most (the world is gone through "
                                      "once per round before any seed repeats)", min=1)
    prompt_share: float = option(0.5, "share of the context the seed may fill, as the synthesizer was trained",
                                 above=0.0, below=1.0)
    max_tokens: int | None = option(None, "tokens per sample at most (default: the d2 share of the context it was "
                                          "trained on); above that, set slide", min=1)
    slide: bool = option(False, "let samples run past the context with a sliding window")
    temperature: float = option(1.0, "sampling temperature", min=0.0)
    top_p: float = option(1.0, "nucleus sampling: the most likely tokens holding this much probability",
                          above=0.0, max=1.0)
    top_k: int = option(0, "sample among the k most likely tokens only (0: all)", min=0)
    batch_size: int = option(64, "sequences decoded together", min=1)
    shard_size: int = option(1024, "samples per shard, the unit of resumption", min=1)
    seed: int = option(0, "seed of the seed order and of the sampling", min=0)
    dedup: NearDupConfig = section(NearDupConfig, "near-duplicate removal against the world and within the samples")
    seed_text: bool = option(True, "write each sample's seed text (seed_text) beside its index, for "
                                   "`dataeff quality`'s pair metrics")
    device: str = option("auto", "auto, cpu, cuda or mps")
    dtype: Literal["auto", "bf16", "fp32"] = option("auto", "bf16 (autocast), fp32, or auto: bf16 where the device computes it natively, else fp32")
    out: str = option("synthetic", "output directory")
    progress: bool = option(True, "show a progress bar")


def _identity(cfg: SynthesizeConfig) -> dict[str, Any]:
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "progress", "device", "batch_size",
                                                                      "synthesizer", "store")}
    run = Path(cfg.synthesizer)
    return {"synthesizer": {"path": str(run.resolve()), "weights_sha256": file_sha256(run / "model.safetensors")},
            "store": load_prepared(cfg.store).path.name, **settings}


def capacity(n_seeds: int, samples_per_seed: int, max_tokens: int) -> int:
    """The most tokens the seeds can give: every sample at its longest, with its end token."""
    return n_seeds * samples_per_seed * (max_tokens + 1)


def _seed_ids(split: TokenSplit, doc: int, eos: int, budget: int) -> list[int]:
    ids = split.tokens[split.doc_offsets[doc] : split.doc_offsets[doc + 1]].tolist()
    if ids and ids[-1] == eos:
        ids = ids[:-1]
    return [*ids[:budget], eos]


class _Plan:
    """What every shard needs: the seeds' order, the world's texts, the sampler's settings."""

    def __init__(self, cfg: SynthesizeConfig):
        if not cfg.synthesizer or not cfg.store:
            raise DataeffError("synthesize: set synthesizer=<synthesizer run dir> and store=<world token store>")
        if cfg.tokens < 1:
            raise DataeffError("synthesize.tokens: set the synthetic tokens to produce (at least 1)")
        self.cfg = cfg
        self.prepared = load_prepared(cfg.store)
        if cfg.split not in self.prepared.splits:
            raise DataeffError(f"synthesize.split={cfg.split!r}: not a split of {self.prepared.path} (has "
                               f"{', '.join(self.prepared.splits)})")
        self.split = self.prepared.split(cfg.split)
        check_tokenizer(cfg.synthesizer, self.prepared.tokenizer, "synthesize.synthesizer")
        self.tokenizer: Tokenizer = self.prepared.tokenizer
        seq_len = int(json.loads((Path(cfg.synthesizer) / "manifest.json").read_text(encoding="utf-8"))["model"]["seq_len"])
        self.prompt_budget, text_budget = side_budgets(seq_len, cfg.prompt_share)
        self.max_tokens = cfg.max_tokens or text_budget
        if not cfg.slide and self.prompt_budget + 1 + self.max_tokens - 1 > seq_len:
            raise DataeffError(f"synthesize.max_tokens={self.max_tokens}: with a seed of up to {self.prompt_budget + 1} "
                               f"tokens it exceeds the synthesizer's context of {seq_len}; set slide=true")
        n = self.split.n_docs
        most = capacity(n, cfg.samples_per_seed, self.max_tokens)
        if cfg.tokens > most:
            raise DataeffError(f"synthesize.tokens={cfg.tokens} is more than the {n} seed documents of "
                               f"{self.prepared.path.name}/{cfg.split} can give: {n} × samples_per_seed="
                               f"{cfg.samples_per_seed} × at most {self.max_tokens + 1} tokens = {most}; raise "
                               "samples_per_seed or max_tokens (with slide), or use a larger world")
        rng = np.random.default_rng([cfg.seed, 0x5B9])
        self.order = np.concatenate([rng.permutation(n) for _ in range(cfg.samples_per_seed)])
        self.n_shards = -(-len(self.order) // cfg.shard_size)

    def seeds(self, shard: int) -> np.ndarray:
        """The seed document of each draw of the shard."""
        return self.order[shard * self.cfg.shard_size : (shard + 1) * self.cfg.shard_size]

    def world_texts(self) -> list[str]:
        return [document_text(self.split, self.tokenizer, d) for d in range(self.split.n_docs)]


def _sample_shard(plan: _Plan, shard: int, model: Any) -> list[dict[str, Any]]:
    """The shard's samples before dedup: one record per (seed, sample) that is not empty."""
    cfg, tok = plan.cfg, plan.tokenizer
    seeds = [int(d) for d in plan.seeds(shard)]
    prompts = [_seed_ids(plan.split, d, tok.eos_id, plan.prompt_budget) for d in seeds]
    device = model.embed.weight.device
    # Each shard samples from its own stream, so a resumed job gives what an uninterrupted one does.
    state = int(np.random.SeedSequence([cfg.seed, shard]).generate_state(1)[0])
    outs = generate(model, prompts, max_new_tokens=plan.max_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                    top_p=cfg.top_p, eos_id=tok.eos_id, generator=torch.Generator(device=device).manual_seed(state),
                    batch_size=cfg.batch_size, dtype=cfg.dtype, slide=cfg.slide)
    rows = []
    for d, tokens in zip(seeds, outs, strict=True):
        kept = tokens[:-1] if tokens and tokens[-1] == tok.eos_id else tokens
        text = tok.decode(kept).strip()
        if text:
            rows.append({"text": text, "seed": d, "tokens": len(kept) + 1})
    return rows


def _shard_paths(out: Path, shard: int) -> tuple[Path, Path]:
    return out / f"shard_{shard:05d}.jsonl", out / f"shard_{shard:05d}.json"


def _read_shard(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _check_plan(out: Path, ident: dict[str, Any]) -> None:
    path = out / PLAN
    if path.exists():
        found = json.loads(path.read_text(encoding="utf-8"))
        if found != ident:
            changed = sorted(k for k in set(found) | set(ident) if found.get(k) != ident.get(k))
            raise DataeffError(f"synthesize: {out} holds samples of another synthesizer, world or settings "
                               f"({', '.join(changed)} differ); set out elsewhere or delete it")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, ident)


def synthesize(cfg: SynthesizeConfig) -> dict[str, Any]:
    """Sample, deduplicate and write shards until the target is met, then ``synthetic.jsonl``; return the
    summary that ``synthesize.json`` holds."""
    out = Path(cfg.out)
    plan = _Plan(cfg)
    ident = _identity(cfg)
    _check_plan(out, ident)
    if (out / SUMMARY).exists():
        return json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    world = plan.world_texts()
    dedup = NearDup(cfg.dedup)
    model = None
    kept: list[dict[str, Any]] = []
    counts = {"sampled": 0, "empty": 0, "exact": 0, "near": 0, "world": 0}
    have = shard = 0
    with tqdm(total=cfg.tokens, desc="synthesize", unit="tok", disable=not cfg.progress) as bar:
        while have < cfg.tokens and shard < plan.n_shards:
            rows_path, info_path = _shard_paths(out, shard)
            if rows_path.exists() and info_path.exists():
                rows = _read_shard(rows_path)
                info = json.loads(info_path.read_text(encoding="utf-8"))
            else:
                if model is None:
                    model = load_model(cfg.synthesizer, device=str(pick_device(cfg.device)))
                sampled = _sample_shard(plan, shard, model)
                texts = [r["text"] for r in sampled]
                found = dedup.find(texts, against=[*world, *(r["text"] for r in kept)], progress=False)
                rows = [sampled[i] for i in found.keep]
                info = {"sampled": len(plan.seeds(shard)), "empty": len(plan.seeds(shard)) - len(sampled),
                        "exact": found.exact,
                        "near": found.near, "world": found.against, "kept": len(rows),
                        "tokens": sum(r["tokens"] for r in rows)}
                atomic_write_text(rows_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                atomic_write_json(info_path, info)  # last: its existence marks the shard finished
            for key in counts:
                counts[key] += int(info[key])
            kept.extend(rows)
            have += int(info["tokens"])
            bar.update(int(info["tokens"]))
            shard += 1
    if have < cfg.tokens:
        raise DataeffError(f"synthesize: {cfg.samples_per_seed} samples of each of the {plan.split.n_docs} seeds gave {have} of the {cfg.tokens} tokens asked "
                           f"for after dedup ({counts['empty']} empty samples, {counts['exact']} exact and "
                           f"{counts['near']} near duplicates, {counts['world']} copies of world documents); raise "
                           "samples_per_seed or lower tokens")
    lines = []
    for r in kept:
        record = {"text": r["text"], "seed": r["seed"]}
        if cfg.seed_text:
            record["seed_text"] = world[r["seed"]]
        lines.append(json.dumps(record, ensure_ascii=False))
    summary = {"identity": ident, "file": str(out / OUTPUT), "documents": len(kept), "tokens": have,
               "shards": shard, "seeds": len(np.unique(plan.order[: shard * cfg.shard_size])), **counts,
               "max_tokens": plan.max_tokens, "prompt_tokens": plan.prompt_budget}
    atomic_write_text(out / OUTPUT, "\n".join(lines) + "\n")
    atomic_write_json(out / SUMMARY, summary)
    return summary


def synthesize_job(cfg: SynthesizeConfig, out_dir: Path) -> dict[str, Any]:
    """The executor's job: :func:`synthesize` into ``out_dir``."""
    return synthesize(dataclasses.replace(cfg, out=str(out_dir), progress=False))
