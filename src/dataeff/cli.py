"""The ``dataeff`` command: each subcommand takes an optional YAML config and dotted ``key=value`` overrides."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dataeff import __version__
from dataeff.config import help_text, load, option
from dataeff.errors import DataeffError, DataeffWarning


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    config: Callable[[], type]
    action: Callable[[Any], Any]
    # A bare argument that is not a YAML file sets this field (``dataeff eval runs/abc``).
    positional: str | None = None


def _prepare(cfg: Any) -> None:
    from dataeff.data.tokens import prepare

    prepared = prepare(cfg.data, cfg.tokenizer, progress=cfg.train.progress)
    print(json.dumps({"store": str(prepared.path), **{k: prepared.meta[k] for k in ("vocab_size", "splits") if k in prepared.meta}}, indent=2))


def _train(cfg: Any) -> None:
    from dataeff.train.loop import train

    result = train(cfg)
    if result:
        print(json.dumps(result, indent=2))


def _eval(cfg: Any) -> None:
    from dataeff.eval.command import run_eval

    print(json.dumps(run_eval(cfg), indent=2))


def _pipeline(cfg: Any) -> None:
    from dataeff.experiment.pipeline import run_pipeline

    results = run_pipeline(cfg)
    print("\n".join(results.verdict()))
    print(f"report: {cfg.root}/report/report.html")


def _report(cfg: Any) -> None:
    from dataeff.report.write import write_report

    paths = write_report(cfg.root)
    print("\n".join(str(p) for p in paths.values()))


@dataclass
class ReportConfig:
    root: str = option("", "the pipeline root holding results.json (required)")


def _pipeline_config() -> type:
    from dataeff.experiment.config import PipelineConfig

    return PipelineConfig


def _report_config() -> type:
    return ReportConfig


def _run_config() -> type:
    from dataeff.train.config import RunConfig

    return RunConfig


def _eval_config() -> type:
    from dataeff.eval.command import EvalConfig

    return EvalConfig


def _runs(cfg: Any) -> None:
    from dataeff.experiment.runstore import runs_command

    print(runs_command(cfg))


def _runs_config() -> type:
    from dataeff.experiment.runstore import RunsConfig

    return RunsConfig


def _tasks(cfg: Any) -> None:
    from dataeff.eval.tasks import run_tasks

    print(json.dumps(run_tasks(cfg), indent=2))


def _tasks_config() -> type:
    from dataeff.eval.tasks import TasksConfig

    return TasksConfig


def _sample(cfg: Any) -> None:
    from dataeff.generate.sample import sample

    rows = sample(cfg)
    if cfg.out:
        print(f"{len(rows)} samples written to {cfg.out}")
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))


def _ensemble(cfg: Any) -> None:
    from dataeff.experiment.ensemble_train import train_ensemble

    print(json.dumps(train_ensemble(cfg), indent=2))


def _ensemble_config() -> type:
    from dataeff.experiment.ensemble_train import EnsembleTrainConfig

    return EnsembleTrainConfig


def _cpt(cfg: Any) -> None:
    from dataeff.experiment.cpt import run_cpt

    print(json.dumps(run_cpt(cfg), indent=2))


def _cpt_config() -> type:
    from dataeff.experiment.cpt import CPTConfig

    return CPTConfig


def _qa(cfg: Any) -> None:
    from pathlib import Path

    from dataeff.config import config_hash
    from dataeff.generate.qa import qa_generation_job

    # The client's manifest and every answer are kept per settings, like a pipeline's artifacts.
    out = Path("runs") / "qa" / config_hash(cfg)
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"dir": str(out), **qa_generation_job(cfg, out)}, indent=2))


def _qa_config() -> type:
    from dataeff.generate.qa import QAGenConfig

    return QAGenConfig


def _quality(cfg: Any) -> None:
    from dataeff.synth.quality import run_quality

    report = run_quality(cfg)
    print(report.to_markdown())
    print(f"\nwritten: {cfg.out}")


def _quality_config() -> type:
    from dataeff.synth.quality import QualityConfig

    return QualityConfig


def _sample_config() -> type:
    from dataeff.generate.sample import SampleConfig

    return SampleConfig


def _theory(cfg: Any) -> None:
    from dataeff.synth.theory import run_theory

    result = run_theory(cfg)
    closed = result.closed
    print(json.dumps({
        "json": str(result.json_path), "png": str(result.png_path),
        "plateau": closed.p + closed.C, "C_lambda": closed.C_lambda,
        "simulated_final": float(result.simulation.mean[-1]),
        "agreement": None if result.agreement is None else vars(result.agreement),
    }, indent=2))


def _theory_config() -> type:
    from dataeff.synth.theory import TheoryConfig

    return TheoryConfig

def _markov(cfg: Any) -> None:
    from dataeff.synth.markov import write_corpus

    print(json.dumps(write_corpus(cfg), indent=2))


def _markov_config() -> type:
    from dataeff.synth.markov import MarkovConfig

    return MarkovConfig


def _serve(cfg: Any) -> None:
    from dataeff.generate.serve import serve

    serve(cfg)


def _serve_config() -> type:
    from dataeff.generate.serve import ServeConfig

    return ServeConfig


def _llm(cfg: Any) -> None:
    from dataeff.generate.llm.command import llm_command

    llm_command(cfg)


def _llm_config() -> type:
    from dataeff.generate.llm.config import LLMJobConfig

    return LLMJobConfig


def _entigraph(cfg: Any) -> None:
    from dataeff.synth.entigraph import run_entigraph

    print(json.dumps(run_entigraph(cfg), indent=2))


def _entigraph_config() -> type:
    from dataeff.synth.entigraph import EntiGraphConfig

    return EntiGraphConfig


def _rephrase(cfg: Any) -> None:
    from dataeff.synth.rephrase import run_rephrase

    print(json.dumps(run_rephrase(cfg), indent=2))


def _rephrase_config() -> type:
    from dataeff.synth.rephrase import RephraseConfig

    return RephraseConfig


def _embed(cfg: Any) -> None:
    from dataeff.synth.embed import embed

    embeddings = embed(cfg)
    print(json.dumps({"embeddings": str(embeddings.directory), "n_docs": len(embeddings), "dim": embeddings.dim,
                      "truncated": int(embeddings.truncated.sum()),
                      "short": int((embeddings.n_words < cfg.min_words).sum())}, indent=2))


def _embed_config() -> type:
    from dataeff.synth.embed import EmbedConfig

    return EmbedConfig


def _pairs(cfg: Any) -> None:
    from dataeff.synth.neighbors import pairs, read_pairs

    out = pairs(cfg)
    _, stats = read_pairs(out)
    keys = ("n_pairable", "n_docs_with_pair", "n_pairs", "n_mutual_pairs", "near_duplicates", "index")
    print(json.dumps({"pairs": str(out / "pairs.parquet"), **{k: stats[k] for k in keys}}, indent=2))


def _pairs_config() -> type:
    from dataeff.synth.neighbors import PairsConfig

    return PairsConfig


def _synthesizer(cfg: Any) -> None:
    from dataeff.synth.synthesizer import train_synthesizer

    result = train_synthesizer(cfg)
    keys = ("run_dir", "corpus", "records", "pairs", "prompt_tokens", "text_tokens", "val_loss")
    print(json.dumps({k: result.get(k) for k in keys}, indent=2))


def _synthesizer_config() -> type:
    from dataeff.synth.synthesizer import SynthesizerConfig

    return SynthesizerConfig


def _synthesize(cfg: Any) -> None:
    from dataeff.synth.synthesize import synthesize

    summary = synthesize(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "identity"}, indent=2))


def _synthesize_config() -> type:
    from dataeff.synth.synthesize import SynthesizeConfig

    return SynthesizeConfig


COMMANDS = [
    Command("prepare", "tokenize a corpus into a content-addressed token store", _run_config, _prepare),
    Command("train", "train a model on a fixed token budget (resumes if interrupted)", _run_config, _train),
    Command("eval", "held-out loss, bits per byte and word perplexity of a run or an ensemble (and tasks=[...])", _eval_config, _eval, "run_dir"),
    Command("ensemble", "train K members that differ by seed, save ensemble.json and score every prefix ensemble",
            _ensemble_config, _ensemble),
    Command("cpt", "continued pretraining of a dataeff run or an HF Llama/Qwen3 checkpoint on a corpus (replay, "
            "subsampling, K seeds as an ensemble, HF export)", _cpt_config, _cpt, "base"),
    Command("qa", "QuALITY closed-book QA answered by generation (few-shot chain of thought, answer parsing, attempt "
            "rate) through the generation client", _qa_config, _qa),
    Command("run", "run a pipeline: tune every recipe and size, fit scaling laws, write the report", _pipeline_config, _pipeline),
    Command("report", "write report.md and report.html for a pipeline root", _report_config, _report, "root"),
    Command("runs", "list, filter, sort and export the runs under a directory (indexed in ROOT/runs.sqlite)",
            _runs_config, _runs, "root"),
    Command("tasks", "downstream accuracy (ARC, PIQA, HellaSwag, BLiMP, LAMBADA, QuALITY) of a run or an ensemble",
            _tasks_config, _tasks, "run_dir"),
    Command("sample", "generate text from a run or an ensemble (e.g. for sequence-level distillation)",
            _sample_config, _sample, "run_dir"),
    Command("quality", "quality metrics of synthetic corpora (repetition, duplicates, reference copies, pair copying "
            "and irrelevance, source overlap, non-factual) beside a real reference row; writes quality.json",
            _quality_config, _quality, "synthetic"),
    Command("theory", "simulate EntiGraph's random-graph model of knowledge and compare it with the "
            "mixture-of-exponentials closed form", _theory_config, _theory),
    Command("markov", "write a known-truth corpus: documents of a random sparse Markov source with its exact entropy "
            "rate (the floor of any model's loss)", _markov_config, _markov, "out"),
    Command("serve", "an OpenAI-compatible HTTP server for a run, an ensemble, a Hugging Face model or the test model",
            _serve_config, _serve, "model"),
    Command("llm", "send a JSONL file of chat requests through the generation client (cached, resumable, budgeted)",
            _llm_config, _llm, "requests"),
    Command("entigraph", "EntiGraph: a summary, the entities and texts on entity pairs and triples of every source "
            "document, through the generation client (cached, resumable, budgeted); writes corpus.jsonl",
            _entigraph_config, _entigraph, "input"),
    Command("rephrase", "rewrite source documents in WRAP styles (easy, medium, hard, qa, or a prompt file), chunk by "
            "chunk, keeping the rewrites that pass a fidelity check; writes corpus.jsonl", _rephrase_config,
            _rephrase, "input"),


    Command("embed", "embed a token store's documents as unit vectors (sentence-transformers or a run), cached in shards",
            _embed_config, _embed, "store"),
    Command("pairs", "nearest-neighbour document pairs above a similarity threshold, near-duplicates removed (SBP)",
            _pairs_config, _pairs),
    Command("synthesizer", "train SBP's synthesizer p(d2 | d1) on document pairs, starting from a base run",
            _synthesizer_config, _synthesizer, "base"),
    Command("synthesize", "sample SBP's synthetic corpus from the synthesizer on seed documents of the world "
            "(sharded, resumable, deduplicated)", _synthesize_config, _synthesize, "synthesizer"),
]


def _split_args(items: list[str], positional: str | None = None) -> tuple[str | None, list[str]]:
    overrides = [a for a in items if "=" in a]
    configs, bare = [], []
    for a in items:
        if "=" in a:
            continue
        if positional and not a.endswith((".yaml", ".yml")):
            bare.append(a)
        else:
            configs.append(a)
    if len(bare) > 1:
        # Each would set the same field and the last would win: the others would be silently ignored.
        raise DataeffError(f"{len(bare)} values for {positional} ({', '.join(bare)}); give one"
                           + (", or members=[...] for an ensemble" if positional == "run_dir" else ""))
    overrides += [f"{positional}={a}" for a in bare]
    if len(configs) > 1:
        raise DataeffError(f"expected at most one config file, got {configs}; overrides are written key=value")
    return (configs[0] if configs else None), overrides


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s field list is built, since that imports its (heavy) module."""
    parser = argparse.ArgumentParser(prog="dataeff", description="Data-efficient language-model pretraining.")
    parser.add_argument("--version", action="version", version=f"dataeff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(
            cmd.name,
            help=cmd.summary,
            description=f"{cmd.summary}.\n\nUsage: dataeff {cmd.name} "
            + (f"[{cmd.positional.upper()}] " if cmd.positional else "") + "[CONFIG.yaml] [key=value ...]",
            epilog="config fields (set in the YAML file or as dotted key=value overrides):\n" + help_text(cmd.config())
            if cmd.name == command else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value", help="a YAML config and/or overrides")
    return parser


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    if issubclass(category, DataeffWarning):
        print(f"dataeff: warning: {message}", file=sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.showwarning = _show_warning
    warnings.simplefilter("always", DataeffWarning)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    ns = parser.parse_args(argv)
    cmd = next(c for c in COMMANDS if c.name == ns.command)
    try:
        path, overrides = _split_args(ns.args, cmd.positional)
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
