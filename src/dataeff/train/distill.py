"""Distillation: a student learns from a teacher's predictions (token level) or from its samples (sequence level).

**Token level** (Slowrun's chain distillation, Hinton et al.): the student minimises
``(1 - α)·CE(real tokens) + α·T²·KL(teacher_T ‖ student_T)``, where ``teacher_T`` is the teacher's (for an
ensemble: the members' combined) distribution at temperature ``T``. The teacher's log-probabilities are either
computed **online** (teachers stay resident and run on every batch) or **cached** once, as the top-k per
training position on disk, so no teacher is resident while the student trains; KL then runs over the teacher's
top-k renormalised, the usual truncation.

**Sequence level** (the paper's method) is data, not a loss: sample a corpus from the teacher (``dataeff
sample``), then train on the mixture with ``data.synthetic`` and ``data.synthetic_share``. **Self-** and
**chain distillation** are token-level distillation with a teacher of the student's own size: its predecessor.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dataeff.data.order import EpochOrder
from dataeff.data.tokenizer import Tokenizer
from dataeff.errors import DataeffError
from dataeff.eval.ensemble import Ensemble, load_ensemble, resolve_members
from dataeff.fsutil import atomic_write_json
from dataeff.train.config import DistillConfig
from dataeff.train.dist import autocast

CACHE_DIR = "teacher_topk"
_COMPLETE = ".complete"


def distill_loss(logits: torch.Tensor, targets: torch.Tensor, cfg: DistillConfig, *,
                 teacher_log_probs: torch.Tensor | None = None,
                 topk: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the distillation objective, its cross-entropy part), both means over positions.

    Give the teacher either as full log-probabilities ``(B, T, V)`` or as ``topk = (ids, log_probs)`` of shape
    ``(B, T, k)``. The T² factor keeps the KL gradient's scale independent of the temperature.
    """
    logits = logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    tau = cfg.temperature
    student = F.log_softmax(logits / tau, dim=-1)
    if topk is not None:
        ids, lp = topk
        teacher = F.log_softmax(lp.float() / tau, dim=-1)
        student = student.gather(-1, ids.long())
    elif teacher_log_probs is not None:
        teacher = F.log_softmax(teacher_log_probs.float() / tau, dim=-1)
    else:
        raise DataeffError("distill_loss: give teacher_log_probs or topk")
    kl = (teacher.exp() * (teacher - student)).sum(-1).mean()
    return (1.0 - cfg.weight) * ce + cfg.weight * tau * tau * kl, ce


