"""``make demo``: the compute-for-data pipeline on the TinyStories demo world, then its headline figures."""

from __future__ import annotations

import sys
from pathlib import Path

from dataeff.config import load
from dataeff.data.tokens import prepare
from dataeff.errors import DataeffError
from dataeff.experiment.pipeline import PipelineConfig, run_pipeline

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_pipeline.yaml"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load(PipelineConfig, CONFIG, argv)
        results = run_pipeline(cfg)
        entropy = prepare(cfg.base.data, cfg.base.tokenizer, progress=False).meta["unigram_entropy"]
    except DataeffError as e:
        print(f"dataeff: error: {e}", file=sys.stderr)
        return 1
    best = min(r["best_loss"] for r in results["tuned"] if r["budget"] == results["world_tokens"])
    print(f"\nworld: {results['world_tokens']:,} TinyStories tokens; best held-out loss {best:.3f} nats/token "
          f"vs unigram entropy {entropy:.3f}")
    for line in results["verdict"]:
        print(line)
    for label, m in results["multipliers"].items():
        pl = m.get("power_law")
        if pl is not None:
            lo, hi = m.get("power_law_ci", [float("nan")] * 2)
            print(f"data efficiency of {label}: {pl:.2f}x [{lo:.2f}, {hi:.2f}] (power law)")
    for s in (results.get("distillation") or {}).get("students", []):
        kept = f"{s['retained']:.0%} of the ensemble's gain" if s.get("retained") is not None else "no gain to keep"
        print(f"distilled student ({s['name']}): loss {s['loss']:.3f}, keeps {kept}")
    print(f"report: {Path(cfg.root) / 'report' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
