"""``make demo``: prepare → train → eval on the TinyStories sample, then the held-out loss against the data's
unigram entropy (the loss of a model that ignores context)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dataeff.config import load
from dataeff.errors import DataeffError
from dataeff.evaluate_run import EvalConfig, run_eval
from dataeff.tokens import prepare
from dataeff.train import RunConfig, train

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tinystories_core.yaml"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load(RunConfig, CONFIG, argv)
        print(f"[1/3] prepare: {cfg.data.corpus}, {cfg.data.train_tokens:,} training tokens")
        prepared = prepare(cfg.data, cfg.tokenizer)
        print(f"      token store: {prepared.path}")
        print(f"[2/3] train: {cfg.model.preset} model, {cfg.train.epochs:g} epochs, weight decay {cfg.optim.weight_decay}")
        result = train(cfg)
        print(f"[3/3] eval: {cfg.run_dir}")
        scores = run_eval(EvalConfig(run_dir=str(cfg.run_dir)))
    except DataeffError as e:
        print(f"dataeff: error: {e}", file=sys.stderr)
        return 1
    entropy = prepared.meta["unigram_entropy"]
    print(json.dumps(scores, indent=2))
    print(f"held-out loss {scores['loss']:.3f} nats/token ({scores['bpb']:.3f} bits/byte) vs unigram entropy "
          f"{entropy:.3f} nats/token; final train loss {result['train_loss']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
