"""``train.compile=auto``: compile the model only when the run's remaining steps pay for the compilation.

``torch.compile`` makes a training step faster (1.15-1.25x at the bench's 10M shape on CPU, see
``bench/train_throughput.py``) but costs tens of seconds before the first compiled step, so it pays only in
runs of many steps: the pipeline's small sweeps, whose runs last seconds, must stay eager. ``auto`` trains
the first :data:`PROBE_STEPS` steps eagerly and times them, then compiles if the steps left, at the measured
eager step time, would save more than the compile cost: ``left · t · (1 - 1/SPEEDUP) > compile_seconds``.

The compile cost is estimated from the model's depth (Dynamo and Inductor trace and generate code per block,
so it grows with the layers, not with their width). On a loaded machine both the steps and the compilation
slow down, but only the steps are measured, so there ``auto`` compiles somewhat more readily than it should.
"""

from __future__ import annotations

from dataclasses import dataclass

# Steps timed eagerly before deciding; the first step of a run (allocator and kernel warm-up) is not timed.
PROBE_STEPS = 4
# Measured with bench/train_throughput.py --quick (10m preset, 8 layers, seq 256, batch 4096 tokens, 2 cores):
# compiled tok/s over eager tok/s, and a compiled run's extra wall time over the eager run's.
SPEEDUP = 1.2
COMPILE_SECONDS_BASE = 8.0
COMPILE_SECONDS_PER_LAYER = 3.0


@dataclass(frozen=True)
class Decision:
    compile: bool
    reason: str


def estimated_compile_seconds(n_layers: int) -> float:
    return COMPILE_SECONDS_BASE + COMPILE_SECONDS_PER_LAYER * n_layers


def decide(steps_left: int, eager_step_seconds: float, n_layers: int) -> Decision:
    """Whether compiling now pays for itself over ``steps_left`` steps of ``eager_step_seconds`` each."""
    saved = steps_left * eager_step_seconds * (1 - 1 / SPEEDUP)
    cost = estimated_compile_seconds(n_layers)
    verdict = "compiling" if saved > cost else "staying eager"
    return Decision(saved > cost, f"train.compile=auto: {verdict}: {steps_left} steps left at "
                                  f"{eager_step_seconds * 1e3:.0f} ms would save ~{saved:.0f} s against a compile "
                                  f"cost of ~{cost:.0f} s")
