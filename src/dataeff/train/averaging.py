"""Weight averaging within one run: an EMA of the weights, SWA-style averages of weight snapshots, and the
snapshot ensemble (the snapshots' predictions averaged in probability).

Many epochs over few tokens end with the weights wandering around one basin; averaging the weights visited
there (EMA, SWA) or their predictions (a snapshot ensemble) buys loss from the same run at almost no compute.
A run writes ``model_ema.safetensors`` and ``model_swa.safetensors`` beside ``model.safetensors`` (all three
load with :func:`dataeff.evaluate_run.load_model`) and ``snapshots/step_*.safetensors``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataeff.errors import DataeffError
from dataeff.eval.loss import EvalResult, batches, evaluate, summarize, token_nll
from dataeff.model.transformer import Transformer
from dataeff.train import checkpoint as ckpt
from dataeff.train.config import TrainConfig

EMA_FILE = "model_ema.safetensors"
SWA_FILE = "model_swa.safetensors"
SNAPSHOT_DIR = "snapshots"


class EMA:
    """An fp32 exponential moving average of a model's parameters, updated after every optimizer step.

    Debiased like Adam's moments: after t updates it weighs the weights after update i by decay^(t-i),
    normalised to sum to one, so the random initialisation gets no weight however short the run is.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise DataeffError(f"EMA decay {decay} must be in (0, 1)")
        self.decay = decay
        self.updates = 0
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        # Detached views share the parameters' storage, so they follow the optimizer's in-place updates.
        self.params = [p.detach() for _, p in named]
        self.shadow = [p.float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        # (1-d)/(1-d^t) is the debiased weight of the newest weights; it is 1 at the first update.
        weight = (1.0 - self.decay) / (1.0 - self.decay**self.updates)
        torch._foreach_lerp_(self.shadow, self.params, weight)

    def state(self) -> dict[str, torch.Tensor]:
        """Everything :meth:`load_state` needs to continue exactly, as named tensors for a checkpoint."""
        return {"ema.updates": torch.tensor(self.updates, dtype=torch.int64),
                **{f"ema.weights.{n}": s for n, s in zip(self.names, self.shadow, strict=True)}}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
        expected = {f"ema.weights.{n}": s for n, s in zip(self.names, self.shadow, strict=True)}
        if "ema.updates" not in tensors:
            raise DataeffError(f"{source}: holds no EMA state (was it written with train.ema=0?)")
        for key, shadow in expected.items():
            if key not in tensors or tensors[key].shape != shadow.shape:
                raise DataeffError(f"{source}: EMA state does not fit the model (first mismatch: {key.removeprefix('ema.weights.')})")
        for key, shadow in expected.items():
            shadow.copy_(tensors[key])
        self.updates = int(tensors["ema.updates"])

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Put the averaged weights into ``model`` (one of the same architecture)."""
        params = dict(model.named_parameters())
        if set(params) != set(self.names):
            raise DataeffError("EMA: the target model's parameters differ from those averaged")
        for name, shadow in zip(self.names, self.shadow, strict=True):
            params[name].copy_(shadow)


def snapshot_steps(total_steps: int, snapshots: int, fraction: float) -> list[int]:
    """The steps after which snapshots are saved: ``snapshots`` of them, each closing one of equal segments
    of the last ``fraction`` of the run, so the last one is the final step."""
    if snapshots < 0:
        raise DataeffError(f"train.snapshots={snapshots} must be >= 0 (0: off)")
    if not 0.0 < fraction <= 1.0:
        raise DataeffError(f"train.snapshot_fraction={fraction} must be in (0, 1]")
    if snapshots == 0:
        return []
    window = max(1, round(fraction * total_steps))
    if snapshots > window:
        raise DataeffError(f"train.snapshots={snapshots} exceeds the {window} steps in the last "
                           f"train.snapshot_fraction={fraction} of the run's {total_steps} steps")
    # Spacing window/snapshots >= 1 keeps the floored steps distinct.
    return [total_steps - (snapshots - 1 - i) * window // snapshots for i in range(snapshots)]


def snapshot_paths(run_dir: str | Path) -> list[Path]:
    """The snapshot files of a run directory, oldest first."""
    return [path for _, path in ckpt.list_checkpoints(Path(run_dir) / SNAPSHOT_DIR)]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    tensors, _ = ckpt.read_safetensors(path)
    # A training checkpoint averages as its model.* tensors, as load_weights reads it.
    if any(k.startswith("model.") for k in tensors):
        tensors = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    return tensors


@torch.no_grad()
def average_weights(paths: Sequence[Path], into: Transformer) -> Transformer:
    """Load the uniform average of the weight files ``paths`` (final weights, snapshots or training
    checkpoints) into ``into`` and return it."""
    if not paths:
        raise DataeffError("average_weights: no weight files given")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in paths:
        tensors = _weights(Path(path))
        if not total:
            total = {k: v.float() for k, v in tensors.items()}
            dtypes = {k: v.dtype for k, v in tensors.items()}
            continue
        bad = sorted(set(total) ^ set(tensors)) or [k for k in total if tensors[k].shape != total[k].shape]
        if bad:
            raise DataeffError(f"{path}: weights do not match those of {paths[0]} (first mismatch: {bad[0]})")
        for k, v in tensors.items():
            total[k] += v.float()
    mean = {k: (v / len(paths)).to(dtypes[k]) for k, v in total.items()}
    ckpt.assign_weights(into, mean, paths[0])
    return into


@dataclass(frozen=True)
class Heldout:
    """Held-out tokens and how to score them (the arguments of :func:`dataeff.evaluate.evaluate`)."""

    tokens: np.ndarray
    n_bytes: int
    n_words: int
    seq_len: int
    batch_size: int = 16
    max_tokens: int | None = None
    dtype: str = "auto"
    doc_offsets: np.ndarray | None = None
    mask: np.ndarray | None = None  # of conditional documents: only the targets it keeps are scored

    def score(self, model: torch.nn.Module) -> EvalResult:
        return evaluate(model, self.tokens, n_bytes=self.n_bytes, n_words=self.n_words, seq_len=self.seq_len,
                        batch_size=self.batch_size, max_tokens=self.max_tokens, dtype=self.dtype,
                        doc_offsets=self.doc_offsets, mask=self.mask)

    def summarize(self, nll: torch.Tensor) -> EvalResult:
        """The metrics of per-token losses over the tokens :meth:`score` would score."""
        return summarize(float(nll.double().sum()), nll.numel(), len(self.tokens), self.n_bytes, self.n_words)


@torch.no_grad()
def target_log_probs(model: torch.nn.Module, heldout: Heldout) -> torch.Tensor:
    """The model's log-probability of every target token of ``heldout``, flat, in the order of
    :func:`dataeff.evaluate.batches` (as float64 on the CPU)."""
    if heldout.mask is not None:
        raise DataeffError("snapshot ensembles score plain held-out text, not conditional documents")
    was_training = model.training
    model.eval()
    out = [-token_nll(model, x, y, heldout.dtype).flatten().double().cpu()
           for x, y in batches(heldout.tokens, heldout.seq_len, heldout.batch_size, heldout.max_tokens)]
    model.train(was_training)
    return torch.cat(out)


def snapshot_ensemble_nll(paths: Sequence[Path], into: Transformer, heldout: Heldout) -> tuple[torch.Tensor, list[float]]:
    """Per-token loss of the probability-averaged snapshots, ``-log mean_k p_k(target)``, and each snapshot's
    mean loss. Snapshots are loaded into ``into`` one at a time, so only one model is held."""
    if not paths:
        raise DataeffError("snapshot ensemble: no snapshot files given")
    log_sum: torch.Tensor | None = None
    member_losses = []
    for path in paths:
        ckpt.load_weights(path, into)
        lp = target_log_probs(into, heldout)
        member_losses.append(float(-lp.mean()))
        # A running log-sum-exp holds one value per token, whatever the number of snapshots.
        log_sum = lp if log_sum is None else torch.logaddexp(log_sum, lp)
    assert log_sum is not None
    return math.log(len(paths)) - log_sum, member_losses


class RunAveraging:
    """The EMA and the snapshots of one training run, as its ``train`` section asks for.

    The steps are checked when it is built, before anything is written. On the processes of a data-parallel
    run other than rank 0 (``active=False``) every method does nothing: rank 0 alone writes and evaluates.
    """

    def __init__(self, t: TrainConfig, model: Transformer, run_dir: Path, total_steps: int, *,
                 metadata: dict[str, Any], active: bool = True):
        """``metadata`` goes into every weight file written, as in ``model.safetensors``."""
        if not 0.0 <= t.ema < 1.0:
            raise DataeffError(f"train.ema={t.ema} must be in [0, 1): a decay per optimizer step such as 0.999 (0: off)")
        self.steps = snapshot_steps(total_steps, t.snapshots, t.snapshot_fraction)
        self.model, self.run_dir, self.metadata, self.active = model, run_dir, metadata, active
        self.ema = EMA(model, t.ema) if t.ema > 0 and active else None
        self._snapshot_at = set(self.steps) if active else set()

    def snapshot_path(self, step: int) -> Path:
        return ckpt.checkpoint_path(self.run_dir / SNAPSHOT_DIR, step)

    def after_step(self, step: int) -> None:
        """Call after the optimizer step that completes ``step`` steps."""
        if self.ema is not None:
            self.ema.update()
        # A snapshot written before a kill is kept: the resumed run would recompute the same weights.
        if step in self._snapshot_at and not self.snapshot_path(step).exists():
            ckpt.save_weights(self.snapshot_path(step), self.model, {**self.metadata, "step": step})

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors for the training checkpoint (``extra_tensors``)."""
        return self.ema.state() if self.ema is not None else {}

    def load(self, checkpoint: Path) -> None:
        """Restore the EMA from a training checkpoint written with :meth:`state`."""
        if self.ema is not None:
            self.ema.load_state(ckpt.load_extra_tensors(checkpoint), checkpoint)

    def finish(self, heldout: Heldout) -> dict[str, float]:
        """Save and score the averaged models; return their metrics for the run's result."""
        averaged_snapshots = self.active and len(self.steps) >= 2
        if self.ema is None and not averaged_snapshots:
            return {}
        result: dict[str, float] = {}
        # A copy keeps the model's device and shapes, and unlike building a Transformer draws nothing from the RNG.
        scratch = copy.deepcopy(self.model)
        if self.ema is not None:
            self.ema.copy_to(scratch)
            ckpt.save_weights(self.run_dir / EMA_FILE, scratch, {**self.metadata, "average": {"ema": self.ema.decay}})
            result |= _metrics(heldout.score(scratch), "ema")
        if averaged_snapshots:
            paths = [self.snapshot_path(s) for s in self.steps]
            for path in paths:
                if not path.exists():
                    raise DataeffError(f"{path}: snapshot missing (deleted after it was written?); "
                                       f"delete the run's checkpoints to retrain it")
            average_weights(paths, scratch)
            ckpt.save_weights(self.run_dir / SWA_FILE, scratch, {**self.metadata, "average": {"swa_steps": self.steps}})
            result |= _metrics(heldout.score(scratch), "swa")
            nll, member_losses = snapshot_ensemble_nll(paths, scratch, heldout)
            result |= _metrics(heldout.summarize(nll), "snapshot_ensemble")
            result["val_loss_snapshot_mean"] = sum(member_losses) / len(member_losses)
        return result


def _metrics(r: EvalResult, kind: str) -> dict[str, float]:
    return {f"val_loss_{kind}": r.loss, f"val_bpb_{kind}": r.bpb}
