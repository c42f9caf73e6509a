from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataeff.config import from_dict
from dataeff.data import DataConfig, load_documents
from dataeff.distill import DistillConfig, distill_loss
from dataeff.errors import DataeffError
from dataeff.fsutil import read_jsonl
from dataeff.tokenizer import TokenizerConfig
from dataeff.tokens import fitness_split, prepare
from dataeff.train import RunConfig, train


def _config(corpus: Path, run_dir: Path, *, data: dict | None = None, distill: dict | None = None,
            **train_over: object) -> RunConfig:
    return from_dict(RunConfig, {
        "run_dir": str(run_dir),
        "data": {"corpus": str(corpus), "val_docs": 20, "cache_dir": str(run_dir.parent / "cache"), **(data or {})},
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "model": {"preset": "nano", "seq_len": 32},
        "optim": {"lr": 1e-2, "weight_decay": 0.1},
        "train": {"epochs": 2, "batch_tokens": 256, "progress": False, "threads": 1, "log_every": 1, "dtype": "fp32",
                  **train_over},
        "distill": distill or {},
    })


def _kl(teacher_lp: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    t = F.log_softmax(teacher_lp / tau, dim=-1)
    s = F.log_softmax(student_logits / tau, dim=-1)
    return F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean")


def test_distill_loss_is_mixed_cross_entropy_and_tempered_kl():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    teacher = F.log_softmax(torch.randn(2, 5, 11, generator=g) * 2, dim=-1)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    cfg = DistillConfig(teachers=["t"], weight=0.3, temperature=2.0)
    loss, ce = distill_loss(logits, targets, cfg, teacher_log_probs=teacher)
    ref_ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert ce == pytest.approx(float(ref_ce), abs=1e-6)
    assert loss == pytest.approx(float(0.7 * ref_ce + 0.3 * 4.0 * _kl(teacher, logits, 2.0)), abs=1e-5)
    # The student equal to the teacher pays no KL.
    same, _ = distill_loss(teacher, targets, DistillConfig(teachers=["t"], weight=1.0), teacher_log_probs=teacher)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    # Top-k with k = V is the full KL; a smaller k renormalises the teacher's top-k.
    full = teacher.topk(11, dim=-1)
    topk_loss, _ = distill_loss(logits, targets, cfg, topk=(full.indices, full.values))
    assert float(topk_loss) == pytest.approx(float(loss), abs=1e-5)
    top3 = teacher.topk(3, dim=-1)
    p = F.softmax(top3.values / 2.0, dim=-1)
    s = F.log_softmax(logits / 2.0, dim=-1).gather(-1, top3.indices)
    ref = 0.7 * ref_ce + 0.3 * 4.0 * (p * (p.log() - s)).sum(-1).mean()
    assert float(distill_loss(logits, targets, cfg, topk=(top3.indices, top3.values))[0]) == pytest.approx(float(ref), abs=1e-5)


@pytest.mark.parametrize("field,value", [("weight", 0.0), ("weight", 1.5), ("temperature", 0.0), ("top_k", 0)])
def test_bad_distill_settings_are_refused(field, value):
    with pytest.raises(DataeffError, match="distill"):
        from_dict(RunConfig, {"distill": {"teachers": ["t"], field: value}})


def test_distilled_student_matches_its_teacher_better_and_cache_equals_online(small_corpus, tmp_path):
    teacher_dir = tmp_path / "teacher"
    train(_config(small_corpus, teacher_dir, epochs=4))
    distill = {"teachers": [str(teacher_dir)], "weight": 1.0}
    online = train(_config(small_corpus, tmp_path / "online", distill=distill, init_seed=1, data_seed=1))
    # k = the whole vocabulary: the cached run must see exactly the online run's teacher at every position.
    cached = train(_config(small_corpus, tmp_path / "cached", distill={**distill, "teacher_cache": "topk", "top_k": 300},
                           init_seed=1, data_seed=1))
    assert (tmp_path / "cached" / "teacher_topk" / ".complete").exists()
    # The cache stores log-probs in float16: the runs' first steps agree to that precision (a window read
    # from the wrong position would not). At lr 1e-2 the two trajectories then part (seen: by 0.01-0.04 nats
    # from step ~20 on an AVX2 CPU), so the end is held only to a bound far below the distillation's effect.
    def steps(name: str) -> list[float]:
        return [r["train_loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "train_loss" in r]

    assert steps("cached")[:10] == pytest.approx(steps("online")[:10], abs=1e-3)
    assert cached["val_loss"] == pytest.approx(online["val_loss"], abs=6e-2)
    rows = [r for r in read_jsonl(tmp_path / "online" / "metrics.jsonl") if "train_ce" in r]
    assert rows and all(r["train_ce"] > 0 for r in rows)

    # With α = 1 the student never sees the real tokens' cross-entropy, yet it learns: its KL to the teacher
    # on held-out text is far below that of a student trained on nothing (its initialisation).
    from dataeff.evaluate import batches
    from dataeff.evaluate_run import load_model, run_prepared

    val = run_prepared(teacher_dir).split("val")
    t_model, s_model = load_model(teacher_dir), load_model(tmp_path / "online")
    init = load_model(tmp_path / "online")
    init.reset_parameters(1)
    x, _ = next(batches(val.tokens, 32, 8))
    with torch.no_grad():
        t_lp = F.log_softmax(t_model(x), dim=-1)
        assert float(_kl(t_lp, s_model(x), 1.0)) < 0.5 * float(_kl(t_lp, init(x), 1.0))


def test_teacher_with_another_tokenizer_is_refused(small_corpus, tmp_path):
    teacher_dir = tmp_path / "teacher"
    cfg = _config(small_corpus, teacher_dir, epochs=1)
    cfg.tokenizer.vocab_size = 280
    train(cfg)
    with pytest.raises(DataeffError, match=f"{teacher_dir}.*different tokenizer"):
        train(_config(small_corpus, tmp_path / "student", distill={"teachers": [str(teacher_dir)]}))


def test_topk_cache_needs_sequence_shuffle(small_corpus, tmp_path):
    teacher_dir = tmp_path / "teacher"
    train(_config(small_corpus, teacher_dir, epochs=1))
    with pytest.raises(DataeffError, match=r"train\.shuffle=sequence"):
        train(_config(small_corpus, tmp_path / "student", shuffle="document",
                      distill={"teachers": [str(teacher_dir)], "teacher_cache": "topk"}))


def _write_synthetic(path: Path, n: int) -> Path:
    rng = np.random.default_rng(1)
    words = ["zebra", "moon", "quietly", "jumped", "over", "green", "hill", "the"]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 12))}) + "\n" for _ in range(n)))
    return path


