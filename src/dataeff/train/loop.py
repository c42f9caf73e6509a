"""The trainer for the data-constrained regime: many epochs over a fixed token budget, heavy regularisation.

One loop serves a laptop CPU and a GPU node: under ``torchrun`` it runs data-parallel (gloo on CPUs, NCCL on
GPUs) with the same global batch, so loss curves match a single process. It resumes exactly: the data order
is a pure function of (seed, step) and checkpoints carry optimizer and RNG state, so a run killed at any
point and started again ends at the same loss as one never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from tqdm.auto import tqdm

from dataeff.config import dump_yaml, from_dict, read_yaml, to_dict
from dataeff.data.order import EpochOrder
from dataeff.data.tokens import PreparedData, prepare
from dataeff.errors import DataeffError
from dataeff.eval.loss import evaluate
from dataeff.fsutil import atomic_write_json
from dataeff.model.config import count_parameters, flops_per_token
from dataeff.model.transformer import Transformer
from dataeff.train import averaging, dist
from dataeff.train import checkpoint as ckpt
from dataeff.train.config import RunConfig, default_run_dir, run_hash, run_identity
from dataeff.train.distill import make_teacher
from dataeff.train.optim import build_optimizers, lr_multiplier
from dataeff.train.rundir import MetricsLog, manifest, mark_done, mark_failed, read_result, status


@dataclass(frozen=True)
class Plan:
    """Step arithmetic derived from the config and the data."""

    seq_len: int
    batch_seqs: int
    per_rank: int
    micro: int
    accum: int
    windows_per_epoch: int
    total_steps: int
    eval_every: int
    checkpoint_every: int


def make_plan(cfg: RunConfig, order: EpochOrder, world_size: int) -> Plan:
    t = cfg.train
    seq_len = order.seq_len
    if t.batch_tokens < seq_len:
        raise DataeffError(f"train.batch_tokens={t.batch_tokens} is smaller than one sequence (model.seq_len={seq_len})")
    batch_seqs = t.batch_tokens // seq_len
    if batch_seqs % world_size:
        raise DataeffError(f"train.batch_tokens gives {batch_seqs} sequences, not divisible by {world_size} processes")
    per_rank = batch_seqs // world_size
    micro = t.micro_batch_size or per_rank
    if per_rank % micro:
        raise DataeffError(f"train.micro_batch_size={micro} does not divide the {per_rank} sequences per process")
    if t.epochs <= 0:
        raise DataeffError(f"train.epochs={t.epochs} must be positive")
    total = max(1, round(t.epochs * order.n / batch_seqs))
    eval_every = t.eval_every or max(1, total // 10)
    return Plan(seq_len, batch_seqs, per_rank, micro, per_rank // micro, order.n, total, eval_every,
                t.checkpoint_every or eval_every)


def _prepare_on_rank0(cfg: RunConfig, info: dist.DistInfo) -> PreparedData:
    # Rank 0 builds the content-addressed store; the others then find it complete.
    if info.is_main:
        prepared = prepare(cfg.data, cfg.tokenizer, progress=cfg.train.progress)
    dist.barrier(info)
    if not info.is_main:
        prepared = prepare(cfg.data, cfg.tokenizer, progress=False)
    return prepared


def _check_run_dir(run_dir: Path, cfg: RunConfig) -> None:
    existing = run_dir / "config.yaml"
    if existing.exists():
        data, _ = read_yaml(existing)
        old = from_dict(RunConfig, data, source=str(existing))
        if run_identity(old) != run_identity(cfg):
            raise DataeffError(f"{run_dir}: holds a run with a different config; choose another run_dir")


def _reseed(seed: int, rank: int, step: int) -> None:
    """Dropout randomness restarts from (seed, rank, step) at every checkpoint, so a run resumed on any
    number of processes draws what an uninterrupted one draws; only rank 0's RNG state is in a checkpoint."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train (or resume, or return the result of) the run ``cfg`` describes. Returns its final metrics."""
    run_dir = default_run_dir(cfg)
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    if status(run_dir) == "done":
        return read_result(run_dir)
    info = dist.setup(cfg.train.device)
    try:
        return _train(cfg, run_dir, info)
    finally:
        dist.teardown(info)


