"""Ensembles of independently trained models: the scaling axis that beats parameter scaling on fixed data.

Members are combined per token either by **probability averaging** (the mixture ``log Σ_k w_k p_k``; Slowrun
measured it ~0.011 nats better) or by **logit averaging** (``softmax(Σ_k w_k log p_k)``, the paper's choice).

An ensemble is saved as ``ensemble.json`` (:class:`EnsembleSpec`: a name, the member run directories in
order, the combine mode and optional weights). Member paths are stored as given; relative ones resolve
against the current working directory of whoever reads the file, so write absolute paths for a file that
will be read from elsewhere.

:func:`evaluate_ensemble` scores every prefix ensemble (the first k members, k = 1..K) in one pass over the
members, with weights for the probability mixture learned on a separate fitness split.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from scipy.special import logsumexp
from tqdm import tqdm

from dataeff.data.tokens import TokenSplit
from dataeff.errors import DataeffError
from dataeff.eval.loss import EvalResult, batches, summarize
from dataeff.fsutil import atomic_write_json
from dataeff.model.config import ModelConfig, count_parameters
from dataeff.model.transformer import Transformer
from dataeff.train.dist import autocast, pick_device
from dataeff.train.rundir import load_model, model_config

Combine = Literal["prob", "logit"]
ENSEMBLE_FILE = "ensemble.json"
_SPEC_FIELDS = ("name", "members", "combine", "weights")
_SPEC_VERSION = 1
# evaluate_ensemble(resident=None) keeps every member loaded when their fp32 weights fit in this.
RESIDENT_BYTES = 2 * 2**30
# When members stream one at a time, a running sum of log-probabilities larger than this goes to a file.
SPILL_BYTES = 256 * 2**20
# Mixture weights stop when the likelihood is provably within this of the optimum (nats per token).
WEIGHTS_TOL = 1e-10
WEIGHTS_MAX_ITERS = 10_000


def combine_log_probs(member_log_probs: Sequence[torch.Tensor], mode: Combine = "prob",
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """Combine members' log-probabilities (each ``(..., V)``) into the ensemble's log-probabilities."""
    k = len(member_log_probs)
    if k == 0:
        raise DataeffError("ensemble: no members to combine")
    w = torch.full((k,), 1.0 / k) if weights is None else weights / weights.sum()
    stacked = torch.stack([lp.float() for lp in member_log_probs])
    shape = (k,) + (1,) * (stacked.dim() - 1)
    w = w.to(stacked.device).view(shape)
    if mode == "prob":
        return torch.logsumexp(stacked + torch.log(w), dim=0)
    if mode == "logit":
        return F.log_softmax((stacked * w).sum(0), dim=-1)
    raise DataeffError(f"ensemble: combine mode {mode!r} is not 'prob' or 'logit'")


class Ensemble:
    """Members sharing one tokenizer; ``log_probs`` runs them in turn, so only their outputs are held at once."""

    def __init__(self, members: Sequence[Transformer], mode: Combine = "prob", weights: torch.Tensor | None = None,
                 names: Sequence[str] | None = None):
        if not members:
            raise DataeffError("ensemble: no members")
        names = list(names) if names is not None else [f"member {i}" for i in range(len(members))]
        vocab = members[0].cfg.vocab_size
        for name, m in zip(names, members, strict=True):
            if m.cfg.vocab_size != vocab:
                raise DataeffError(f"ensemble: {name} has vocabulary {m.cfg.vocab_size}, the first member {vocab}")
        if weights is not None and (problem := _weights_problem(weights.tolist(), len(members))):
            raise DataeffError(f"ensemble: {problem}")
        self.members, self.mode, self.weights, self.names = list(members), mode, weights, names

    @classmethod
    def from_spec(cls, spec: EnsembleSpec, mode: Combine | None = None, device: str = "cpu") -> Ensemble:
        """The saved ensemble ``spec`` loaded, combined by ``mode`` (default: the spec's)."""
        return load_ensemble(spec, mode, device)

    @property
    def seq_len(self) -> int:
        return min(m.cfg.seq_len for m in self.members)

    @property
    def vocab_size(self) -> int:
        return self.members[0].cfg.vocab_size

    @torch.no_grad()
    def log_probs(self, idx: torch.Tensor) -> torch.Tensor:
        outs = [F.log_softmax(m(idx).float(), dim=-1) for m in self.members]
        return combine_log_probs(outs, self.mode, self.weights)

    def __len__(self) -> int:
        return len(self.members)


def ensemble_nll(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood (nats) from combined log-probabilities."""
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------
# the saved ensemble


@dataclass
class EnsembleSpec:
    """A saved ensemble. Prefix ensembles are its first k members, so their order matters."""

    name: str
    members: list[str]  # run directories
    combine: Combine = "prob"
    weights: list[float] | None = None  # for the probability mixture or the logit average; None: uniform

    def __post_init__(self) -> None:
        self.members = [str(m) if isinstance(m, Path) else m for m in self.members]
        if self.weights is not None:
            self.weights = list(self.weights)
        if problem := _spec_problem(self.name, self.members, self.combine, self.weights):
            raise DataeffError(f"ensemble {self.name!r}: {problem}")
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]


def _weights_problem(weights: Sequence[Any], n_members: int) -> str | None:
    if len(weights) != n_members:
        return f"field 'weights': {len(weights)} weights for {n_members} members"
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            return f"field 'weights[{i}]': {w!r} is not a finite number >= 0"
    if sum(weights) <= 0:
        return "field 'weights': the weights sum to 0; at least one must be positive"
    return None


def _spec_problem(name: Any, members: Any, combine: Any, weights: Any) -> str | None:
    """What is wrong with these spec fields (as ``field 'x': ...``), or None."""
    if not isinstance(name, str):
        return f"field 'name': {name!r} is not a string"
    if not isinstance(members, list) or not members:
        return f"field 'members': {members!r} is not a non-empty list of run directories"
    for i, m in enumerate(members):
        if not isinstance(m, str) or not m:
            return f"field 'members[{i}]': {m!r} is not a run directory path"
    if combine not in ("prob", "logit"):
        return f"field 'combine': {combine!r} is not 'prob' or 'logit'"
    if weights is not None:
        if not isinstance(weights, list):
            return f"field 'weights': {weights!r} is not a list of numbers or null"
        return _weights_problem(weights, len(members))
    return None


def _spec_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".json" else path / ENSEMBLE_FILE


def save_ensemble(spec: EnsembleSpec, path: str | Path) -> Path:
    """Write ``spec`` atomically to ``path`` (a ``.json`` file, or a directory to hold ``ensemble.json``).

    Returns the file written. Member paths are stored exactly as the spec gives them.
    """
    path = _spec_path(path)
    atomic_write_json(path, {"version": _SPEC_VERSION, "name": spec.name, "members": list(spec.members),
                             "combine": spec.combine, "weights": spec.weights})
    return path


def read_ensemble(path: str | Path) -> EnsembleSpec:
    """The spec saved at ``path`` (an ``ensemble.json``, or a directory holding one).

    Member paths come back as stored; relative ones resolve against the current working directory when used.
    """
    path = _spec_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataeffError(f"{path}: no such ensemble file (give an ensemble.json or a list of run directories)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataeffError(f"{path}: unreadable ensemble file ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataeffError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, dict):
        raise DataeffError(f"{path}: expected a JSON object with {', '.join(_SPEC_FIELDS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - {*_SPEC_FIELDS, "version"})
    if unknown:
        raise DataeffError(f"{path}: unknown field {unknown[0]!r} (an ensemble file has {', '.join(_SPEC_FIELDS)})")
    if data.get("version", _SPEC_VERSION) != _SPEC_VERSION:
        raise DataeffError(f"{path}: field 'version': {data['version']!r} is not {_SPEC_VERSION}, the version this "
                           "dataeff reads")
    for key in ("name", "members"):
        if key not in data:
            raise DataeffError(f"{path}: missing field {key!r}")
    fields = {"combine": "prob", "weights": None} | {k: data[k] for k in _SPEC_FIELDS if k in data}
    if problem := _spec_problem(**fields):
        raise DataeffError(f"{path}: {problem}")
    return EnsembleSpec(**fields)


EnsembleSource = Sequence[str | Path] | str | Path | EnsembleSpec


def resolve_members(source: EnsembleSource) -> tuple[list[str], EnsembleSpec | None]:
    """(member run directories, the saved spec if ``source`` is one).

    ``source`` is a spec, the path of an ``ensemble.json`` (or of a directory holding one), a list of run
    directories, or a list of one ``.json`` path (how a ``members=`` config field passes a saved ensemble).
    """
    if isinstance(source, EnsembleSpec):
        spec: EnsembleSpec | None = source
    elif isinstance(source, str | Path):
        spec = read_ensemble(source)
    elif len(source) == 1 and str(source[0]).endswith(".json"):
        spec = read_ensemble(source[0])
    else:
        if not source:
            raise DataeffError("ensemble: no member run directories given")
        return [str(m) for m in source], None
    return list(spec.members), spec


@dataclass(frozen=True)
class _Member:
    name: str
    path: Path
    cfg: ModelConfig


@contextlib.contextmanager
def _naming(name: str) -> Iterator[None]:
    """Prefix a failure with the member it concerns: the inner message names a file, not its role."""
    try:
        yield
    except DataeffError as e:
        raise DataeffError(f"ensemble member {name}: {e}") from None


def _inspect_members(names: Sequence[str]) -> list[_Member]:
    """Check every member before any is loaded: run directory, manifest, tokenizer, vocabulary and the
    safetensors header (which catches truncated files) — so a bad member fails fast, before hours of work."""
    first_tok_path = Path(names[0]) / "tokenizer.json"
    first_tok = first_tok_path.read_bytes() if first_tok_path.exists() else None
    members: list[_Member] = []
    for name in names:
        path = Path(name)
        if not path.is_dir():
            raise DataeffError(f"ensemble member {name}: no such run directory")
        tok = path / "tokenizer.json"
        if first_tok is not None and (not tok.exists() or tok.read_bytes() != first_tok):
            raise DataeffError(f"ensemble member {name}: uses a different tokenizer than {names[0]}")
        with _naming(name):
            cfg = model_config(path)
            weights = path / "model.safetensors"
            if not weights.exists():
                raise DataeffError(f"{weights}: not found (is the run finished? `dataeff train` resumes it)")
            try:
                with safe_open(str(weights), framework="pt"):
                    pass
            except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
                raise DataeffError(f"{weights}: corrupt or unreadable safetensors file ({type(e).__name__}: {e})") from None
        if members and cfg.vocab_size != members[0].cfg.vocab_size:
            raise DataeffError(f"ensemble member {name}: has vocabulary {cfg.vocab_size}, the first member "
                               f"{names[0]} {members[0].cfg.vocab_size}")
        members.append(_Member(name, path, cfg))
    return members


def _load(member: _Member, device: str) -> Transformer:
    with _naming(member.name):
        return load_model(member.path, device=device)


def load_ensemble(source: EnsembleSource, mode: Combine | None = None, device: str = "cpu") -> Ensemble:
    """An ensemble of finished runs, from a list of run directories or a saved ensemble (see
    :func:`resolve_members`), combined by ``mode`` (default: a saved ensemble's, else ``prob``) with a saved
    ensemble's weights. Refuses, naming the member, one whose tokenizer or vocabulary differs from the first's
    or whose run directory or weights are missing or corrupt."""
    names, spec = resolve_members(source)
    members = _inspect_members(names)
    weights = None if spec is None or spec.weights is None else torch.tensor(spec.weights, dtype=torch.float32)
    combine: Combine = mode or (spec.combine if spec is not None else "prob")
    return Ensemble([_load(m, device) for m in members], combine, weights, names=names)


# ---------------------------------------------------------------------------------------------------------
# evaluation


@dataclass(frozen=True)
class EnsembleEvaluation:
    """One split scored by each member alone and by every prefix ensemble (the first k members)."""

    names: list[str]  # member run directories, in order
    k: list[int]  # 1..K; prob[i] and logit[i] are the ensembles of the first k[i] members
    members: list[EvalResult]
    prob: list[EvalResult] | None  # uniform probability averaging (None: mode not requested)
    logit: list[EvalResult] | None  # uniform logit averaging
    weighted: EvalResult | None  # probability mixture of all K members with ``weights``
    weights: list[float] | None  # normalised to sum 1
    weights_learned: bool  # True: fitted on the fitness split; False: given by the caller or the saved ensemble

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: every result as ``{loss, bpb, word_ppl, tokens}``, lists in the order of ``k``."""
        def many(rs: list[EvalResult] | None) -> list[dict[str, float]] | None:
            return None if rs is None else [r.to_dict() for r in rs]

        return {
            "names": list(self.names), "k": list(self.k), "members": many(self.members),
            "prob": many(self.prob), "logit": many(self.logit),
            "weighted": None if self.weighted is None else self.weighted.to_dict(),
            "weights": None if self.weights is None else list(self.weights), "weights_learned": self.weights_learned,
        }


def mixture_weights(log_probs: np.ndarray, *, tol: float = WEIGHTS_TOL,
                    max_iters: int = WEIGHTS_MAX_ITERS) -> np.ndarray:
    """Weights on the simplex maximising ``Σ_t log Σ_i w_i p_i(t)``, from members' target log-probs ``(K, T)``.

    The EM update ``w_i ← w_i·g_i``, ``g_i = mean_t p_i(t) / Σ_j w_j p_j(t)``, never lowers the likelihood
    of this concave problem, and by Jensen the mean log-likelihood is within ``log max_i g_i`` of the optimum:
    iteration stops once that certificate is below ``tol`` (or after ``max_iters``).
    """
    k, t = log_probs.shape
    # Probabilities relative to each token's best member: the ratios EM needs, without underflow.
    p = np.exp(log_probs - log_probs.max(axis=0))
    w = np.full(k, 1.0 / k)
    for _ in range(max_iters):
        # A member whose weight underflowed to 0 could leave a token with no mass; keep the division finite.
        g = p @ (1.0 / np.maximum(w @ p, np.finfo(np.float64).tiny)) / t
        if math.log(g.max()) < tol:
            break
        w = w * g
        w /= w.sum()
    return w


def _mixture_nats(log_probs: np.ndarray, weights: np.ndarray) -> float:
    """Summed NLL of the probability mixture of ``(K, T)`` target log-probs with normalised ``weights``."""
    with np.errstate(divide="ignore"):  # a zero weight is a log-weight of -inf, which logsumexp handles
        log_w = np.log(weights)
    return float(-logsumexp(log_probs + log_w[:, None], axis=0).sum())


@dataclass
class _Windows:
    """A split's evaluation batches, built once and kept so that every member scores the same tensors;
    ``offsets[b]`` is batch b's first target in the flat order of the split's scored tokens."""

    split: TokenSplit
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    offsets: list[int]

    @property
    def n(self) -> int:
        return self.offsets[-1]

    def result(self, nats: float) -> EvalResult:
        s = self.split
        return summarize(float(nats), self.n, s.n_tokens, s.n_bytes, s.n_words)


def _windows(split: TokenSplit, seq_len: int, batch_size: int, max_tokens: int | None, device: torch.device,
             vocab: int) -> _Windows:
    if split.n_tokens and int(np.max(split.tokens)) >= vocab:
        raise DataeffError(f"split {split.name!r}: token id {int(np.max(split.tokens))} is outside the members' "
                           f"vocabulary of {vocab}")
    cached = [(x.to(device), y.to(device)) for x, y in batches(split.tokens, seq_len, batch_size, max_tokens)]
    if not cached:
        raise DataeffError(f"split {split.name!r}: no tokens to score (it holds {split.n_tokens})")
    return _Windows(split, cached, np.cumsum([0] + [y.numel() for _, y in cached]).tolist())


def _forward(model: Transformer, x: torch.Tensor, y: torch.Tensor, dtype: str) -> tuple[torch.Tensor, np.ndarray]:
    """(fp32 logits, float64 target log-probs flattened): the same computation as :func:`evaluate.token_nll`."""
    with autocast(x.device, dtype):
        logits = model(x)
    logits = logits.float()
    nll = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
    return logits, -nll.double().reshape(-1).cpu().numpy()


def _add_logit(total: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """Add the k-th member's log-probabilities to the running sum ``total`` (rows, V) in place; return the
    summed nats of the logit average of the first k members."""
    lp = F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
    if k == 1:
        total.copy_(lp)
    else:
        total.add_(lp)
    return float(F.cross_entropy(total / k, y.reshape(-1), reduction="none").double().sum())


@contextlib.contextmanager
def _running_sum(rows: int, vocab: int) -> Iterator[np.ndarray]:
    """A float32 ``(rows, vocab)`` array: in memory, or above :data:`SPILL_BYTES` a memmap in a temporary
    directory removed afterwards."""
    if rows * vocab * 4 <= SPILL_BYTES:
        yield np.empty((rows, vocab), dtype=np.float32)
        return
    with tempfile.TemporaryDirectory(prefix="dataeff-ensemble-") as tmp:
        yield np.memmap(Path(tmp) / "log_prob_sums.f32", dtype=np.float32, mode="w+", shape=(rows, vocab))


def evaluate_ensemble(
    members: EnsembleSource,
    split: TokenSplit,
    *,
    fitness: TokenSplit | None = None,
    modes: Sequence[Combine] = ("prob", "logit"),
    weights: Sequence[float] | None = None,
    seq_len: int | None = None,
    batch_size: int = 16,
    max_tokens: int | None = None,
    dtype: Literal["auto", "bf16", "fp32"] = "auto",
    device: str = "cpu",
    resident: bool | None = None,
    progress: bool = False,
) -> EnsembleEvaluation:
    """Score ``split`` by every member and every prefix ensemble, in one pass over the members.

    ``members`` is a list of run directories or a saved ensemble (see :func:`resolve_members`). Windows and
    metrics are those of :func:`dataeff.evaluate.evaluate` (at most ``max_tokens`` of each split), so the
    one-member ensemble scores as :func:`~dataeff.evaluate.evaluate` does. ``modes`` picks the prefix curves
    computed; logit averaging keeps a running float32 sum of full-vocabulary log-probabilities, which
    probability averaging never needs. The weighted probability mixture of all K members uses ``weights``
    (default: a saved ensemble's), else weights learned on ``fitness`` (a split disjoint from ``split``),
    else is skipped.

    ``resident=True`` loads every member and runs them batch by batch; ``False`` loads one member at a time
    and keeps the running sum (spilled to a temporary file above :data:`SPILL_BYTES`); ``None`` picks
    resident when the members' weights fit in :data:`RESIDENT_BYTES`. Both give identical numbers; resident
    measured a few percent faster in ``bench/ensemble_eval.py``.
    """
    names, spec = resolve_members(members)
    if weights is None and spec is not None:
        weights = spec.weights
    for mode in modes:
        if mode not in ("prob", "logit"):
            raise DataeffError(f"evaluate_ensemble: mode {mode!r} is not 'prob' or 'logit'")
    if dtype not in ("auto", "bf16", "fp32"):
        raise DataeffError(f"evaluate_ensemble: dtype {dtype!r} is not 'auto', 'bf16' or 'fp32'")
    if batch_size < 1:
        raise DataeffError(f"evaluate_ensemble: batch_size {batch_size} must be at least 1")
    infos = _inspect_members(names)
    n_members = len(infos)
    given = None
    if weights is not None:
        if problem := _weights_problem(list(weights), n_members):
            raise DataeffError(f"evaluate_ensemble: {problem}")
        given = np.asarray(weights, dtype=np.float64) / sum(weights)
    context = min(m.cfg.seq_len for m in infos)
    seq_len = context if seq_len is None else seq_len
    if not 1 <= seq_len <= context:
        raise DataeffError(f"evaluate_ensemble: seq_len {seq_len} must be in 1..{context}, the shortest member context")
    dev = pick_device(device)
    vocab = infos[0].cfg.vocab_size
    scored = _windows(split, seq_len, batch_size, max_tokens, dev, vocab)
    fit = _windows(fitness, seq_len, batch_size, max_tokens, dev, vocab) if fitness is not None and given is None else None
    logit = "logit" in modes
    if resident is None:
        # load_model builds fp32 parameters: 4 bytes each.
        resident = sum(4 * count_parameters(m.cfg)["total"] for m in infos) <= RESIDENT_BYTES

    target = np.empty((n_members, scored.n))
    parts = [(scored, target)]
    fit_target: np.ndarray | None = None
    if fit is not None:
        fit_target = np.empty((n_members, fit.n))
        parts.append((fit, fit_target))
    logit_nats = np.zeros(n_members)
    work = n_members * sum(len(w.batches) for w, _ in parts)
    with torch.inference_mode(), tqdm(total=work, desc="ensemble", unit="batch", disable=not progress) as bar:
        if resident:
            models = [_load(m, str(dev)) for m in infos]
            for windows, out in parts:
                for b, (x, y) in enumerate(windows.batches):
                    lo, hi = windows.offsets[b], windows.offsets[b + 1]
                    total = torch.empty(hi - lo, vocab, device=dev) if logit and windows is scored else None
                    for i, model in enumerate(models):
                        logits, out[i, lo:hi] = _forward(model, x, y, dtype)
                        if total is not None:
                            logit_nats[i] += _add_logit(total, logits, y, i + 1)
                        bar.update()
        else:
            with _running_sum(scored.n, vocab) if logit else contextlib.nullcontext() as sums:
                for i, member in enumerate(infos):
                    model = _load(member, str(dev))
                    for windows, out in parts:
                        for b, (x, y) in enumerate(windows.batches):
                            lo, hi = windows.offsets[b], windows.offsets[b + 1]
                            logits, out[i, lo:hi] = _forward(model, x, y, dtype)
                            if sums is not None and windows is scored:
                                total = torch.from_numpy(sums[lo:hi]).to(dev)
                                logit_nats[i] += _add_logit(total, logits, y, i + 1)
                                if dev.type != "cpu":  # from_numpy shares the array's memory only on the CPU
                                    sums[lo:hi] = total.cpu().numpy()
                            bar.update()
                    del model  # before the next member loads: one member resident at a time

    prob = None
    if "prob" in modes:
        prob = []
        mixture = target[0].copy()  # log Σ_{i<k} p_i(y_t), grown one member at a time
        for k in range(1, n_members + 1):
            if k > 1:
                np.logaddexp(mixture, target[k - 1], out=mixture)
            prob.append(scored.result(-(mixture - math.log(k)).sum()))
    w = given if fit_target is None else mixture_weights(fit_target)
    return EnsembleEvaluation(
        names=names,
        k=list(range(1, n_members + 1)),
        members=[scored.result(-target[i].sum()) for i in range(n_members)],
        prob=prob,
        logit=[scored.result(n) for n in logit_nats] if logit else None,
        weighted=None if w is None else scored.result(_mixture_nats(target, w)),
        weights=None if w is None else w.tolist(),
        weights_learned=fit_target is not None,
    )