def test_synthetic_mixture_keeps_the_tokenizer_and_its_share(small_corpus, tmp_path):
    tok = TokenizerConfig(kind="bpe", vocab_size=300)
    real = DataConfig(corpus=str(small_corpus), val_docs=20, train_tokens=2000, cache_dir=str(tmp_path / "cache"))
    synthetic = _write_synthetic(tmp_path / "syn.jsonl", 400)
    mixed_cfg = DataConfig(**{**real.__dict__, "synthetic": str(synthetic), "synthetic_share": 0.75})
    plain, mixed = prepare(real, tok, progress=False), prepare(mixed_cfg, tok, progress=False)
    assert mixed.tokenizer.sha256 == plain.tokenizer.sha256
    assert mixed.path != plain.path
    assert mixed.split("synthetic").n_tokens == 3 * plain.split("train").n_tokens
    assert np.array_equal(mixed.split("train").tokens, plain.split("train").tokens)

    cfg = _config(small_corpus, tmp_path / "run", data={"train_tokens": 2000, "synthetic": str(synthetic),
                                                         "synthetic_share": 0.75}, epochs=1)
    result = train(cfg)
    assert result["synthetic_tokens"] == 6000 and result["train_tokens"] == 2000
    # One epoch over the mixture: four times the steps of one over the real tokens alone.
    assert result["steps"] == round((8000 - 1) // 32 / 8)

    with pytest.raises(DataeffError, match=r"syn_small.jsonl: holds \d+ tokens.*needs 6000"):
        prepare(DataConfig(**{**mixed_cfg.__dict__, "synthetic": str(_write_synthetic(tmp_path / "syn_small.jsonl", 5))}),
                tok, progress=False)
    with pytest.raises(DataeffError, match="synthetic_share"):
        from_dict(RunConfig, {"data": {"synthetic_share": 0.5}})


def test_fitness_split_is_disjoint_from_train_and_val(small_corpus, tmp_path):
    data = DataConfig(corpus=str(small_corpus), val_docs=20, train_tokens=1500, cache_dir=str(tmp_path / "cache"))
    prepared = prepare(data, TokenizerConfig(kind="bpe", vocab_size=300), progress=False)
    fit = fitness_split(prepared, data, 500)
    assert fit.n_tokens == 500
    tokenizer = prepared.tokenizer
    docs = load_documents(data)
    fit_docs = {tokenizer.decode(list(fit.tokens[a:b][:-1])) for a, b in zip(fit.doc_offsets[:-2], fit.doc_offsets[1:-1], strict=True)}
    train = prepared.split("train")
    train_docs = {tokenizer.decode(list(train.tokens[a:b][:-1])) for a, b in zip(train.doc_offsets[:-1], train.doc_offsets[1:], strict=True)}
    assert fit_docs and not fit_docs & train_docs
    assert not fit_docs & {d.strip() for d in docs["val"]}
    assert fit_docs <= {d.strip() for d in docs["train"]}
    with pytest.raises(DataeffError, match=r"data\.train_tokens is unset"):
        fitness_split(prepared, DataConfig(**{**data.__dict__, "train_tokens": None}), 500)


@pytest.mark.slow
def test_two_process_ddp_with_a_topk_teacher_matches_single_process(small_corpus, tmp_path):
    """Rank 0 alone builds the cache; the other rank waits for it, then both train on it."""
    from test_train import _env, _write_cfg

    teacher_dir = tmp_path / "teacher"
    train(_config(small_corpus, teacher_dir, epochs=2))
    over = {"epochs": 2, "batch_tokens": 512, "init_seed": 1, "data_seed": 1}
    distill = {"teachers": [str(teacher_dir)], "weight": 0.5, "teacher_cache": "topk", "top_k": 16}
    train(_config(small_corpus, tmp_path / "single", distill=distill, **over))
    cfg_path = _write_cfg(_config(small_corpus, tmp_path / "ddp", distill=distill, **over), tmp_path / "ddp.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dataeff.cli", "train", str(cfg_path)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a = [r["train_loss"] for r in read_jsonl(tmp_path / "single" / "metrics.jsonl") if "train_loss" in r]
    b = [r["train_loss"] for r in read_jsonl(tmp_path / "ddp" / "metrics.jsonl") if "train_loss" in r]
    assert len(a) == len(b) > 5
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3
