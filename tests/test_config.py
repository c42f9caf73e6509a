from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from dataeff.config import config_hash, describe, from_dict, load, option, parse_overrides, section, to_dict
from dataeff.errors import DataeffError
from dataeff.train import RunConfig, TrainConfig, run_hash


@dataclass
class Inner:
    lr: float = option(3e-3, "learning rate")
    kind: Literal["a", "b"] = option("a", "which")
    sizes: list[int] = option([1, 2], "sizes")


@dataclass
class Outer:
    name: str = option("x", "a name")
    steps: int | None = option(None, "steps")
    inner: Inner = section(Inner, "inner section")


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: y\ninner:\n  lr: 1e-2\n  sizes: [3]\n")
    cfg = load(Outer, p, ["inner.kind=b", "steps=7"])
    assert cfg.name == "y" and cfg.steps == 7
    assert cfg.inner.lr == pytest.approx(1e-2) and cfg.inner.kind == "b" and cfg.inner.sizes == [3]


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: y\ninner:\n  lr: 1e-2\n  kindd: b\n")
    with pytest.raises(DataeffError) as e:
        load(Outer, p)
    msg = str(e.value)
    assert f"{p}:4" in msg and "inner.kindd" in msg and "inner.kind" in msg.split("did you mean")[1]
    assert "\n" not in msg


def test_bad_override_is_blamed_on_command_line(tmp_path):
    with pytest.raises(DataeffError, match=r"<command line>.*'inner\.lr'.*expected a number"):
        load(Outer, None, ["inner.lr=fast"])
    with pytest.raises(DataeffError, match=r"'b', did you mean|not one of 'a', 'b'"):
        load(Outer, None, ["inner.kind=c"])
    with pytest.raises(DataeffError, match="key=value"):
        parse_overrides(["inner.lr"])


def test_malformed_yaml_reports_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: y\ninner: [unclosed\n")
    with pytest.raises(DataeffError, match=rf"{p}:\d+: malformed YAML"):
        load(Outer, p)


def test_round_trip_and_hash_stability():
    cfg = from_dict(Outer, {"inner": {"sizes": [4, 5]}})
    again = from_dict(Outer, to_dict(cfg))
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(from_dict(Outer, {"inner": {"lr": 1e-3}})) != config_hash(cfg)


def test_mutable_defaults_are_not_shared():
    a, b = Outer(), Outer()
    a.inner.sizes.append(9)
    assert b.inner.sizes == [1, 2]


def test_describe_lists_every_leaf_with_default():
    rows = {name: default for name, default, _ in describe(Outer)}
    assert rows == {"name": '"x"', "steps": "null", "inner.lr": "0.003", "inner.kind": '"a"', "inner.sizes": "[1, 2]"}


SNAPSHOT = Path(__file__).parent / "identity_defaults.json"


def test_a_changed_default_comes_with_a_new_identity_version() -> None:
    """Run and store identities leave defaults out, so a changed default must bump IDENTITY_VERSION (and, for
    data and tokenizer fields, STORE_VERSION); then rewrite tests/identity_defaults.json with the new defaults."""
    from dataeff.data.tokens import STORE_VERSION
    from dataeff.train.config import IDENTITY_VERSION

    snapshot = json.loads(SNAPSHOT.read_text())
    now = {name: json.loads(default) for name, default, _ in describe(RunConfig)}
    changed = sorted(k for k, v in snapshot["defaults"].items() if now.get(k, "<removed>") != v)
    stores = [k for k in changed if k.startswith(("data.", "tokenizer."))]
    assert not changed or snapshot["run_identity_version"] != IDENTITY_VERSION, f"defaults changed: {changed}"
    assert not stores or snapshot["store_version"] != STORE_VERSION, f"data defaults changed: {stores}"


@dataclass
class NewTrain(TrainConfig):
    shiny: float = option(0.5, "a field added after runs were trained")


@dataclass
class NewRun(RunConfig):
    train: NewTrain = section(NewTrain, "training loop")


def test_a_new_field_with_a_default_keeps_every_run_identity(small_corpus) -> None:
    data = {"data": {"corpus": str(small_corpus)}, "optim": {"lr": 1e-2}, "train": {"epochs": 3}, "model": {"preset": "nano"}}
    old, new = from_dict(RunConfig, data), from_dict(NewRun, data)
    assert run_hash(new) == run_hash(old)
    assert run_hash(from_dict(NewRun, {**data, "train": {"epochs": 3, "shiny": 0.7}})) != run_hash(old)
    # Spelling out a default is the same run as leaving it out.
    assert run_hash(from_dict(RunConfig, {**data, "train": {"epochs": 3, "batch_tokens": 8192}})) == run_hash(old)


def test_a_run_trained_before_a_field_was_added_is_found_after(small_corpus, tmp_path) -> None:
    from dataeff.experiment.executor import ExecutorConfig, run_jobs

    data = {"data": {"corpus": str(small_corpus), "val_docs": 20, "cache_dir": str(tmp_path / "cache")},
            "tokenizer": {"kind": "bpe", "vocab_size": 300}, "model": {"preset": "nano", "seq_len": 32},
            "train": {"epochs": 1, "batch_tokens": 256, "progress": False}}
    [first] = run_jobs([from_dict(RunConfig, data)], ExecutorConfig(workers=1, threads_per_worker=1), tmp_path / "runs",
                       progress=False)
    stamp = (first.run_dir / "DONE").stat().st_mtime_ns
    [again] = run_jobs([from_dict(NewRun, data)], ExecutorConfig(workers=1, threads_per_worker=1), tmp_path / "runs",
                       progress=False)
    assert again.status == "skipped" and again.run_dir == first.run_dir and again.result == first.result
    assert (first.run_dir / "DONE").stat().st_mtime_ns == stamp