class Teacher:
    """What the trainer asks of a teacher: the distillation loss of a micro-batch of training windows."""

    def __init__(self, cfg: DistillConfig, ensemble: Ensemble | None = None, cache: TopKCache | None = None):
        self.cfg, self.ensemble, self.cache = cfg, ensemble, cache
        # The top-k cache is keyed by training window, so the trainer passes each sample's window.
        self.needs_window_ids = cache is not None

    def __call__(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 window_ids: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainer's objective on a micro-batch of windows: (distillation loss, its cross-entropy part)."""
        return self.loss(model(inputs), targets, inputs, window_ids)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor,
             window_ids: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:
            assert window_ids is not None
            return distill_loss(logits, targets, self.cfg, topk=self.cache.get(window_ids, logits.device))
        assert self.ensemble is not None
        with torch.no_grad():
            teacher = self.ensemble.log_probs(inputs)
        return distill_loss(logits, targets, self.cfg, teacher_log_probs=teacher)


def _load_teacher(cfg: DistillConfig, tokenizer: Tokenizer, seq_len: int, device: torch.device | str) -> Ensemble:
    """The teacher on ``device``, refused (naming the member) unless it shares the student's tokenizer and
    covers its context."""
    members, _ = resolve_members(cfg.teachers)
    for rd in members:
        tok = Path(rd) / "tokenizer.json"
        if not tok.exists():
            raise DataeffError(f"distill.teachers: {rd} has no tokenizer.json (not a finished dataeff run)")
        if Tokenizer.load(tok).sha256 != tokenizer.sha256:
            raise DataeffError(f"distill.teachers: {rd} uses a different tokenizer than the student's data")
    ensemble = load_ensemble(cfg.teachers, cfg.combine, device=str(device))
    if ensemble.seq_len < seq_len:
        raise DataeffError(f"distill.teachers: a teacher's context of {ensemble.seq_len} tokens is shorter than the "
                           f"student's model.seq_len={seq_len}")
    for m in ensemble.members:
        m.requires_grad_(False)
    return ensemble


class TopKCache:
    """The teacher's top-k log-probabilities for every position of every training window, as memmaps."""

    def __init__(self, directory: Path):
        self.ids = np.load(directory / "ids.npy", mmap_mode="r")
        self.log_probs = np.load(directory / "log_probs.npy", mmap_mode="r")

    def get(self, window_ids: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(np.asarray(self.ids[window_ids], dtype=np.int64)).to(device)
        lp = torch.from_numpy(np.asarray(self.log_probs[window_ids], dtype=np.float32)).to(device)
        return ids, lp


def _cache_meta(cfg: DistillConfig, order: EpochOrder) -> dict[str, object]:
    members, spec = resolve_members(cfg.teachers)
    return {"teachers": members, "weights": spec.weights if spec else None, "combine": cfg.combine,
            "top_k": cfg.top_k, "windows": order.n, "seq_len": order.seq_len}


def build_topk_cache(cfg: DistillConfig, directory: Path, order: EpochOrder, tokenizer: Tokenizer,
                     device: torch.device, dtype: str, batch_size: int = 16, progress: bool = False) -> TopKCache:
    """Score every training window with the teacher once and keep its top-k; a complete cache is reused.

    Built in a temporary directory renamed into place, so a killed build leaves nothing that looks complete.
    """
    if order.mode != "sequence":
        raise DataeffError("distill.teacher_cache=topk needs train.shuffle=sequence: document shuffling re-packs "
                           "windows every epoch, so no fixed position has one teacher distribution")
    meta = _cache_meta(cfg, order)
    if (directory / _COMPLETE).exists():
        if json.loads((directory / "meta.json").read_text()) == meta:
            return TopKCache(directory)
        shutil.rmtree(directory)
    teacher = _load_teacher(cfg, tokenizer, order.seq_len, device)
    k = min(cfg.top_k, teacher.vocab_size)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        id_dtype = np.uint16 if teacher.vocab_size <= 65535 else np.int32
        ids = np.lib.format.open_memmap(tmp / "ids.npy", "w+", id_dtype, (order.n, order.seq_len, k))
        lps = np.lib.format.open_memmap(tmp / "log_probs.npy", "w+", np.float16, (order.n, order.seq_len, k))
        windows = np.arange(order.n)
        with torch.inference_mode(), tqdm(total=order.n, desc="teacher top-k", unit="seq", disable=not progress) as bar:
            for start in range(0, order.n, batch_size):
                w = windows[start : start + batch_size]
                x = torch.from_numpy(order.windows(w)[:, :-1]).to(device)
                with autocast(device, dtype):
                    lp = teacher.log_probs(x)
                top = lp.float().topk(k, dim=-1)
                ids[w] = top.indices.cpu().numpy().astype(id_dtype)
                lps[w] = top.values.cpu().numpy().astype(np.float16)
                bar.update(len(w))
        ids.flush()
        lps.flush()
        del ids, lps
        atomic_write_json(tmp / "meta.json", meta)
        (tmp / _COMPLETE).touch()
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TopKCache(directory)


def make_teacher(cfg: DistillConfig, run_dir: Path, order: EpochOrder, tokenizer: Tokenizer, device: torch.device,
                 dtype: str, *, build: bool, progress: bool = False) -> Teacher:
    """The run's teacher. With the top-k cache only the process given ``build`` scores the teacher; the others
    must call this after it finished (the trainer puts a barrier between)."""
    if cfg.teacher_cache == "online":
        return Teacher(cfg, ensemble=_load_teacher(cfg, tokenizer, order.seq_len, device))
    directory = run_dir / CACHE_DIR
    if build:
        return Teacher(cfg, cache=build_topk_cache(cfg, directory, order, tokenizer, device, dtype, progress=progress))
    return Teacher(cfg, cache=TopKCache(directory))
