"""The trainer for the data-constrained regime: many epochs over a fixed token budget, heavy regularisation.

One loop serves a laptop CPU and a GPU node: under ``torchrun`` it runs data-parallel (gloo on CPUs, NCCL on
GPUs) with the same global batch, so loss curves match a single process. It resumes exactly: the data order
is a pure function of (seed, step) and checkpoints carry optimizer and RNG state, so a run killed at any
point and started again ends at the same loss as one never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from tqdm.auto import tqdm

from dataeff.config import dump_yaml, to_dict
from dataeff.data.order import EpochOrder, OnceMix, Order, ReplayMix
from dataeff.data.tokens import PreparedData, TokenSplit, prepare, synthetic_tokens, training_stream
from dataeff.errors import DataeffError
from dataeff.eval.loss import IGNORE
from dataeff.fsutil import atomic_write_json
from dataeff.model.config import ModelConfig, count_parameters, flops_per_token
from dataeff.model.transformer import Transformer
from dataeff.model.weights import save_weights_tensors
from dataeff.train import averaging, dist, init
from dataeff.train import checkpoint as ckpt
from dataeff.train.compiling import PROBE_STEPS, decide
from dataeff.train.config import RunConfig
from dataeff.train.distill import Teacher, make_teacher
from dataeff.train.identity import default_run_dir, difference, recorded_identity, run_hash, run_identity
from dataeff.train.memory import keep_freed_memory
from dataeff.train.optim import build_optimizers, lr_multiplier
from dataeff.train.rundir import MetricsLog, manifest, mark_done, mark_failed, read_result, run_lock, status
from dataeff.train.trackers import open_trackers


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
    epochs: float  # the epochs the steps actually cover (the requested ones, to the nearest whole step)


def make_plan(cfg: RunConfig, order: Order, world_size: int) -> Plan:
    t = cfg.train
    seq_len = order.seq_len
    if t.batch_tokens < seq_len:
        raise DataeffError(f"train.batch_tokens={t.batch_tokens} is smaller than one sequence (model.seq_len={seq_len})")
    if t.batch_tokens % seq_len:
        lower = t.batch_tokens // seq_len * seq_len
        raise DataeffError(f"train.batch_tokens={t.batch_tokens} is not a multiple of model.seq_len={seq_len}: "
                           f"use {lower} or {lower + seq_len}")
    batch_seqs = t.batch_tokens // seq_len
    if batch_seqs % world_size:
        raise DataeffError(f"train.batch_tokens gives {batch_seqs} sequences, not divisible by {world_size} processes")
    per_rank = batch_seqs // world_size
    micro = t.micro_batch_size or per_rank
    if per_rank % micro:
        raise DataeffError(f"train.micro_batch_size={micro} does not divide the {per_rank} sequences per process")
    if t.epochs <= 0:
        raise DataeffError(f"train.epochs={t.epochs} must be positive")
    total = round(order.total_samples(t.epochs) / batch_seqs)
    if total < 1:
        # One step would already see more than the requested epochs: training it would misreport them.
        most = int(t.epochs * order.n) * seq_len
        raise DataeffError(f"train.batch_tokens={t.batch_tokens} is one step of {batch_seqs / order.n:.3g} epochs, more "
                           f"than train.epochs={t.epochs:g} of the {order.n} training sequences; lower it to at most "
                           f"{max(most, seq_len)} or raise train.epochs")
    eval_every = t.eval_every or max(1, total // 10)
    return Plan(seq_len, batch_seqs, per_rank, micro, per_rank // micro, order.n, total, eval_every,
                t.checkpoint_every or eval_every, epochs=order.epochs_of(total * batch_seqs))


def _prepare_on_rank0(cfg: RunConfig, info: dist.DistInfo) -> PreparedData:
    # Rank 0 builds the content-addressed store; the others then find it complete.
    if info.is_main:
        prepared = prepare(cfg.data, cfg.tokenizer, progress=cfg.train.progress)
    dist.barrier(info)
    if not info.is_main:
        prepared = prepare(cfg.data, cfg.tokenizer, progress=False)
    return prepared


def _check_run_dir(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse a directory that holds a run of another config or of other data, finished or not."""
    recorded = recorded_identity(run_dir)
    if recorded is not None and recorded != run_identity(cfg):
        changed = difference(recorded, run_identity(cfg))
        state = "finished run" if status(run_dir) == "done" else "run"
        raise DataeffError(f"{run_dir}: holds a {state} of a different config ({'; '.join(changed)}); choose another "
                           "run_dir, or delete that one to retrain")


