"""``make demo``: the compute-for-data pipeline on the TinyStories demo world (``configs/demo_pipeline.yaml``,
about 15 minutes on two cores), then where its report is and its headline figures. The fuller world is
``dataeff run configs/tinystories_pipeline.yaml``."""

from __future__ import annotations

import sys
from pathlib import Path

from dataeff.config import load
from dataeff.data.tokens import prepare
from dataeff.errors import DataeffError
from dataeff.experiment.config import PipelineConfig
from dataeff.experiment.pipeline import run_pipeline
from dataeff.experiment.progress import clock

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
    tuning = results["tuning"]
    best = min(t.best_loss for t in tuning.tuned if t.budget == results.world_tokens and t.best_loss is not None)
    print(f"\nworld: {results.world_tokens:,} TinyStories tokens; best held-out loss {best:.3f} nats/token "
          f"vs unigram entropy {entropy:.3f}")
    for line in results.verdict():
        print(line)
    for label, m in results.multipliers().items():
        if m.power_law_ci is not None:
            lo, hi = (f"{v:.2f}" if v is not None else "inf" for v in m.power_law_ci)
            pl = f"{m.power_law:.2f}" if m.power_law is not None else "inf"
            print(f"data efficiency of {label}: {pl}x [{lo}, {hi}] (power law)")
    distillation = results.stages.get("distillation")
    for s in distillation.students if distillation is not None else []:
        kept = f"{s.retained:.0%} of the ensemble's gain" if s.retained is not None else "no gain to keep"
        print(f"distilled student ({s.name}): loss {s.loss:.3f}, keeps {kept}" if s.loss is not None
              else f"distilled student ({s.name}): failed ({s.error})")
    stages = ", ".join(f"{name} {clock(s)}" for name, s in results.stage_seconds.items())
    print(f"pipeline time: {results.seconds / 60:.1f} minutes ({stages})")
    print(f"report: {(Path(cfg.root) / 'report' / 'report.html').resolve()} (and report.md beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
