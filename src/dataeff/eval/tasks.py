"""Downstream evaluation by log-likelihood: ARC, PIQA, HellaSwag, BLiMP, LAMBADA and closed-book QuALITY
(:mod:`dataeff.eval.quality`), read from the shared data directory, scored by a model or an ensemble without
generating any text.

Conventions shared with :mod:`dataeff.lm_eval_adapter`, so both give the same numbers on the same items:

- Every request starts with the end-of-document token: the token store puts one before every document but the
  first, so text after it reads as the start of a document, as in training. (lm-eval's HF backend prefixes its
  BOS/EOS only to an empty context; here an empty context is that case and needs no special rule.)
- Context and continuation are encoded separately and concatenated, after moving trailing whitespace of the
  context to the continuation (as lm-eval does). Multiple-choice answers and LAMBADA's word are scored as
  continuations with a leading space (lm-eval's default ``target_delimiter``); BLiMP sentences without one, as
  a document's first words are tokenized in training. For byte-level BPE and word-level tokenizers, whose
  pre-tokenizers split before a space, this equals lm-eval's encode-whole-then-split.
- When context + continuation exceed the model's context, the context loses its start; the continuation is
  always scored whole. One longer than the context itself is scored in consecutive windows, every token still
  seeing up to ``seq_len`` tokens before it (as lm-eval's rolling log-likelihood does for long documents).
"""

from __future__ import annotations

import bz2
import difflib
import math
import re
import zipfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataeff.config import option
from dataeff.data.corpora import data_root
from dataeff.data.tokenizer import Tokenizer
from dataeff.errors import DataeffError
from dataeff.eval.ensemble import Ensemble, load_ensemble
from dataeff.eval.quality import QAItem, accuracy, read_quality, split_items
from dataeff.fsutil import atomic_write_json, json_records
from dataeff.model.transformer import Transformer
from dataeff.train.dist import pick_device
from dataeff.train.rundir import load_model

# ---------------------------------------------------------------------------------------------------------
# items


@dataclass
class MCItem:
    """Pick one of ``choices`` (each scored as ``" " + choice`` after ``context``); ``gold`` is the answer."""

    context: str
    choices: list[str]
    gold: int


@dataclass
class PairItem:
    """A BLiMP minimal pair: the model should give ``good`` a strictly higher probability than ``bad``."""

    good: str
    bad: str
    paradigm: str


@dataclass
class ClozeItem:
    """Predict the word ``target`` (scored as ``" " + target``) after ``context``."""

    context: str
    target: str


Item = MCItem | PairItem | ClozeItem | QAItem

TARGET_DELIMITER = " "
QUALITY_FILE = Path("quality_leval_subset") / "quality.jsonl"

# ---------------------------------------------------------------------------------------------------------
# readers


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataeffError(f"{path}: no such file") from None


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataeffError(f"{where}:{line}: not valid UTF-8 ({e.reason})") from None