def _reseed(seed: int, rank: int, step: int) -> None:
    """Dropout randomness restarts from (seed, rank, step) at every checkpoint, so a run resumed on any
    number of processes draws what an uninterrupted one draws; only rank 0's RNG state is in a checkpoint."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train (or resume, or return the result of) the run ``cfg`` describes. Returns its final metrics.

    The run directory is locked while a process works in it: a second process on it waits, then finds the run
    finished (or refuses it, if it holds another config's run).
    """
    run_dir = default_run_dir(cfg)
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    info = dist.setup(cfg.train.device)
    try:
        with run_lock(run_dir) if info.is_main else contextlib.nullcontext():
            dist.barrier(info)
            _check_run_dir(run_dir, cfg)
            if status(run_dir) == "done":
                return _finished(run_dir) if info.is_main else read_result(run_dir)
            return _train(cfg, run_dir, info)
    finally:
        dist.teardown(info)


def _finished(run_dir: Path) -> dict[str, Any]:
    """A finished run's result; its final weights are restored from its last checkpoint if they were deleted."""
    weights = run_dir / "model.safetensors"
    if not weights.exists():
        found = ckpt.list_checkpoints(run_dir / "checkpoints")
        if not found:
            raise DataeffError(f"{run_dir}: marked DONE, but its weights and checkpoints are gone; delete its DONE "
                               "file to train it again")
        tensors, _ = ckpt.read_safetensors(found[-1][1], prefix="model.")
        save_weights_tensors(weights, {k.removeprefix("model."): v for k, v in tensors.items()},
                             {"model": json.loads((run_dir / "manifest.json").read_text())["model"]})
        print(f"dataeff: {run_dir}: restored model.safetensors from {found[-1][1].name}", file=sys.stderr)
    return read_result(run_dir)


