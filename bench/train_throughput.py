"""Training throughput: dataeff's trainer vs a plain fp32 PyTorch loop vs HF LlamaForCausalLM, same shape.

All of them train the same ~10M-parameter Llama shape with AdamW on the same batches in one process. The rows
are interleaved (A, B, C, D, A, B, C, D, ...) so that a burst of load from other processes hits them alike,
and each row's median over the repeats is reported with its spread (min-max, and as a share of the median).
Prints tokens/s for each, the ratios of the medians, MFU against the bf16 matmul peak measured in the same
run, and the loss curves side by side (speed must not cost quality). The last line is one JSON object:
dataeff_tok_s, reference_tok_s, hf_tok_s, dataeff_compile_tok_s (medians), their spreads, mfu, params.

    python bench/train_throughput.py            # ~10M parameters, a few minutes
    python bench/train_throughput.py --quick    # 3 repeats of short runs: a few minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dataeff.config import from_dict
from dataeff.fsutil import read_jsonl
from dataeff.hf import to_hf
from dataeff.model import ModelConfig, Transformer, count_parameters, flops_per_token
from dataeff.order import EpochOrder
from dataeff.tokens import prepare
from dataeff.train import OptimConfig, RunConfig, lr_multiplier, train


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of a large square matmul: the ceiling MFU is measured against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def write_corpus(path: Path, n_docs: int, seed: int = 0) -> None:
    """A synthetic corpus with Zipfian words, so the bench needs no data directory."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(3000)]
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    docs = [" ".join(rng.choice(words, size=rng.integers(100, 400), p=p)) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs), encoding="utf-8")


def median(values: list[float]) -> float:
    return float(np.median(values))


def spread(values: list[float]) -> float:
    """(max - min) / median: how far apart the repeats of a row landed."""
    return (max(values) - min(values)) / median(values)


def run_dataeff(cfg: RunConfig, warmup: int) -> tuple[float, list[float]]:
    train(cfg)
    rows = [r for r in read_jsonl(Path(cfg.run_dir) / "metrics.jsonl") if "train_loss" in r]  # type: ignore[arg-type]
    losses = [r["train_loss"] for r in rows]
    timed = rows[warmup:]
    return float(np.mean([r["tok_s"] for r in timed])), losses


def run_plain(model: torch.nn.Module, batches: list[torch.Tensor], warmup: int, schedule: OptimConfig, *, hf: bool,
              bf16: bool) -> tuple[float, list[float]]:
    """A nanoGPT-style loop: forward, backward, clip, AdamW step; timed after ``warmup`` steps."""
    lr = schedule.lr
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=bf16)
    losses, start = [], 0.0
    tokens = 0
    for i, batch in enumerate(batches):
        if i == warmup:
            start, tokens = time.perf_counter(), 0
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if hf:
                logits = model(input_ids=x).logits
                loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
            else:
                loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * lr_multiplier(i, len(batches), schedule)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += x.numel()
    return tokens / (time.perf_counter() - start), losses