def _text(record: dict[str, Any], key: str, where: str) -> str:
    if key not in record:
        raise DataeffError(f"{where}: missing field '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise DataeffError(f"{where}: field '{key}' is {type(value).__name__}, expected a string")
    if not value.strip():
        raise DataeffError(f"{where}: field '{key}' is empty")
    return value


def _label(value: Any, n: int, key: str, where: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise DataeffError(f"{where}: field '{key}' is {value!r}, expected an index 0-{n - 1}")
    return value


def read_arc(path: str | Path) -> list[MCItem]:
    """llm-foundry's ARC jsonl: ``query`` ("Question: ..."), ``choices`` and ``gold``, in lm-eval's prompt."""
    path = Path(path)
    items = []
    for where, record in json_records(_decode(_read_bytes(path), str(path)), str(path)):
        query = _text(record, "query", where)
        choices = record.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise DataeffError(f"{where}: field 'choices' must be a list of at least two non-empty strings")
        items.append(MCItem(f"{query}\nAnswer:", choices, _label(record.get("gold"), len(choices), "gold", where)))
    return items


def read_piqa(path: str | Path, labels: str | Path) -> list[MCItem]:
    """PIQA's ``goal``/``sol1``/``sol2`` jsonl with its labels file (one 0/1 per line), in lm-eval's prompt."""
    path, labels = Path(path), Path(labels)
    records = list(json_records(_decode(_read_bytes(path), str(path)), str(path)))
    golds = [(f"{labels}:{i}", line) for i, line in enumerate(_decode(_read_bytes(labels), str(labels)).split("\n"), 1)
             if line.strip()]
    if len(golds) != len(records):
        raise DataeffError(f"{labels}: {len(golds)} labels for the {len(records)} questions of {path}")
    return [
        MCItem(f"Question: {_text(record, 'goal', where)}\nAnswer:",
               [_text(record, "sol1", where), _text(record, "sol2", where)], _label(gold, 2, "label", label_where))
        for (where, record), (label_where, gold) in zip(records, golds, strict=True)
    ]


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: WikiHow's bracketed markers out, double spaces collapsed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _capitalize_ctx_b(ctx: str) -> str:
    # lm-eval builds the context as ctx_a + " " + ctx_b.capitalize(); this file keeps only the joined, lowercase
    # ctx, whose ctx_b (ActivityNet's next-sentence start) is the fragment after the last ". ".
    head, sep, tail = ctx.rpartition(". ")
    return head + sep + tail[0].upper() + tail[1:] if sep and tail[:1].islower() else ctx


def read_hellaswag(path: str | Path) -> list[MCItem]:
    """The 6-lines-per-item text layout (``label: ctx``, gold index, four endings), bz2-compressed."""
    path = Path(path)
    try:
        raw = bz2.decompress(_read_bytes(path))
    except (OSError, EOFError, ValueError) as e:
        raise DataeffError(f"{path}: not a readable bz2 file ({e})") from None
    lines = _decode(raw, str(path)).split("\n")
    if lines and not lines[-1]:
        lines.pop()
    if len(lines) % 6:
        raise DataeffError(f"{path}:{len(lines) - len(lines) % 6 + 1}: incomplete item (6 lines per item)")
    items = []
    for start in range(0, len(lines), 6):
        ctx, gold, *endings = lines[start : start + 6]
        empty = next((offset for offset, text in enumerate(lines[start : start + 6]) if not text.strip()), None)
        if empty is not None:
            raise DataeffError(f"{path}:{start + empty + 1}: empty line inside an item (6 lines per item)")
        items.append(MCItem(_hellaswag_clean(_capitalize_ctx_b(ctx)), [_hellaswag_clean(e) for e in endings],
                            _label(gold, 4, "label", f"{path}:{start + 2}")))
    return items


def read_blimp(path: str | Path) -> list[PairItem]:
    """BLiMP.zip's ``data/<paradigm>.jsonl`` members, read in place (macOS metadata entries are skipped)."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise DataeffError(f"{path}: no such file") from None
    except zipfile.BadZipFile as e:
        raise DataeffError(f"{path}: not a readable zip file ({e})") from None
    with archive:
        members = sorted(
            n for n in archive.namelist()
            if n.endswith(".jsonl") and not n.startswith("__MACOSX/") and not Path(n).name.startswith("._")
        )
        if not members:
            raise DataeffError(f"{path}: holds no .jsonl paradigm files")
        items = []
        for member in members:
            where = f"{path}:{member}"
            paradigm = Path(member).stem
            for loc, record in json_records(_decode(archive.read(member), where), where):
                items.append(PairItem(_text(record, "sentence_good", loc), _text(record, "sentence_bad", loc), paradigm))
    return items


def read_lambada(path: str | Path) -> list[ClozeItem]:
    """llm-foundry's LAMBADA jsonl: ``context`` and ``continuation`` (the passage's last word)."""
    path = Path(path)
    return [ClozeItem(_text(r, "context", where), _text(r, "continuation", where))
            for where, r in json_records(_decode(_read_bytes(path), str(path)), str(path))]


Kind = Literal["mc", "pairs", "cloze", "qa"]


@dataclass(frozen=True)
class TaskSpec:
    kind: Kind
    read: Callable[[Path], Sequence[Item]]  # given the data directory
    summary: str


TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("mc", lambda root: read_arc(root / "arc" / "arc_easy.jsonl"), "ARC-Easy test, 4 choices"),
    "arc_challenge": TaskSpec("mc", lambda root: read_arc(root / "arc" / "arc_challenge.jsonl"),
                              "ARC-Challenge test, 4 choices"),
    "piqa": TaskSpec("mc", lambda root: read_piqa(root / "piqa" / "valid.jsonl", root / "piqa" / "valid-labels.lst"),
                     "PIQA validation, 2 choices"),
    "hellaswag": TaskSpec("mc", lambda root: read_hellaswag(root / "hellaswag" / "hellaswag_val_full.txt.bz2"),
                          "HellaSwag validation, 4 endings"),
    "blimp": TaskSpec("pairs", lambda root: read_blimp(root / "blimp" / "BLiMP.zip"), "BLiMP, 67 paradigms of minimal pairs"),
    "lambada_openai": TaskSpec("cloze", lambda root: read_lambada(root / "lambada_openai" / "lambada_openai.jsonl"),
                               "LAMBADA (OpenAI) test, last word"),
    "quality": TaskSpec("qa", lambda root: split_items(read_quality(root / QUALITY_FILE), "test"),
                        "QuALITY closed-book, test articles (L-Eval's 15-article subset), 4 choices"),
    "quality_val": TaskSpec("qa", lambda root: split_items(read_quality(root / QUALITY_FILE), "validation"),
                            "QuALITY closed-book, validation articles (the first 20% by title), 4 choices"),
}


def subset(items: Sequence[Item], limit: int | None, seed: int | None = 0) -> list[Item]:
    """At most ``limit`` items in file order: a seeded random subset (``seed=None``: the first ``limit``).

    Random by default because files are sorted (BLiMP by paradigm), so their first items are not representative.
    """
    if limit is not None and limit < 1:
        raise DataeffError(f"limit: {limit} must be at least 1")
    if limit is None or limit >= len(items):
        return list(items)
    if seed is None:
        return list(items[:limit])
    keep = np.sort(np.random.default_rng(seed).choice(len(items), size=limit, replace=False))
    return [items[i] for i in keep]


def check_task(name: str) -> None:
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataeffError(f"tasks: unknown task {name!r}{hint}; choose from {', '.join(TASKS)}")


def load_task(name: str, root: str | Path | None = None, limit: int | None = None, seed: int | None = 0) -> list[Item]:
    """The items of a task in :data:`TASKS`, from ``root`` (default: ``$DATAEFF_DATA_DIR``)."""
    check_task(name)
    if root is None:
        root = data_root()
    return subset(TASKS[name].read(Path(root)), limit, seed)


# ---------------------------------------------------------------------------------------------------------
# scoring


class LogProbFn(Protocol):
    """Per-token log-probabilities ``(batch, time, vocab)`` of the next token, for token ids ``(batch, time)``."""

    seq_len: int

    def __call__(self, idx: torch.Tensor) -> torch.Tensor: ...


class ModelLogProbs:
    def __init__(self, model: Transformer):
        self.model = model.eval()
        self.seq_len = model.cfg.seq_len
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.model(idx.to(self.device)).float(), dim=-1)


class EnsembleLogProbs:
    """The ensemble's combined log-probabilities (by probability or logit averaging, as it was built)."""

    def __init__(self, ensemble: Ensemble):
        self.ensemble = ensemble
        for m in ensemble.members:
            m.eval()
        self.seq_len = ensemble.seq_len
        self.device = next(ensemble.members[0].parameters()).device

    @torch.inference_mode()
    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.ensemble.log_probs(idx.to(self.device))


def log_prob_fn(model: Transformer | Ensemble) -> LogProbFn:
    return EnsembleLogProbs(model) if isinstance(model, Ensemble) else ModelLogProbs(model)


Request = tuple[Sequence[int], Sequence[int]]


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids of (context, continuation) text pairs, the context after an end-of-document token."""
    contexts, continuations = [], []
    for context, continuation in pairs:
        stripped = context.rstrip()
        contexts.append(stripped)
        continuations.append(context[len(stripped) :] + continuation)
    return [([tokenizer.eos_id, *c], k) for c, k in
            zip(tokenizer.encode_batch(contexts), tokenizer.encode_batch(continuations), strict=True)]


def score_requests(fn: LogProbFn, requests: Sequence[Request], batch_size: int = 32,
                   progress: bool = False) -> list[tuple[float, bool]]:
    """(log-likelihood of the continuation given the context, whether greedy decoding yields it) per request.

    Each request becomes windows of at most ``seq_len`` inputs whose last outputs predict the continuation
    (one window unless the continuation is longer than the context). Windows are batched longest first, so a
    batch holds similar lengths and padding (on the right, unseen by the causal model) is small.
    """
    if batch_size < 1:
        raise DataeffError(f"batch_size: {batch_size} must be at least 1")
    windows: list[tuple[list[int], list[int]]] = []
    owners = []
    for i, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise DataeffError(f"request {i}: the context and the continuation must each have at least one token")
        whole = [*context, *continuation]
        for start in range(len(context), len(whole), fn.seq_len):
            end = min(start + fn.seq_len, len(whole))
            windows.append((whole[max(0, end - 1 - fn.seq_len) : end - 1], whole[start:end]))
            owners.append(i)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    totals, greedy = [0.0] * len(requests), [True] * len(requests)
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", disable=not progress):
        batch = order[start : start + batch_size]
        idx = torch.zeros(len(batch), len(windows[batch[0]][0]), dtype=torch.long)
        for row, i in enumerate(batch):
            idx[row, : len(windows[i][0])] = torch.tensor(windows[i][0])
        log_probs = fn(idx)
        for row, i in enumerate(batch):
            inputs, targets = windows[i]
            target = torch.tensor(targets, device=log_probs.device)
            lp = log_probs[row, len(inputs) - len(targets) : len(inputs)]
            totals[owners[i]] += lp.gather(-1, target[:, None]).sum().item()
            greedy[owners[i]] &= bool((lp.argmax(-1) == target).all())
    return list(zip(totals, greedy, strict=True))


# ---------------------------------------------------------------------------------------------------------
# metrics


def _mean(name: str, values: Sequence[float]) -> dict[str, float | None]:
    """The mean and its standard error (lm-eval's sample stderr; null for one item), as ``name``, ``name_stderr``."""
    v = np.asarray(values, dtype=np.float64)
    stderr = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return {name: float(v.mean()), f"{name}_stderr": stderr}


def _check_items(items: Sequence[Item], kind: type) -> None:
    if not items:
        raise DataeffError("tasks: no items to evaluate")
    bad = next((it for it in items if not isinstance(it, kind)), None)
    if bad is not None:
        raise DataeffError(f"tasks: expected {kind.__name__} items, got a {type(bad).__name__}")


def evaluate_mc(fn: LogProbFn, tokenizer: Tokenizer, items: Sequence[MCItem], batch_size: int = 32,
                progress: bool = False) -> dict[str, Any]:
    """Accuracy by total log-likelihood, and ``acc_norm`` by log-likelihood per UTF-8 byte of the answer.

    lm-eval's acc_norm divides by characters (its byte version is ``acc_bytes``); the two agree on ASCII.
    """
    _check_items(items, MCItem)
    requests = [(it.context, TARGET_DELIMITER + c) for it in items for c in it.choices]
    scores = iter(score_requests(fn, encode_pairs(tokenizer, requests), batch_size, progress))
    acc, acc_norm = [], []
    for it in items:
        lls = np.array([next(scores)[0] for _ in it.choices])
        n_bytes = np.array([len(c.encode("utf-8")) for c in it.choices])
        acc.append(float(np.argmax(lls) == it.gold))
        acc_norm.append(float(np.argmax(lls / n_bytes) == it.gold))
    return {"n": len(items), "chance": float(np.mean([1 / len(it.choices) for it in items])),
            **_mean("acc", acc), **_mean("acc_norm", acc_norm)}


def evaluate_qa(fn: LogProbFn, tokenizer: Tokenizer, items: Sequence[QAItem], batch_size: int = 32,
                progress: bool = False) -> dict[str, Any]:
    """QuALITY by answer log-likelihood: accuracy (and acc_norm, per answer byte) with 95% bootstrap intervals
    over questions, and the number of articles they come from."""
    _check_items(items, QAItem)
    requests = [(it.context, TARGET_DELIMITER + o) for it in items for o in it.options]
    scores = iter(score_requests(fn, encode_pairs(tokenizer, requests), batch_size, progress))
    acc, acc_norm = [], []
    for it in items:
        lls = np.array([next(scores)[0] for _ in it.options])
        n_bytes = np.array([len(o.encode("utf-8")) for o in it.options])
        acc.append(float(np.argmax(lls) == it.gold))
        acc_norm.append(float(np.argmax(lls / n_bytes) == it.gold))
    return {"n": len(items), "articles": len({it.article for it in items}),
            "chance": float(np.mean([1 / len(it.options) for it in items])),
            **accuracy(np.array(acc)), **accuracy(np.array(acc_norm), "acc_norm")}


def evaluate_pairs(fn: LogProbFn, tokenizer: Tokenizer, items: Sequence[PairItem], batch_size: int = 32,
                   progress: bool = False) -> dict[str, Any]:
    """BLiMP accuracy over all pairs and per paradigm, by whole-sentence log-probability after end-of-document.

    A tie counts as wrong (lm-eval's argmax counts it right), so a model that cannot tell the sentences apart
    scores 0, not 1. BLiMP itself holds 7 pairs of identical sentences (passive_1, principle_A_case_2), which
    every model gets wrong: the best possible overall accuracy is 66993/67000.
    """
    _check_items(items, PairItem)
    requests = [("", s) for it in items for s in (it.good, it.bad)]
    scores = score_requests(fn, encode_pairs(tokenizer, requests), batch_size, progress)
    correct = [float(scores[2 * i][0] > scores[2 * i + 1][0]) for i in range(len(items))]
    by_paradigm: dict[str, list[float]] = defaultdict(list)
    for it, c in zip(items, correct, strict=True):
        by_paradigm[it.paradigm].append(c)
    return {"n": len(items), "chance": 0.5, **_mean("acc", correct),
            "paradigms": {p: float(np.mean(v)) for p, v in sorted(by_paradigm.items())}}


def evaluate_cloze(fn: LogProbFn, tokenizer: Tokenizer, items: Sequence[ClozeItem], batch_size: int = 32,
                   progress: bool = False) -> dict[str, Any]:
    """Accuracy of greedy prediction (every token of the word is the argmax) and lm-eval's perplexity.

    The perplexity is ``exp(-mean log p(word | context))``, per word rather than per token, as lm-eval reports
    for LAMBADA. Chance is 0: the word is open-vocabulary.
    """
    _check_items(items, ClozeItem)
    requests = [(it.context, TARGET_DELIMITER + it.target) for it in items]
    scores = score_requests(fn, encode_pairs(tokenizer, requests), batch_size, progress)
    return {"n": len(items), "chance": 0.0, **_mean("acc", [float(g) for _, g in scores]),
            "perplexity": math.exp(-float(np.mean([ll for ll, _ in scores])))}


_EVALUATORS: dict[Kind, Callable[..., dict[str, Any]]] = {
    "mc": evaluate_mc, "pairs": evaluate_pairs, "cloze": evaluate_cloze, "qa": evaluate_qa,
}


def evaluate_task(fn: LogProbFn, tokenizer: Tokenizer, name: str, items: Sequence[Item], batch_size: int = 32,
                  progress: bool = False) -> dict[str, Any]:
    """The metrics of one task of :data:`TASKS` on ``items`` (from :func:`load_task`)."""
    return _EVALUATORS[TASKS[name].kind](fn, tokenizer, items, batch_size, progress)


# ---------------------------------------------------------------------------------------------------------
# `dataeff tasks`


@dataclass
class TasksConfig:
    run_dir: str = option("", "the run directory to evaluate (or members= for an ensemble)")
    members: list[str] = option([], "run directories of an ensemble's members, or one ensemble.json, scored as one model")
    combine: Literal["prob", "logit"] | None = option(None, "how an ensemble combines members: prob or logit "
                                                            "averaging (default: an ensemble.json's mode, else prob)")
    tasks: list[str] = option(list(TASKS), "tasks to run: " + ", ".join(TASKS))
    limit: int | None = option(None, "at most this many items per task (default: all)", min=1)
    limit_seed: int | None = option(0, "seed of the random subset limit keeps, in file order (null: the first items)", min=0)
    batch_size: int = option(32, "sequences per forward pass", min=1)
    device: str = option("auto", "auto, cpu, cuda or mps")
    progress: bool = option(True, "show a progress bar per task")
    out: str | None = option(None, "also write the results as JSON to this file")


def run_tasks(cfg: TasksConfig) -> dict[str, Any]:
    """Every task of ``cfg.tasks`` on the run (or ensemble): metrics, item count and chance rate per task."""
    if bool(cfg.run_dir) == bool(cfg.members):
        raise DataeffError("tasks: give exactly one of a run directory (`dataeff tasks runs/abc`) and members=[run1,run2]")
    for name in cfg.tasks:
        check_task(name)
    device = str(pick_device(cfg.device))
    if cfg.members:
        ensemble = load_ensemble(cfg.members, cfg.combine, device)
        fn = log_prob_fn(ensemble)
        first = ensemble.names[0]
        model_desc: dict[str, Any] = {"members": ensemble.names, "combine": ensemble.mode}
    else:
        fn = log_prob_fn(load_model(cfg.run_dir, device=device))
        first = cfg.run_dir
        model_desc = {"run_dir": cfg.run_dir}
    tokenizer = Tokenizer.load(Path(first) / "tokenizer.json")
    results = {}
    for name in cfg.tasks:
        items = load_task(name, limit=cfg.limit, seed=cfg.limit_seed)
        results[name] = evaluate_task(fn, tokenizer, name, items, cfg.batch_size, cfg.progress)
    out = {**model_desc, "limit": cfg.limit, "limit_seed": cfg.limit_seed, "tasks": results}
    if cfg.out:
        atomic_write_json(cfg.out, out)
    return out


def tasks_job(cfg: TasksConfig, out_dir: Path) -> dict[str, Any]:
    """The executor's job of scoring tasks: the results become the job's DONE metrics."""
    return run_tasks(cfg)