def train_job(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Train ``cfg`` in ``out_dir``: the executor's job function for training runs."""
    return train(dataclasses.replace(cfg, run_dir=str(out_dir)))


@dataclass
class _Data:
    """What a run trains and is scored on."""

    prepared: PreparedData
    train: TokenSplit
    val: TokenSplit
    order: EpochOrder
    plan: Plan

    def heldout(self, t: Any, max_tokens: int | None) -> averaging.Heldout:
        return averaging.Heldout(self.val.tokens, self.val.n_bytes, self.val.n_words, self.plan.seq_len,
                                 t.eval_batch_size, max_tokens, t.dtype, self.val.doc_offsets, self.val.mask)


class CrossEntropy:
    """The plain language-modelling objective: the loss is the next-token cross-entropy (over the targets the
    data's mask keeps)."""

    needs_window_ids = False

    def __call__(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 window_ids: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        loss = model(inputs, targets)
        return loss, loss


def _order(cfg: RunConfig, prepared: PreparedData) -> Order:
    """The training order: the training split (with a synthetic split every epoch, or its windows each seen once
    among the real ones), and a share of sequences replaced by replay."""
    d, t, seq_len = cfg.data, cfg.train, cfg.model.seq_len
    train = prepared.split("train")
    if train.mask is not None and (t.shuffle != "padded" or d.synthetic is not None or cfg.distill.teachers):
        raise DataeffError("data.prompt_field (conditional documents) needs train.shuffle=padded, so that no window "
                           "mixes two documents, and no synthetic mix or distillation")
    tokens, doc_offsets = training_stream(prepared)
    order: Order = EpochOrder(tokens, doc_offsets, seq_len, t.data_seed, t.shuffle, mask=train.mask)
    if d.synthetic is not None and d.synthetic_schedule == "once":
        syn = prepared.split("synthetic")
        n_extra = round(synthetic_tokens(train.n_tokens, d.synthetic_share) * t.epochs / seq_len)
        order = OnceMix(order, EpochOrder(syn.tokens, syn.doc_offsets, seq_len, t.data_seed, "sequence"), n_extra,
                        t.epochs)
    if d.replay is not None:
        replay = prepared.split("replay")
        order = ReplayMix(order, EpochOrder(replay.tokens, replay.doc_offsets, seq_len, t.data_seed, "sequence"),
                          d.replay_rate, t.data_seed)
    return order


def _data(cfg: RunConfig, info: dist.DistInfo) -> _Data:
    prepared = _prepare_on_rank0(cfg, info)
    order = _order(cfg, prepared)
    return _Data(prepared, prepared.split("train"), prepared.split("val"), order, make_plan(cfg, order, info.world_size))


def check_run(cfg: RunConfig) -> Plan:
    """Everything the run would refuse, found before anything trains or is written to its directory: its data
    (the store is prepared), the step plan, the averaging steps, where its weights start, and whether the model
    fits in memory. Returns the plan."""
    data = _data(cfg, dist.DistInfo.single(dist.pick_device(cfg.train.device)))
    _validate(cfg, data)
    return data.plan


def _validate(cfg: RunConfig, data: _Data) -> None:
    t = cfg.train
    averaging.snapshot_steps(data.plan.total_steps, t.snapshots, t.snapshot_fraction)
    if not 0.0 <= t.ema < 1.0:
        raise DataeffError(f"train.ema={t.ema} must be in [0, 1): a decay per optimizer step such as 0.999 (0: off)")
    source = init.resolve(t.init_from)
    if source.kind == "scratch":
        _check_memory(dataclasses.replace(cfg.model, vocab_size=data.prepared.tokenizer.vocab_size), t.device)


def _check_memory(model_cfg: ModelConfig, device: str) -> None:
    # fp32 weights, gradients and two AdamW moments: 16 bytes a parameter before any activation.
    params = count_parameters(model_cfg)["total"]
    need = 16 * params
    have = dist.memory_bytes(dist.pick_device(device))
    if need > have:
        raise DataeffError(f"model: {params:.3g} parameters need {need / 2**30:.3g} GiB for weights, gradients and "
                           f"optimizer state; this device has {have / 2**30:.3g} GiB (make the model smaller)")


def _write_manifest(cfg: RunConfig, run_dir: Path, data: _Data, model: Transformer, info: dist.DistInfo) -> None:
    t = cfg.train
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, run_dir / "config.yaml")
    if (run_dir / "manifest.json").exists():
        return
    atomic_write_json(run_dir / "manifest.json", manifest({
        "seeds": {"init_seed": t.init_seed, "data_seed": t.data_seed, "budget_seed": cfg.data.budget_seed,
                  "split_seed": cfg.data.split_seed},
        "config_hash": run_hash(cfg),
        "identity": run_identity(cfg),
        "world_size": info.world_size,
        "device": str(info.device),
        "dtype": dist.resolve_dtype(info.device, t.dtype),
        "data_store": str(data.prepared.path),
        "train_tokens": data.train.n_tokens,
        "val_tokens": data.val.n_tokens,
        "params": count_parameters(model.cfg),
        "model": to_dict(model.cfg),
        "plan": dataclasses.asdict(data.plan),
        "init": {"from": t.init_from, "sha256": init.fingerprint(init.resolve(t.init_from))},
    }))
    data.prepared.tokenizer.save(run_dir / "tokenizer.json")


def _objective(cfg: RunConfig, run_dir: Path, data: _Data, info: dist.DistInfo) -> CrossEntropy | Teacher:
    if not cfg.distill.teachers:
        return CrossEntropy()
    t = cfg.train
    # Rank 0 alone scores the teacher into the top-k cache; the other ranks open it once it is complete.
    cached = cfg.distill.teacher_cache == "topk"
    teacher = None
    if info.is_main or not cached:
        teacher = make_teacher(cfg.distill, run_dir, data.order, data.prepared.tokenizer, info.device, t.dtype,
                               build=True, progress=t.progress and info.is_main)
    if cached:
        dist.barrier(info)
    if teacher is None:
        teacher = make_teacher(cfg.distill, run_dir, data.order, data.prepared.tokenizer, info.device, t.dtype, build=False)
    return teacher


def _resume(ckpt_dir: Path, model: Transformer, optimizers: list[torch.optim.Optimizer],
            averager: averaging.RunAveraging, log: MetricsLog, cfg: RunConfig, info: dist.DistInfo) -> int:
    """The step to continue from: the newest checkpoint that loads (model, optimizers, EMA and RNG restored),
    else 0. A checkpoint that does not load is moved aside, not deleted, and the one before it is used."""
    _reseed(cfg.train.data_seed, info.rank, 0)
    for _, path in reversed(ckpt.list_checkpoints(ckpt_dir)):
        try:
            start_step, _ = ckpt.load_checkpoint(path, model, optimizers)
            averager.load(path)
        except DataeffError as e:
            if info.is_main:
                aside = path.with_name(path.name + ".corrupt")
                path.replace(aside)
                print(f"dataeff: {e}; moved it to {aside.name} and resuming from the checkpoint before it",
                      file=sys.stderr, flush=True)
            continue
        _reseed(cfg.train.data_seed, info.rank, start_step)
        if info.is_main:
            log.rewind(start_step)
        return start_step
    if info.is_main:
        log.rewind(-1)  # no checkpoint loads: the run starts over, and rows an earlier attempt logged would repeat
    return 0


def _train(cfg: RunConfig, run_dir: Path, info: dist.DistInfo) -> dict[str, Any]:
    t, device = cfg.train, info.device
    if t.threads:
        torch.set_num_threads(t.threads)
    if device.type == "cpu":
        keep_freed_memory()  # every step's activations reuse the last step's pages instead of faulting in new ones
    data = _data(cfg, info)
    _validate(cfg, data)
    model = init.initial_model(cfg, data.prepared.tokenizer).to(device)
    optimizers = build_optimizers(model, cfg.optim)
    averager = averaging.RunAveraging(t, model, run_dir, data.plan.total_steps, metadata={"model": to_dict(model.cfg)},
                                      active=info.is_main)
    if info.is_main:
        _write_manifest(cfg, run_dir, data, model, info)
    dist.barrier(info)
    objective = _objective(cfg, run_dir, data, info)
    # Peak rates come from the config: a checkpoint's param groups hold the scheduled rate of its step.
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    trackers = open_trackers(cfg, run_dir) if info.is_main else []
    try:
        log = MetricsLog(run_dir / "metrics.jsonl", mirrors=[tr.log for tr in trackers])
        start_step = _resume(run_dir / "checkpoints", model, optimizers, averager, log, cfg, info)
        last_loss, compiled = _loop(cfg, run_dir, data, model, optimizers, base_lrs, averager, objective, log,
                                    start_step, info)
        return _finish(cfg, run_dir, data, model, optimizers, averager, log, last_loss, compiled, info)
    finally:
        for tr in trackers:
            tr.close()


def _loop(cfg: RunConfig, run_dir: Path, data: _Data, model: Transformer, optimizers: list[torch.optim.Optimizer],
          base_lrs: list[list[float]], averager: averaging.RunAveraging, objective: CrossEntropy | Teacher,
          log: MetricsLog, start_step: int, info: dist.DistInfo) -> tuple[float, bool]:
    """Every step from ``start_step`` on, with periodic logs, evaluations and checkpoints; the last train loss
    and whether the steps ran compiled (with ``train.compile=auto``, whether the last ones did)."""
    t, device, plan, order = cfg.train, info.device, data.plan, data.order
    ckpt_dir = run_dir / "checkpoints"
    distilling = not isinstance(objective, CrossEntropy)
    fwd_model: torch.nn.Module = model
    if info.distributed:
        fwd_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile is True:
        fwd_model = torch.compile(fwd_model)  # type: ignore[assignment]
    compiled, probing, probe = t.compile is True, t.compile == "auto", []
    bar = tqdm(total=plan.total_steps, initial=start_step, disable=not (info.is_main and t.progress),
               desc=run_dir.name, unit="step", dynamic_ncols=True)
    flops = flops_per_token(model.cfg)
    tokens_per_step = plan.batch_seqs * plan.seq_len
    # A run killed after its last step but before DONE resumes with no step left: its loss is in the log.
    logged = [r["train_loss"] for r in log.rows() if "train_loss" in r] if start_step else []
    last_loss = logged[-1] if logged else float("nan")
    tick, tick_step = time.perf_counter(), start_step
    model.train()
    for step in range(start_step, plan.total_steps):
        step_start = time.perf_counter()
        mult = lr_multiplier(step, plan.total_steps, cfg.optim)
        for opt, lrs in zip(optimizers, base_lrs, strict=True):
            for group, lr in zip(opt.param_groups, lrs, strict=True):
                group["lr"] = lr * mult
        first = step * plan.batch_seqs + info.rank * plan.per_rank
        batch = torch.from_numpy(order.samples(first, plan.per_rank)).to(device)
        targets = batch[:, 1:]
        masks = order.target_masks(first, plan.per_rank)
        if masks is not None:
            targets = targets.masked_fill(~torch.from_numpy(masks).to(device), IGNORE)
        ids = order.window_ids(first, plan.per_rank) if objective.needs_window_ids else None
        loss_sum = torch.zeros((), device=device)
        ce_sum = torch.zeros((), device=device)
        for m in range(plan.accum):
            part = slice(m * plan.micro, (m + 1) * plan.micro)
            sync = m == plan.accum - 1 or not info.distributed
            ctx = contextlib.nullcontext() if sync else fwd_model.no_sync()  # type: ignore[operator]
            with ctx, dist.autocast(device, t.dtype):
                loss, ce = objective(fwd_model, batch[part, :-1], targets[part], None if ids is None else ids[part])
            (loss / plan.accum).backward()
            loss_sum += loss.detach()
            ce_sum += ce.detach()
        mean_loss = float(dist.all_reduce_mean(loss_sum / plan.accum, info))
        mean_ce = float(dist.all_reduce_mean(ce_sum / plan.accum, info)) if distilling else mean_loss
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
        if probing and step > start_step:
            probe.append(time.perf_counter() - step_start)
            if len(probe) == PROBE_STEPS:
                probing = False
                # Every rank decides on the same (mean) time, so under DDP all compile or none does.
                seconds = float(dist.all_reduce_mean(torch.tensor(float(np.median(probe)), device=device), info))
                decision = decide(plan.total_steps - done_steps, seconds, model.cfg.n_layers)
                if decision.compile:
                    fwd_model = torch.compile(fwd_model)  # type: ignore[assignment]
                    compiled = True
                if info.is_main and t.progress:
                    bar.write(decision.reason, file=sys.stderr)
        averager.after_step(done_steps)
        bar.update(1)
        if info.is_main and (done_steps % t.log_every == 0 or done_steps == plan.total_steps):
            now = time.perf_counter()
            tok_s = (done_steps - tick_step) * tokens_per_step / max(now - tick, 1e-9)
            tick, tick_step = now, done_steps
            log.write({"step": done_steps, "epoch": done_steps * plan.batch_seqs / plan.windows_per_epoch,
                       "tokens": done_steps * tokens_per_step, "lr": cfg.optim.lr * mult, "train_loss": mean_loss,
                       **({"train_ce": mean_ce} if distilling else {}),
                       "grad_norm": float(grad_norm), "tok_s": tok_s, "flops": flops * done_steps * tokens_per_step})
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tok_s:,.0f}")
        if done_steps % plan.eval_every == 0 and done_steps < plan.total_steps and info.is_main:
            log.write({"step": done_steps, **data.heldout(t, t.eval_tokens).score(model).to_dict("val_")})
        if done_steps % plan.checkpoint_every == 0 and done_steps < plan.total_steps:
            if info.is_main:
                ckpt.save_checkpoint(ckpt.checkpoint_path(ckpt_dir, done_steps), model, optimizers, done_steps,
                                     extra_tensors=averager.state())
                ckpt.prune_checkpoints(ckpt_dir, t.keep_checkpoints)
            _reseed(t.data_seed, info.rank, done_steps)
            dist.barrier(info)
    bar.close()
    return last_loss, compiled


