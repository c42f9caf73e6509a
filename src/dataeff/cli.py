"""The ``dataeff`` command: each subcommand takes an optional YAML config and dotted ``key=value`` overrides."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dataeff import __version__
from dataeff.config import help_text, load
from dataeff.errors import DataeffError


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    config: Callable[[], type]
    action: Callable[[Any], Any]


def _prepare(cfg: Any) -> None:
    from dataeff.tokens import prepare

    prepared = prepare(cfg.data, cfg.tokenizer, progress=cfg.train.progress)
    print(json.dumps({"store": str(prepared.path), **{k: prepared.meta[k] for k in ("vocab_size", "splits") if k in prepared.meta}}, indent=2))


def _train(cfg: Any) -> None:
    from dataeff.train import train

    result = train(cfg)
    if result:
        print(json.dumps(result, indent=2))


def _eval(cfg: Any) -> None:
    from dataeff.evaluate_run import run_eval

    print(json.dumps(run_eval(cfg), indent=2))


def _run_config() -> type:
    from dataeff.train import RunConfig

    return RunConfig


def _eval_config() -> type:
    from dataeff.evaluate_run import EvalConfig

    return EvalConfig


COMMANDS = [
    Command("prepare", "tokenize a corpus into a content-addressed token store", _run_config, _prepare),
    Command("train", "train a model on a fixed token budget (resumes if interrupted)", _run_config, _train),
    Command("eval", "held-out loss, bits per byte and word perplexity of a trained run", _eval_config, _eval),
]


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    configs = [a for a in items if "=" not in a]
    if len(configs) > 1:
        raise DataeffError(f"expected at most one config file, got {configs}; overrides are written key=value")
    return (configs[0] if configs else None), [a for a in items if "=" in a]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dataeff", description="Data-efficient language-model pretraining.")
    parser.add_argument("--version", action="version", version=f"dataeff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(
            cmd.name,
            help=cmd.summary,
            description=f"{cmd.summary}.\n\nUsage: dataeff {cmd.name} [CONFIG.yaml] [key=value ...]",
            epilog="config fields (set in the YAML file or as dotted key=value overrides):\n" + help_text(cmd.config()),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value", help="a YAML config and/or overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    cmd = next(c for c in COMMANDS if c.name == ns.command)
    try:
        path, overrides = _split_args(ns.args)
        cfg = load(cmd.config(), path, overrides)
        cmd.action(cfg)
    except DataeffError as e:
        print(f"dataeff: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dataeff: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
