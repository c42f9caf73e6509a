from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from dataeff.config import config_hash, describe, from_dict, load, option, parse_overrides, section, to_dict
from dataeff.errors import DataeffError


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
