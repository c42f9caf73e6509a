"""``dataeff cpt``: continued pretraining of a trained model on a corpus (raw documents, EntiGraph or rephrase
output), as the EntiGraph paper runs it: warmup then cosine decay at a small peak learning rate, a few epochs,
replay of a general corpus at a per-sequence rate, the corpus subsampled to a token count for scaling curves.

It is a thin layer over ordinary runs: each seed is a :class:`RunConfig` with ``train.init_from`` set to the
base, trained by the executor (so resumption, DDP, averaging and the run identity carry over), K seeds form an
ensemble with the ensemble machinery, and finished runs export to Hugging Face format. Everything it can
refuse is refused before any training: an unsupported HF architecture, a tokenizer other than the base's, a
missing corpus or replay corpus.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dataeff.config import non_default, option, section
from dataeff.data.corpora import NAMED_CORPORA, data_root
from dataeff.errors import DataeffError
from dataeff.eval.ensemble import EnsembleSpec, save_ensemble
from dataeff.experiment.ensemble_train import score_ensemble
from dataeff.experiment.executor import ExecutorConfig, run_jobs
from dataeff.fsutil import atomic_write_json
from dataeff.model.hf import export_run, hf_config
from dataeff.train.config import RunConfig
from dataeff.train.identity import run_hash
from dataeff.train.init import resolve
from dataeff.train.loop import train
from dataeff.train.rundir import model_config


@dataclass
class CPTConfig:
    base: str = option("", "the model continued from: a dataeff run directory, or a local Hugging Face Llama/Qwen3 "
                           "checkpoint (hf:PATH or a directory holding config.json) (required)")
    corpus: str = option("", "the CPT corpus: a .jsonl (EntiGraph or rephrase output, or raw documents), .txt or "
                             ".parquet file or a directory of them (required)")
    text_field: str = option("text", "the text field of the corpus's .jsonl/.parquet records")
    tokens: int | None = option(None, "train on a subsample of the corpus of this many tokens (whole documents, "
                                      "seeded; one seed gives nested subsamples); null = all of it", min=1)
    subsample_seed: int = option(0, "seed of the subsample", min=0)
    val: str | None = option(None, "documents scored at every evaluation (e.g. the source articles, or a general "
                                   "corpus's validation text to watch forgetting); null = val_docs of the corpus "
                                   "held out")
    val_docs: int = option(1, "documents of the corpus held out for validation when val is null", min=1)
    epochs: float = option(2.0, "passes over the (subsampled) corpus", above=0.0)
    lr: float = option(5e-6, "peak learning rate", min=0.0)
    warmup: float = option(0.05, "linear warmup as a fraction of all steps, then cosine decay", min=0.0, max=1.0)
    min_lr_ratio: float = option(0.0, "final learning rate as a fraction of the peak", min=0.0, max=1.0)
    weight_decay: float = option(0.01, "decoupled weight decay (EntiGraph's code: 0.01)", min=0.0)
    replay: str | None = option(None, "a general corpus replayed during CPT: a named corpus or a file (null: none)")
    replay_rate: float = option(0.1, "share of sequences replaced by a random replay sequence (a seeded coin per "
                                     "sequence, as in EntiGraph's code)", above=0.0, below=1.0)
    replay_tokens: int | None = option(None, "tokens read from the replay corpus at most (default: all)", min=1)
    seq_len: int | None = option(None, "context length (default: the base's, at most 2048 as in the paper)", min=1)
    seeds: list[int] = option([0], "one run per seed (initial weights are the base's; the seed sets the data order, "
                                   "the replay coins and dropout); two or more form an ensemble")
    combine: Literal["prob", "logit"] = option("prob", "how ensemble.json combines the seeds' runs")
    export: bool = option(False, "export every finished run to Hugging Face format under OUT/hf/")
    out: str = option("runs/cpt", "directory of the runs, ensemble.json, the exports and cpt.json")
    run: RunConfig = section(RunConfig, "every other setting of the runs (batch, device, dtype, evaluation); the "
                                        "fields above set the rest")
    executor: ExecutorConfig = section(ExecutorConfig, "where and how the runs train")


# Fields of ``run`` that CPTConfig sets itself: giving them there would be silently overwritten.
_OWNED = {
    "data": {"corpus": "corpus", "text_field": "text_field", "train_tokens": "tokens", "budget_seed": "subsample_seed",
             "val_split": "val", "val_docs": "val_docs", "replay": "replay", "replay_rate": "replay_rate",
             "replay_tokens": "replay_tokens"},
    "optim": {"lr": "lr", "warmup": "warmup", "min_lr_ratio": "min_lr_ratio", "weight_decay": "weight_decay",
              "schedule": "warmup (CPT decays by cosine)"},
    "train": {"epochs": "epochs", "init_from": "base", "init_seed": "seeds", "data_seed": "seeds"},
    "model": {"seq_len": "seq_len"},
}


def _base_tokenizer(base: str) -> tuple[Path, int]:
    """(the base's tokenizer.json, its context length), after refusing a base that cannot be continued."""
    if not base:
        raise DataeffError("cpt.base: required (a dataeff run directory or a Hugging Face checkpoint directory)")
    if base == "scratch":
        raise DataeffError("cpt.base=scratch: continued pretraining starts from trained weights")
    try:
        source = resolve(base)
    except DataeffError:
        raise DataeffError(f"cpt.base={base}: not a dataeff run directory (with manifest.json) nor a Hugging Face "
                           "checkpoint directory (with config.json)") from None
    assert source.path is not None
    if source.kind == "hf":
        seq_len = int(hf_config(source.path).max_position_embeddings)
        if not source.weights:
            raise DataeffError(f"cpt.base={base}: holds no *.safetensors weights")
    else:
        if not source.weights[0].is_file():
            raise DataeffError(f"cpt.base={base}: holds no model.safetensors; is the run finished?")
        seq_len = model_config(source.path).seq_len
    tokenizer = source.path / "tokenizer.json"
    if not tokenizer.is_file():
        raise DataeffError(f"cpt.base={base}: holds no tokenizer.json; the CPT corpus is tokenized with the base "
                           "model's tokenizer, so it needs one (a fast tokenizer's file)")
    return tokenizer, seq_len


def _check_corpus(field: str, value: str | None) -> None:
    if value is None:
        return
    if value in NAMED_CORPORA:
        data_root()  # named corpora live in $DATAEFF_DATA_DIR; it must be set
        return
    if not Path(value).expanduser().exists():
        raise DataeffError(f"cpt.{field}={value}: no such file or directory, nor a named corpus "
                           f"({', '.join(NAMED_CORPORA)})")


def _check_run(run: RunConfig, tokenizer: Path) -> None:
    given = non_default(run)
    for part, fields in _OWNED.items():
        for name, ours in fields.items():
            if name in given.get(part, {}):
                raise DataeffError(f"cpt: run.{part}.{name} is set by cpt.{ours}; set that instead")
    if given.get("tokenizer") and (run.tokenizer.kind != "file" or Path(run.tokenizer.path or "") != tokenizer):
        raise DataeffError(f"cpt: run.tokenizer differs from the base model's; the CPT corpus is tokenized with "
                           f"the base's own ({tokenizer}); leave run.tokenizer unset")


def run_configs(cfg: CPTConfig) -> list[RunConfig]:
    """One run config per seed, after every check that can be made before training."""
    tokenizer, base_seq_len = _base_tokenizer(cfg.base)
    if not cfg.corpus:
        raise DataeffError("cpt.corpus: required (the documents to continue pretraining on)")
    _check_corpus("corpus", cfg.corpus)
    _check_corpus("val", cfg.val)
    _check_corpus("replay", cfg.replay)
    _check_run(cfg.run, tokenizer)
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise DataeffError(f"cpt.seeds={cfg.seeds}: give one or more distinct seeds")
    r = cfg.run
    data = dataclasses.replace(
        r.data, corpus=cfg.corpus, text_field=cfg.text_field, train_tokens=cfg.tokens, budget_seed=cfg.subsample_seed,
        val_split=cfg.val, val_docs=None if cfg.val else cfg.val_docs, replay=cfg.replay,
        replay_rate=cfg.replay_rate if cfg.replay else 0.0, replay_tokens=cfg.replay_tokens if cfg.replay else None)
    optim = dataclasses.replace(r.optim, lr=cfg.lr, warmup=cfg.warmup, min_lr_ratio=cfg.min_lr_ratio,
                                weight_decay=cfg.weight_decay, schedule="cosine")
    model = dataclasses.replace(r.model, seq_len=cfg.seq_len or min(base_seq_len, 2048))
    tok = dataclasses.replace(r.tokenizer, kind="file", path=str(tokenizer))
    return [dataclasses.replace(r, run_dir=None, data=data, optim=optim, model=model, tokenizer=tok,
                                train=dataclasses.replace(r.train, epochs=cfg.epochs, init_from=cfg.base,
                                                          init_seed=seed, data_seed=seed))
            for seed in cfg.seeds]


def _train(configs: list[RunConfig], cfg: CPTConfig, out: Path, progress: bool) -> list[tuple[str, dict[str, Any]]]:
    """(run directory, result) per config. Under torchrun every process trains each run together, one run
    after another (data-parallel); otherwise the executor trains them, in parallel where it can."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return [(str(out / "runs" / run_hash(c)), train(dataclasses.replace(c, run_dir=str(out / "runs" / run_hash(c)))))
                for c in configs]
    jobs = run_jobs(configs, cfg.executor, out / "runs", progress=progress)
    failed = [j for j in jobs if j.result is None]
    if failed:
        raise DataeffError(f"cpt: {len(failed)} of {len(jobs)} runs failed; first: {failed[0].run_dir}: "
                           f"{failed[0].error}")
    return [(str(j.run_dir), j.result) for j in jobs if j.result is not None]


def run_cpt(cfg: CPTConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train every seed, export, build the ensemble; ``OUT/cpt.json`` holds what it returns."""
    configs = run_configs(cfg)
    out = Path(cfg.out)
    trained = _train(configs, cfg, out, progress)
    runs = [d for d, _ in trained]
    summary: dict[str, Any] = {
        "base": cfg.base, "corpus": cfg.corpus, "tokens": cfg.tokens, "replay": cfg.replay,
        "runs": [{"run_dir": d, "seed": s, "train_tokens": r["train_tokens"], "val_loss": r.get("val_loss")}
                 for (d, r), s in zip(trained, cfg.seeds, strict=True)],
    }
    if int(os.environ.get("RANK", "0")) != 0:
        return summary  # the exports, the ensemble and cpt.json are the first process's to write
    if cfg.export:
        summary["hf"] = [str(_export(Path(d), out / "hf")) for d in runs]
    if len(runs) > 1:
        ensemble = save_ensemble(EnsembleSpec(name=f"cpt {Path(cfg.corpus).stem}", members=runs, combine=cfg.combine),
                                 out / "ensemble.json")
        scores = score_ensemble(f"cpt {Path(cfg.corpus).stem}", runs, configs[0], 0, out, progress=progress)
        summary["ensemble"] = {"file": str(ensemble), "prob_loss": scores["prob"][-1]["loss"],
                               "logit_loss": scores["logit"][-1]["loss"]}
    atomic_write_json(out / "cpt.json", summary)
    return summary


def _export(run_dir: Path, hf_root: Path) -> Path:
    target = hf_root / run_dir.name
    # save_hf appears in one rename, so an existing directory is a whole export of this finished run.
    return target if target.is_dir() else export_run(run_dir, target)