def hf_model(ours: Transformer) -> torch.nn.Module:
    """HF LlamaForCausalLM with our initial weights (HF's own init differs, and the loss curves are compared)."""
    model = to_hf(ours)
    model.config._attn_implementation = "sdpa"
    return model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, smaller steps: under a minute")
    parser.add_argument("--preset", default="10m")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--reps", type=int, default=0, help="interleaved repeats of every row (0: 3, or 5 without --quick)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, warmup, batch_tokens, seq_len = (6, 2, 4096, 256) if args.quick else (24, 4, 8192, 256)
    reps = args.reps or (3 if args.quick else 5)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        write_corpus(tmp_path / "corpus.txt", n_docs=1500)
        base = {
            "data": {"corpus": str(tmp_path / "corpus.txt"), "val_docs": 20, "cache_dir": str(tmp_path / "cache")},
            "tokenizer": {"kind": "bpe", "vocab_size": 2048},
            "model": {"preset": args.preset, "seq_len": seq_len},
            "optim": {"lr": 1e-3, "warmup": 0.01},
            "train": {"batch_tokens": batch_tokens, "log_every": 1, "eval_every": 10**9, "final_eval_tokens": seq_len,
                      "progress": False, "threads": args.threads},
        }
        prepared = prepare(from_dict(RunConfig, base).data, from_dict(RunConfig, base).tokenizer, progress=False)
        split = prepared.split("train")
        order = EpochOrder(split.tokens, split.doc_offsets, seq_len, seed=0)
        epochs = steps * batch_tokens / seq_len / order.n
        def config(rep: int, **train_over: object) -> RunConfig:
            name = f"run-{rep}" + "".join(f"-{k}" for k in train_over)
            return from_dict(RunConfig, {**base, "run_dir": str(tmp_path / name),
                                         "train": {**base["train"], "epochs": epochs, **train_over}})

        cfg = config(0)
        model_cfg = ModelConfig(preset=args.preset, seq_len=seq_len, vocab_size=prepared.tokenizer.vocab_size)
        seqs = batch_tokens // seq_len
        batches = [torch.from_numpy(order.samples(i * seqs, seqs)) for i in range(steps)]
        params = count_parameters(model_cfg)

        peak = matmul_peak(torch.bfloat16)
        compile_walls: list[float] = []

        def compiled(rep: int) -> tuple[float, list[float]]:
            start = time.perf_counter()
            out = run_dataeff(config(rep, compile=True), warmup)
            compile_walls.append(time.perf_counter() - start)
            return out

        rows: dict[str, Callable[[int], tuple[float, list[float]]]] = {
            "dataeff (defaults)": lambda rep: run_dataeff(config(rep), warmup),
            "dataeff (compile=true)": compiled,
            "fp32 reference": lambda rep: run_plain(Transformer(model_cfg), batches, warmup, cfg.optim, hf=False, bf16=False),
            "HF Llama bf16+SDPA": lambda rep: run_plain(hf_model(Transformer(model_cfg)), batches, warmup, cfg.optim,
                                                        hf=True, bf16=True),
        }
        tok_s: dict[str, list[float]] = {name: [] for name in rows}
        losses: dict[str, list[float]] = {}
        loads = [os.getloadavg()[0]]
        for rep in range(reps):
            for name, row in rows.items():
                value, curve = row(rep)
                tok_s[name].append(value)
                losses.setdefault(name, curve)
            loads.append(os.getloadavg()[0])

    med = {name: median(v) for name, v in tok_s.items()}
    ours_tok_s, compiled_tok_s = med["dataeff (defaults)"], med["dataeff (compile=true)"]
    ref_tok_s, hf_tok_s = med["fp32 reference"], med["HF Llama bf16+SDPA"]
    ours_loss, ref_loss, hf_loss = losses["dataeff (defaults)"], losses["fp32 reference"], losses["HF Llama bf16+SDPA"]
    mfu = ours_tok_s * flops_per_token(model_cfg) / peak
    print(f"model: preset {args.preset}, {params['total'] / 1e6:.2f}M parameters ({params['non_embedding'] / 1e6:.2f}M non-embedding), "
          f"seq {seq_len}, batch {batch_tokens} tokens, {steps} steps ({warmup} warmup), {torch.get_num_threads()} threads, "
          f"rows interleaved {reps} times, medians")
    print(f"bf16 matmul peak: {peak / 1e9:.0f} GFLOP/s")
    print(f"{'':24}{'tok/s':>10}{'vs fp32 ref':>14}{'vs HF':>10}   spread (min-max, share of median)")
    for name, v in med.items():
        lo, hi = min(tok_s[name]), max(tok_s[name])
        print(f"{name:24}{v:>10,.0f}{v / ref_tok_s:>13.2f}x{v / hf_tok_s:>9.2f}x   {lo:,.0f}-{hi:,.0f} "
              f"({spread(tok_s[name]):.0%})")
    print(f"MFU (dataeff defaults): {mfu:.2f}; with compile: {compiled_tok_s * flops_per_token(model_cfg) / peak:.2f} "
          f"(a compiled run's wall time incl. compilation: median {median(compile_walls):.0f} s)")
    print(f"load average (1 min) before and after each round: {', '.join(f'{x:.2f}' for x in loads)} on "
          f"{os.cpu_count()} CPUs (other processes skew the rows of a round alike)")
    print("train loss by step (dataeff | fp32 ref | HF):")
    for i, (a, b, c) in enumerate(zip(ours_loss, ref_loss, hf_loss, strict=False)):
        print(f"  {i + 1:3d}  {a:.4f}  {b:.4f}  {c:.4f}")
    gap = max(abs(a - b) for a, b in zip(ours_loss, ref_loss, strict=False))
    print(f"max |dataeff - fp32 reference| train-loss gap: {gap:.4f}")
    print(json.dumps({"dataeff_tok_s": round(ours_tok_s, 1), "reference_tok_s": round(ref_tok_s, 1),
                      "hf_tok_s": round(hf_tok_s, 1), "dataeff_compile_tok_s": round(compiled_tok_s, 1),
                      "vs_reference": round(ours_tok_s / ref_tok_s, 3), "vs_hf": round(ours_tok_s / hf_tok_s, 3),
                      "spread": {k: round(spread(v), 3) for k, v in tok_s.items()}, "reps": reps,
                      "mfu": round(mfu, 4), "params": params["total"],
                      "loss_gap": round(gap, 4) if math.isfinite(gap) else None}))


if __name__ == "__main__":
    main()
