from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dataeff.cli import main as cli_main
from dataeff.config import dump_yaml, from_dict
from dataeff.errors import DataeffError
from dataeff.executor import ExecutorConfig, run_jobs
from dataeff.runstore import DB_NAME, RunStore, parse_value
from dataeff.train import RunConfig, run_hash


def tiny(corpus: Path, cache: Path, lr: float, wd: float, **train_over) -> RunConfig:
    return from_dict(RunConfig, {
        "data": {"corpus": str(corpus), "val_docs": 20, "cache_dir": str(cache)},
        "tokenizer": {"kind": "word", "vocab_size": 64},
        "model": {"preset": "nano", "seq_len": 32},
        "optim": {"lr": lr, "weight_decay": wd},
        "train": {"epochs": 1, "batch_tokens": 192, "eval_every": 10**6, "progress": False, **train_over},
    })


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    """Three finished runs and a failed one under root/runs, and a partial one elsewhere under root."""
    tmp = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "dog", "sat", "ran", "on", "a", "red", "big", "house", "tree", "and", "then", "it"]
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, size=30)) + "." for _ in range(150)), encoding="utf-8")
    root, cache = tmp / "root", tmp / "cache"
    done = [tiny(corpus, cache, 3e-3, 0.1), tiny(corpus, cache, 1e-2, 0.8), tiny(corpus, cache, 3e-2, 0.8)]
    failed = tiny(corpus, cache, 1e-2, 0.1, batch_tokens=16)
    results = run_jobs([*done, failed], ExecutorConfig(workers=2, threads_per_worker=1), root / "runs", progress=False)
    assert [r.status for r in results] == ["done", "done", "done", "failed"], [r.error for r in results]
    partial = tiny(corpus, cache, 1e-3, 1.6)
    partial.run_dir = str(root / "extra" / "partial")
    Path(partial.run_dir).mkdir(parents=True)
    dump_yaml(partial, Path(partial.run_dir) / "config.yaml")
    return {"root": root, "results": results, "partial": partial}


@pytest.fixture
def root(sweep, tmp_path) -> Path:
    """A private copy of the sweep, so a test may change it."""
    shutil.copytree(sweep["root"], tmp_path / "root")
    return tmp_path / "root"


def by_hash(rows: list[dict]) -> dict[str, dict]:
    return {r["hash"]: r for r in rows}


def test_index_holds_every_run_with_its_status_config_and_result(sweep, root):
    rows = by_hash(RunStore(root).select())
    results = sweep["results"]
    assert len(rows) == 5
    for r in results[:3]:
        row = rows[run_hash(r.config)]
        assert row["status"] == "done" and row["run_dir"] == str(root / "runs" / run_hash(r.config))
        assert row["val_loss"] == pytest.approx(r.result["val_loss"]) and row["steps"] == r.result["steps"]
        assert row["val_bpb"] == pytest.approx(r.result["val_bpb"]) and row["params"] == r.result["params"]
        assert row["tokens_seen"] == r.result["tokens_seen"]  # a DONE metric without a column of its own
        assert (row["preset"], row["optimizer"], row["epochs"]) == ("nano", "adamw", 1.0)
        assert row["lr"] == r.config.optim.lr and row["optim.lr"] == r.config.optim.lr
        assert row["corpus"] == r.config.data.corpus and row["model.seq_len"] == 32
    failed = rows[run_hash(results[3].config)]
    assert failed["status"] == "failed" and failed["val_loss"] is None
    assert failed["failure"] == "train.batch_tokens=16 is smaller than one sequence (model.seq_len=32)"
    partial = rows[run_hash(sweep["partial"])]
    assert partial["status"] == "partial" and partial["failure"] is None and partial["weight_decay"] == 1.6


