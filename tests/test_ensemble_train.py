from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataeff import cli
from dataeff.config import from_dict
from dataeff.ensemble import read_ensemble
from dataeff.ensemble_train import EnsembleTrainConfig, member_config, train_ensemble
from dataeff.errors import DataeffError
from dataeff.evaluate_run import EvalConfig, run_eval
from dataeff.tasks import TasksConfig, run_tasks
from dataeff.train import RunConfig


def _config(corpus: Path, out: Path, **over: object) -> EnsembleTrainConfig:
    return from_dict(EnsembleTrainConfig, {
        "name": "tiny", "out": str(out), "members": 2, "fitness_tokens": 400,
        "base": {
            "data": {"corpus": str(corpus), "val_docs": 20, "train_tokens": 1500, "cache_dir": str(out.parent / "cache")},
            "tokenizer": {"kind": "bpe", "vocab_size": 300},
            "model": {"preset": "nano", "seq_len": 32},
            "optim": {"lr": 1e-2},
            "train": {"epochs": 2, "batch_tokens": 256, "progress": False},
        },
        "executor": {"workers": 2, "threads_per_worker": 1},
        **over,
    })


@pytest.mark.parametrize("vary,seeds", [("both", [(5, 5), (6, 6)]), ("init", [(5, 9), (6, 9)]), ("data", [(9, 5), (9, 6)])])
def test_members_differ_only_in_the_chosen_seeds(vary, seeds):
    base = from_dict(RunConfig, {"train": {"init_seed": 9, "data_seed": 9}})
    members = [member_config(base, i, vary, first_seed=5) for i in range(2)]
    assert [(m.train.init_seed, m.train.data_seed) for m in members] == seeds
    assert members[0].optim == base.optim and members[0].model == base.model


def test_ensemble_command_trains_saves_scores_and_reruns_nothing(small_corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ens"
    cfg = _config(small_corpus, out)
    scores = train_ensemble(cfg, progress=False)
    spec = read_ensemble(out / "ensemble.json")
    assert spec.name == "tiny" and len(spec.members) == 2 and spec.combine == "prob"
    done = [json.loads((Path(m) / "DONE").read_text()) for m in spec.members]
    seeds = [json.loads((Path(m) / "manifest.json").read_text())["seeds"] for m in spec.members]
    assert [(s["init_seed"], s["data_seed"]) for s in seeds] == [(0, 0), (1, 1)]
    # K = 1 is member 0 alone, on the tokens of its own final evaluation; K = 2 beats the members' mean.
    assert scores["prob"][0]["loss"] == pytest.approx(done[0]["val_loss"], abs=1e-4)
    assert scores["prob"][1]["loss"] < (done[0]["val_loss"] + done[1]["val_loss"]) / 2
    weighted = read_ensemble(out / "ensemble_weighted.json")
    assert weighted.weights is not None and sum(weighted.weights) == pytest.approx(1.0)

    stamps = {m: (Path(m) / "DONE").stat().st_mtime_ns for m in spec.members}
    assert train_ensemble(cfg, progress=False) == scores
    assert {m: (Path(m) / "DONE").stat().st_mtime_ns for m in spec.members} == stamps

    # `dataeff eval ENSEMBLE.json`: the same numbers, plus downstream tasks from a local data directory.
    (tmp_path / "data" / "arc").mkdir(parents=True)
    arc = [{"query": "Question: what sat on the mat?", "choices": ["the cat", "a dog", "a bird", "a day"], "gold": 0},
           {"query": "Question: what ran?", "choices": ["a stone", "the dog", "the red house", "a day"], "gold": 1}]
    (tmp_path / "data" / "arc" / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    monkeypatch.setenv("DATAEFF_DATA_DIR", str(tmp_path / "data"))
    assert cli.main(["eval", str(out / "ensemble.json"), "tasks=[arc_easy]", "device=cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["prob"]["loss"] == pytest.approx(scores["prob"][1]["loss"], abs=1e-6)
    assert printed["logit"]["loss"] == pytest.approx(scores["logit"][1]["loss"], abs=1e-6)
    expected = run_tasks(TasksConfig(members=spec.members, tasks=["arc_easy"], progress=False, device="cpu"))
    assert printed["tasks"]["arc_easy"] == pytest.approx(expected["tasks"]["arc_easy"])
    # One member alone, through the same command.
    single = run_eval(EvalConfig(run_dir=spec.members[0], device="cpu"))
    assert single["loss"] == pytest.approx(done[0]["val_loss"], abs=1e-6)
    with pytest.raises(DataeffError, match=r"give a run directory or ensemble\.json"):
        run_eval(EvalConfig(run_dir=spec.members[0], members=spec.members))


def test_failed_member_is_named(small_corpus, tmp_path):
    cfg = _config(small_corpus, tmp_path / "ens", members=1)
    cfg.base.model.seq_len = 4096  # more than the budget holds: the member fails
    with pytest.raises(DataeffError, match=r"1 of 1 members failed; first: .*fewer than one training sequence"):
        train_ensemble(cfg, progress=False)


def test_fitness_without_a_budget_is_refused_before_training(small_corpus, tmp_path):
    cfg = _config(small_corpus, tmp_path / "ens")
    cfg.base.data.train_tokens = None
    with pytest.raises(DataeffError, match=r"fitness_tokens needs base\.data\.train_tokens"):
        train_ensemble(cfg, progress=False)
    assert not (tmp_path / "ens" / "runs").exists()
