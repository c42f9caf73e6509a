"""Ensemble evaluation cost: one ``evaluate_ensemble`` pass over K members vs K separate ``evaluate`` calls.

Builds K random models of one shape (d_model 256, 4 layers, vocab 2048, seq_len 256; --quick: d_model 128,
2 layers, seq_len 128), saved as run directories in a temporary directory, and a split of uniformly random
tokens (32k; --quick 8k). Each repeat times, one after another so that a burst of load hits them alike:

- ``evaluate()`` of each of the K members in turn, all loaded beforehand (loading is not counted): the cost
  of scoring the members apart, ``k_times_single_s``;
- ``evaluate_ensemble(modes=("prob",))``: every prefix ensemble's probability average and each member's loss,
  members resident (what ``resident=None`` picks at these sizes), then streamed one at a time;
- ``evaluate_ensemble(modes=("prob", "logit"))``, which adds the full-vocabulary running sum (resident).

The ensemble times include loading the K members from disk and batching the split. Times are medians of
the repeats (after a short warm-up), in wall time and in this process's CPU time; an overhead is the median
over repeats of the ratio to the K separate evaluations of the same repeat, which cancels slow changes in
the load of a shared machine. The last line is one JSON object: ensemble_s, k_times_single_s, overhead
(of ensemble_s, the resident probability-averaging pass), overhead_cpu, k, logit_ensemble_s,
streaming_ensemble_s.

    python bench/ensemble_eval.py            # K=8, ~3.7M parameters each, 32k tokens: several minutes
    python bench/ensemble_eval.py --quick    # K=8, ~0.7M parameters each, 8k tokens: about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dataeff.checkpoint import save_weights
from dataeff.config import to_dict
from dataeff.ensemble import evaluate_ensemble
from dataeff.evaluate import evaluate
from dataeff.evaluate_run import load_model
from dataeff.model import ModelConfig, Transformer, count_parameters
from dataeff.tokens import TokenSplit


def make_members(root: Path, cfg: ModelConfig, k: int) -> list[str]:
    """K run directories with distinct random weights (no tokenizer: the split is already token ids)."""
    dirs = []
    for i in range(k):
        torch.manual_seed(i)
        run = root / f"member{i}"
        run.mkdir()
        model = Transformer(cfg)
        (run / "manifest.json").write_text(json.dumps({"model": to_dict(cfg)}))
        save_weights(run / "model.safetensors", model, {"model": to_dict(cfg)})
        dirs.append(str(run))
    return dirs


def timed(runs: dict[str, Callable[[], object]], reps: int) -> dict[str, tuple[list[float], list[float]]]:
    """(wall seconds, CPU seconds of this process) of each run in each of ``reps`` turns. Turns alternate
    the order of the runs, so a drift in the machine's load favours none of them."""
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runs}
    for rep in range(reps):
        for name in list(runs) if rep % 2 == 0 else reversed(list(runs)):
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            times[name][0].append(time.perf_counter() - start)
            times[name][1].append(time.process_time() - start_cpu)
    return times


def overhead(times: dict[str, tuple[list[float], list[float]]], name: str, clock: int) -> float:
    """Median over turns of ``name``'s time over the K separate evaluations' in the same turn, minus 1."""
    return statistics.median(t / base - 1 for t, base in zip(times[name][clock], times["apart"][clock], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller model and split: under a minute")
    parser.add_argument("--k", type=int, default=8, help="ensemble members")
    parser.add_argument("--tokens", type=int, default=0, help="tokens in the split (0: 32768, or 8192 with --quick)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--reps", type=int, default=0, help="timed repeats (0: 5, or 3 with --quick)")
    # One thread: on a shared machine more threads stall at every barrier, and their spinning swamps the timings.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        cfg = ModelConfig(d_model=128, n_layers=2, n_heads=4, seq_len=128, vocab_size=2048).resolved()
    else:
        cfg = ModelConfig(d_model=256, n_layers=4, n_heads=4, seq_len=256, vocab_size=2048).resolved()
    n_tokens = args.tokens or (8192 if args.quick else 32768)
    reps = args.reps or (3 if args.quick else 5)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=n_tokens + 1, dtype=np.uint16)
    split = TokenSplit("random", tokens, np.asarray([0, len(tokens)]), n_bytes=4 * len(tokens), n_words=len(tokens) // 2)
    common = {"batch_size": args.batch_size, "dtype": args.dtype}

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dataeff-bench-ensemble-") as tmp:
        dirs = make_members(Path(tmp), cfg, args.k)
        singles = [load_model(d) for d in dirs]
        losses: dict[str, float] = {}

        def apart() -> None:
            for i, model in enumerate(singles):
                losses[f"single{i}"] = evaluate(model, split.tokens, n_bytes=split.n_bytes, n_words=split.n_words,
                                                seq_len=cfg.seq_len, **common).loss

        def prob() -> None:
            ev = evaluate_ensemble(dirs, split, modes=("prob",), **common)
            losses.update({f"ensemble{i}": r.loss for i, r in enumerate(ev.members)})

        def streaming() -> None:
            evaluate_ensemble(dirs, split, modes=("prob",), resident=False, **common)

        def logit() -> None:
            evaluate_ensemble(dirs, split, modes=("prob", "logit"), **common)

        # Warm-up: first calls pay for allocator growth and kernel selection.
        evaluate(singles[0], split.tokens[: 4 * cfg.seq_len + 1], n_bytes=1, n_words=1, seq_len=cfg.seq_len, **common)
        evaluate_ensemble(dirs[:2], split, modes=("prob", "logit"), max_tokens=4 * cfg.seq_len, **common)
        times = timed({"apart": apart, "prob": prob, "streaming": streaming, "logit": logit}, reps)
    load_after = os.getloadavg()
    median = {name: statistics.median(wall) for name, (wall, _) in times.items()}
    worst = max(abs(losses[f"single{i}"] - losses[f"ensemble{i}"]) for i in range(args.k))

    params = count_parameters(cfg)["total"]
    print(f"model: d_model {cfg.d_model}, {cfg.n_layers} layers, seq_len {cfg.seq_len}, vocab {cfg.vocab_size}, "
          f"{params / 1e6:.2f}M parameters; K={args.k}; {n_tokens} random tokens, batch {args.batch_size}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, median of {reps}")
    print(f"load average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)}; "
          f"after {', '.join(f'{x:.2f}' for x in load_after)} on {os.cpu_count()} CPUs")
    print(f"member losses, evaluate vs evaluate_ensemble: largest difference {worst:.2e} nats")
    print(f"{'':36} {'wall s':>8} {'overhead':>9} {'CPU s':>8} {'overhead':>9}   (medians; overheads per turn)")
    for label, key in (("evaluate() of each member (K calls)", "apart"), ("evaluate_ensemble prob, resident", "prob"),
                       ("evaluate_ensemble prob, streaming", "streaming"), ("evaluate_ensemble prob + logit", "logit")):
        print(f"{label:36} {median[key]:8.2f} {overhead(times, key, 0):+9.1%} {statistics.median(times[key][1]):8.2f} "
              f"{overhead(times, key, 1):+9.1%}")
    print(json.dumps({"ensemble_s": round(median["prob"], 3), "k_times_single_s": round(median["apart"], 3),
                      "overhead": round(overhead(times, "prob", 0), 4), "overhead_cpu": round(overhead(times, "prob", 1), 4),
                      "k": args.k, "logit_ensemble_s": round(median["logit"], 3),
                      "streaming_ensemble_s": round(median["streaming"], 3)}))


if __name__ == "__main__":
    main()
