"""Real runs on the known-truth world (a random sparse Markov source with exact entropy, ``synth.markov``): two
recipes (weight decay 0.1 and 0.8) at several model sizes and seeds, at one token budget. Their losses give the
curve shape (A, α), the seed noise and its correlation across recipes that ``bench/coverage.py`` simulates
around the known entropy. Prints one JSON line and writes ``ROOT/known_world.json``.

    PYTHONPATH=src python bench/known_world.py --root runs/known_world --sizes pico nano micro mini --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dataeff.config import from_dict
from dataeff.experiment.executor import ExecutorConfig, run_jobs
from dataeff.fsutil import atomic_write_json
from dataeff.synth.markov import MarkovConfig, write_corpus
from dataeff.train.config import RunConfig

RECIPES = {"standard": 0.1, "regularized": 0.8}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="runs/known_world")
    ap.add_argument("--sizes", nargs="+", default=["pico", "nano", "micro", "mini"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    root = Path(args.root)
    corpus = root / "corpus"
    if not (corpus / "source.json").exists():
        write_corpus(MarkovConfig(out=str(corpus), train_tokens=200_000, val_tokens=32_768))
    source = json.loads((corpus / "source.json").read_text())
    configs, keys = [], []
    for recipe, wd in RECIPES.items():
        for size in args.sizes:
            for seed in args.seeds:
                configs.append(from_dict(RunConfig, {
                    "data": {"corpus": str(corpus / "train.jsonl"), "val_split": str(corpus / "val.jsonl"),
                             "train_tokens": args.tokens},
                    "tokenizer": {"kind": "word", "vocab_size": 64},
                    "model": {"preset": size, "seq_len": 64},
                    "optim": {"lr": 3e-3, "weight_decay": wd, "warmup": 0.02},
                    "train": {"epochs": args.epochs, "batch_tokens": 512, "eval_tokens": 8192, "init_seed": seed,
                              "data_seed": seed, "keep_checkpoints": 1, "progress": False},
                }, source="known_world"))
                keys.append((recipe, size, seed))
    start = time.time()
    results = run_jobs(configs, ExecutorConfig(workers=args.workers, threads_per_worker=1), root / "runs", progress=False)
    losses: dict[str, dict[str, dict[str, float | None]]] = {}
    params: dict[str, int] = {}
    for (recipe, size, seed), r in zip(keys, results, strict=True):
        losses.setdefault(recipe, {}).setdefault(size, {})[str(seed)] = r.result["val_loss"] if r.result else None
        if r.result:
            params[size] = int(r.result["params"])
    doc = {"entropy_rate": source["entropy_rate"], "tokens": args.tokens, "epochs": args.epochs,
           "weight_decay": RECIPES, "params": params, "losses": losses, "seconds": time.time() - start}
    atomic_write_json(root / "known_world.json", doc)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