def _finish(cfg: RunConfig, run_dir: Path, data: _Data, model: Transformer, optimizers: list[torch.optim.Optimizer],
            averager: averaging.RunAveraging, log: MetricsLog, last_loss: float, compiled: bool,
            info: dist.DistInfo) -> dict[str, Any]:
    """The final checkpoint, evaluation and weights, the averaged models, and DONE; the result on every rank.

    The final checkpoint comes first, so a failure after it leaves a run that resumes with no step to retrain;
    the failure is written as FAILED with its reason.
    """
    t, plan = cfg.train, data.plan
    ckpt_dir = run_dir / "checkpoints"
    result: dict[str, Any] = {}
    if info.is_main:
        try:
            final_ckpt = ckpt.checkpoint_path(ckpt_dir, plan.total_steps)
            if not final_ckpt.exists():
                ckpt.save_checkpoint(final_ckpt, model, optimizers, plan.total_steps, extra_tensors=averager.state())
                ckpt.prune_checkpoints(ckpt_dir, t.keep_checkpoints)
            final = data.heldout(t, t.final_eval_tokens).score(model).to_dict("val_")
            log.drop_evaluation(plan.total_steps)  # a finish that failed before may have logged it already
            log.write({"step": plan.total_steps, **final})
            ckpt.save_weights(run_dir / "model.safetensors", model, {"model": to_dict(model.cfg)})
            result = _result(cfg, data, model, final, last_loss) | {"compiled": compiled}
            result |= averager.finish(data.heldout(t, t.final_eval_tokens))
            mark_done(run_dir, result)
        except Exception as e:
            mark_failed(run_dir, f"after the last step: {e}", step=plan.total_steps)
            raise
    if info.distributed:
        box = [result]
        tdist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def _synthetic_seen(data: _Data) -> int:
    """Synthetic tokens the run trained on per epoch (joined to every epoch) or in all (each seen once)."""
    order = data.order.main if isinstance(data.order, ReplayMix) else data.order
    if isinstance(order, OnceMix):
        return order.n_extra * data.plan.seq_len
    return len(order.tokens) - data.train.n_tokens


def _result(cfg: RunConfig, data: _Data, model: Transformer, final: dict[str, float], last_loss: float) -> dict[str, Any]:
    plan = data.plan
    tokens_per_step = plan.batch_seqs * plan.seq_len
    params = count_parameters(model.cfg)
    return {
        **final,
        "train_loss": last_loss,
        "steps": plan.total_steps,
        "epochs": plan.epochs,
        "epochs_requested": cfg.train.epochs,
        "tokens_seen": plan.total_steps * tokens_per_step,
        "train_tokens": data.train.n_tokens,
        "synthetic_tokens": _synthetic_seen(data),
        "params": params["total"],
        "non_embedding_params": params["non_embedding"],
        "flops": flops_per_token(model.cfg) * plan.total_steps * tokens_per_step,
        "unigram_entropy": data.prepared.meta.get("unigram_entropy"),
    }