def test_select_filters_and_sorts_on_columns_config_and_result_keys(root):
    store = RunStore(root)
    assert len(store.select({"status": "done"})) == 3
    assert {r["lr"] for r in store.select({"optim.weight_decay": 0.8, "status": "done"})} == {1e-2, 3e-2}
    assert len(store.select({"weight_decay": 0.1, "lr": 1e-2})) == 1  # the failed run
    assert store.select({"val_loss": None, "status": "partial"})[0]["weight_decay"] == 1.6
    steps = store.select({"status": "done"})[0]["steps"]
    assert len(store.select({"steps": steps, "tokens_seen": steps * 192})) == 3
    losses = [r["val_loss"] for r in store.select(sort="val_loss")]
    assert losses[:3] == sorted(losses[:3]) and losses[3:] == [None, None]  # runs without the key go last
    assert [r["lr"] for r in store.select({"status": "done"}, sort="-optim.lr")] == [3e-2, 1e-2, 3e-3]
    with pytest.raises(DataeffError, match=r"no run has a field 'optim.weight_deacy'; did you mean 'optim.weight_decay'"):
        store.select({"optim.weight_deacy": 0.8})


def test_refresh_rereads_only_what_changed(root):
    store = RunStore(root)
    assert store.refresh() == 0
    partial = root / "extra" / "partial"
    (partial / "FAILED").write_text(json.dumps({"reason": "out of memory"}))
    shutil.rmtree(next(p.parent for p in (root / "runs").glob("*/DONE")))
    assert store.refresh() == 2
    rows = store.select()
    assert len(rows) == 4 and len(store.select({"status": "done"})) == 2
    assert store.select({"status": "failed", "weight_decay": 1.6})[0]["failure"] == "out of memory"
    assert store.refresh() == 0


def test_exports_read_back(root, tmp_path):
    store = RunStore(root)
    rows = store.select({"status": "done"}, sort="lr")
    store.to_csv(tmp_path / "out" / "runs.csv", {"status": "done"}, sort="lr")
    with open(tmp_path / "out" / "runs.csv", newline="", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert [r["hash"] for r in back] == [r["hash"] for r in rows]
    assert [float(r["val_loss"]) for r in back] == pytest.approx([r["val_loss"] for r in rows])
    assert back[0]["optim.weight_decay"] == "0.1" and back[0]["status"] == "done"

    store.to_parquet(tmp_path / "out" / "runs.parquet")
    table = pq.read_table(tmp_path / "out" / "runs.parquet").to_pylist()
    # Lists and mappings (such as distill.teachers) are exported as JSON text, scalars as themselves.
    def exported(v: object) -> object:
        return json.dumps(v) if isinstance(v, list | dict) else v

    assert len(table) == 5 and table == [{k: exported(r.get(k)) for k in table[0]} for r in store.select()]
    assert table[0]["distill.teachers"] == "[]"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["runs.csv", "runs.parquet"]  # no temp files


def test_deleted_or_corrupt_index_is_rebuilt_from_the_run_dirs(root):
    rows = RunStore(root).select()
    (root / DB_NAME).unlink()
    assert RunStore(root).select() == rows
    (root / DB_NAME).write_bytes(b"this is not a database" * 100)
    assert RunStore(root).select() == rows


def test_cli_lists_filters_and_exports(root, tmp_path, capsys):
    out_csv = tmp_path / "done.csv"
    assert cli_main(["runs", str(root), "status=done", "where=[optim.weight_decay=0.8]", "sort=-lr", f"csv={out_csv}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["run", "status", "preset", "params", "lr", "wd", "epochs", "val_loss"]
    assert lines[1].split()[0].startswith("runs/")  # where each run is, relative to the root
    assert [line.split()[4] for line in lines[1:3]] == ["0.03", "0.01"]
    assert lines[3] == "2 runs: 2 done, 0 failed, 0 partial" and lines[4] == f"csv: {out_csv}"
    assert out_csv.exists()

    assert cli_main(["runs", f"root={root}", "where=status=failed"]) == 0
    assert "batch_tokens=16 is smaller" in capsys.readouterr().out  # the failure column appears
    assert cli_main(["runs", str(root), "where=[status]"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'status' is not key=value" in err


def test_parse_value():
    assert [parse_value(v) for v in ("1e-2", "4", "0.8", "true", "null", "nano", "10m")] == [
        0.01, 4, 0.8, True, None, "nano", "10m"]
