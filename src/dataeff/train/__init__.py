"""Training one run: its config (``config``) and identity (``identity``), where its weights start (``init``), the loop (``loop``), optimizers and schedules
(``optim``), checkpoints (``checkpoint``), weight averaging (``averaging``), distillation from a teacher
(``distill``), data-parallel setup (``dist``), and the run-directory contract (``rundir``).

Nothing here imports synthetic-data producers (:mod:`dataeff.synth`): generated text reaches a run as a corpus.
"""

from dataeff._imports import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "config": ["DistillConfig", "OptimConfig", "RunConfig", "TrainConfig", "config_identity"],
    "identity": ["default_run_dir", "run_hash", "run_identity"],
    "loop": ["Plan", "make_plan", "train"],
    "optim": ["build_optimizers", "lr_multiplier"],
})