def _train(cfg: RunConfig, run_dir: Path, info: dist.DistInfo) -> dict[str, Any]:
    t, device = cfg.train, info.device
    if t.threads:
        torch.set_num_threads(t.threads)
    _check_run_dir(run_dir, cfg)
    prepared = _prepare_on_rank0(cfg, info)
    train_split, val_split = prepared.split("train"), prepared.split("val")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=prepared.tokenizer.vocab_size).resolved()
    tokens, doc_offsets = train_split.tokens, train_split.doc_offsets
    if "synthetic" in prepared.splits:
        # Sequence-level distillation: the teacher's samples join the real documents as more documents.
        syn = prepared.split("synthetic")
        tokens = np.concatenate([tokens, syn.tokens])
        doc_offsets = np.concatenate([doc_offsets, syn.doc_offsets[1:] + train_split.n_tokens])
    order = EpochOrder(tokens, doc_offsets, model_cfg.seq_len, t.data_seed, t.shuffle)
    plan = make_plan(cfg, order, info.world_size)

    model = Transformer(model_cfg, init_seed=t.init_seed).to(device)
    optimizers = build_optimizers(model, cfg.optim)
    averager = averaging.RunAveraging(t, model, run_dir, plan.total_steps, metadata={"model": to_dict(model_cfg)},
                                      active=info.is_main)
    params = count_parameters(model_cfg)
    ckpt_dir = run_dir / "checkpoints"
    log = MetricsLog(run_dir / "metrics.jsonl")

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, run_dir / "config.yaml")
        if not (run_dir / "manifest.json").exists():
            atomic_write_json(run_dir / "manifest.json", manifest({
                "seeds": {"init_seed": t.init_seed, "data_seed": t.data_seed, "budget_seed": cfg.data.budget_seed,
                          "split_seed": cfg.data.split_seed},
                "config_hash": run_hash(cfg),
                "world_size": info.world_size,
                "device": str(device),
                "data_store": str(prepared.path),
                "train_tokens": train_split.n_tokens,
                "val_tokens": val_split.n_tokens,
                "params": params,
                "model": to_dict(model_cfg),
                "plan": dataclasses.asdict(plan),
            }))
            prepared.tokenizer.save(run_dir / "tokenizer.json")
    dist.barrier(info)
    teacher = None
    if cfg.distill.teachers:
        # Rank 0 alone scores the teacher into the top-k cache; the other ranks open it once it is complete.
        cached = cfg.distill.teacher_cache == "topk"
        if info.is_main or not cached:
            teacher = make_teacher(cfg.distill, run_dir, order, prepared.tokenizer, device, t.dtype, build=True,
                                   progress=t.progress and info.is_main)
        if cached:
            dist.barrier(info)
        if teacher is None:
            teacher = make_teacher(cfg.distill, run_dir, order, prepared.tokenizer, device, t.dtype, build=False)

    _reseed(t.data_seed, info.rank, 0)
    # Peak rates come from the config: a checkpoint's param groups hold the scheduled rate of its step.
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    start_step = 0
    found = ckpt.list_checkpoints(ckpt_dir)
    if found:
        start_step, _ = ckpt.load_checkpoint(found[-1][1], model, optimizers)
        averager.load(found[-1][1])
        _reseed(t.data_seed, info.rank, start_step)
        if info.is_main:
            log.rewind(start_step)

    fwd_model: torch.nn.Module = model
    if info.distributed:
        fwd_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        fwd_model = torch.compile(fwd_model)  # type: ignore[assignment]

    def evaluate_val(max_tokens: int | None) -> dict[str, float]:
        result = evaluate(model, val_split.tokens, n_bytes=val_split.n_bytes, n_words=val_split.n_words,
                          seq_len=plan.seq_len, batch_size=t.eval_batch_size, max_tokens=max_tokens, dtype=t.dtype)
        return result.to_dict("val_")

    bar = tqdm(total=plan.total_steps, initial=start_step, disable=not (info.is_main and t.progress),
               desc=run_dir.name, unit="step", dynamic_ncols=True)
    flops = flops_per_token(model_cfg)
    tokens_per_step = plan.batch_seqs * plan.seq_len
    # A run killed after its last step but before DONE resumes with no step left: its loss is in the log.
    logged = [r["train_loss"] for r in log.rows() if "train_loss" in r] if start_step else []
    last_loss = logged[-1] if logged else float("nan")
    tick, tick_step = time.perf_counter(), start_step
    model.train()
    for step in range(start_step, plan.total_steps):
        mult = lr_multiplier(step, plan.total_steps, cfg.optim)
        for opt, lrs in zip(optimizers, base_lrs, strict=True):
            for group, lr in zip(opt.param_groups, lrs, strict=True):
                group["lr"] = lr * mult
        first = step * plan.batch_seqs + info.rank * plan.per_rank
        batch = torch.from_numpy(order.samples(first, plan.per_rank)).to(device)
        ids = order.window_ids(first, plan.per_rank) if teacher is not None and teacher.cache is not None else None
        loss_sum = torch.zeros((), device=device)
        ce_sum = torch.zeros((), device=device)
        for m in range(plan.accum):
            chunk = batch[m * plan.micro : (m + 1) * plan.micro]
            sync = m == plan.accum - 1 or not info.distributed
            ctx = contextlib.nullcontext() if sync else fwd_model.no_sync()  # type: ignore[operator]
            with ctx, dist.autocast(device, t.dtype):
                if teacher is None:
                    loss = ce = fwd_model(chunk[:, :-1], chunk[:, 1:])
                else:
                    loss, ce = teacher.loss(fwd_model(chunk[:, :-1]), chunk[:, 1:], chunk[:, :-1],
                                            None if ids is None else ids[m * plan.micro : (m + 1) * plan.micro])
            (loss / plan.accum).backward()
            loss_sum += loss.detach()
            ce_sum += ce.detach()
        mean_loss = float(dist.all_reduce_mean(loss_sum / plan.accum, info))
        mean_ce = mean_loss if teacher is None else float(dist.all_reduce_mean(ce_sum / plan.accum, info))
        if not math.isfinite(mean_loss):
            kept = ckpt.list_checkpoints(ckpt_dir)
            where = f"last good checkpoint {kept[-1][1]}" if kept else "no checkpoint was written yet"
            reason = f"loss is {mean_loss} at step {step}; {where}"
            if info.is_main:
                mark_failed(run_dir, reason, step=step)
            bar.close()
            raise DataeffError(f"{run_dir}: training diverged: {reason}")
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        last_loss = mean_loss
        done_steps = step + 1
        averager.after_step(done_steps)
        bar.update(1)
        if info.is_main and (done_steps % t.log_every == 0 or done_steps == plan.total_steps):
            now = time.perf_counter()
            tok_s = (done_steps - tick_step) * tokens_per_step / max(now - tick, 1e-9)
            tick, tick_step = now, done_steps
            log.write({"step": done_steps, "epoch": done_steps * plan.batch_seqs / plan.windows_per_epoch,
                       "tokens": done_steps * tokens_per_step, "lr": cfg.optim.lr * mult, "train_loss": mean_loss,
                       **({"train_ce": mean_ce} if teacher is not None else {}),
                       "grad_norm": float(grad_norm), "tok_s": tok_s, "flops": flops * done_steps * tokens_per_step})
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tok_s:,.0f}")
        if done_steps % plan.eval_every == 0 and done_steps < plan.total_steps and info.is_main:
            log.write({"step": done_steps, **evaluate_val(t.eval_tokens)})
        if done_steps % plan.checkpoint_every == 0 and done_steps < plan.total_steps:
            if info.is_main:
                ckpt.save_checkpoint(ckpt.checkpoint_path(ckpt_dir, done_steps), model, optimizers, done_steps,
                                     extra_tensors=averager.state())
                ckpt.prune_checkpoints(ckpt_dir, t.keep_checkpoints)
            _reseed(t.data_seed, info.rank, done_steps)
            dist.barrier(info)
    bar.close()

    result: dict[str, Any] = {}
    if info.is_main:
        final = evaluate_val(t.final_eval_tokens)
        log.write({"step": plan.total_steps, **final})
        ckpt.save_checkpoint(ckpt.checkpoint_path(ckpt_dir, plan.total_steps), model, optimizers, plan.total_steps,
                             extra_tensors=averager.state())
        ckpt.prune_checkpoints(ckpt_dir, t.keep_checkpoints)
        ckpt.save_weights(run_dir / "model.safetensors", model, {"model": to_dict(model_cfg)})
        result = {
            **final,
            "train_loss": last_loss,
            "steps": plan.total_steps,
            "epochs": t.epochs,
            "tokens_seen": plan.total_steps * tokens_per_step,
            "train_tokens": train_split.n_tokens,
            "synthetic_tokens": len(order.tokens) - train_split.n_tokens,
            "params": params["total"],
            "non_embedding_params": params["non_embedding"],
            "flops": flops * plan.total_steps * tokens_per_step,
            "unigram_entropy": prepared.meta.get("unigram_entropy"),
        }
        result |= averager.finish(averaging.Heldout(val_split.tokens, val_split.n_bytes, val_split.n_words, plan.seq_len,
                                                    t.eval_batch_size, t.final_eval_tokens, t.dtype))
        mark_done(run_dir, result)
    if info.distributed:
        box = [result]
        tdist.broadcast_object_list(box, src=0)
        result = box[0]
    return result

