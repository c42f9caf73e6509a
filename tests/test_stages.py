"""The stage contract: a new stage is one file plus its registration in experiment/config.py, and nothing else."""

from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dataeff
from dataeff.config import dump_yaml, from_dict
from dataeff.experiment.config import STAGES, PipelineConfig

TOY_STAGE = '''"""Stage ``toy``: doubles the best tuned loss in an executor job, then scales it by its own setting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataeff.config import option
from dataeff.experiment.executor import Job
from dataeff.experiment.stage import Context, Stage, StageResult
from dataeff.report.blocks import Block, Heading, Para


@dataclass
class ToyConfig:
    factor: float = option(0.0, "scale of the doubled loss (0: the stage is off)")


@dataclass
class DoubleJob:
    value: float


def double(cfg: DoubleJob, out_dir: Path) -> dict[str, Any]:
    (out_dir / "doubled.txt").write_text(str(2 * cfg.value))
    return {"doubled": 2 * cfg.value}


@dataclass
class ToyResult(StageResult):
    best: float
    scaled: float

    def headline(self) -> list[str]:
        return [f"toy: scaled {self.scaled:.4f}"]


def _check(ctx: Context, cfg: ToyConfig) -> None:
    if cfg.factor > 10:
        raise ValueError("toy.factor above 10")


def _run(ctx: Context, cfg: ToyConfig) -> ToyResult:
    best = min(t.best_loss for t in ctx.results["tuning"].tuned if t.best_loss is not None)
    job = DoubleJob(best)
    [done] = ctx.run([Job(f"{__name__}:double", job, ctx.artifact("toy", job))])
    return ToyResult(best, done.result["doubled"] * cfg.factor)


def _section(results: Any, root: Path) -> list[Block]:
    toy = results.stages.get("toy")
    return [Heading("Toy"), Para(f"best {toy.best:.4f}, scaled {toy.scaled:.4f}")] if toy else []


STAGE = Stage("toy", config=lambda cfg: cfg.toy, enabled=lambda cfg: cfg.factor > 0, result=ToyResult, run=_run,
              section=_section, check=_check)
'''

DRIVER = """
import json, sys
from dataeff.config import load
from dataeff.experiment.config import PipelineConfig, read_results
from dataeff.experiment.pipeline import run_pipeline
results = run_pipeline(load(PipelineConfig, sys.argv[1]), progress=False)
again = read_results(sys.argv[2])
print(json.dumps({"toy": again["toy"].scaled, "verdict": again.verdict()}))
"""


def _register(config_py: str) -> str:
    """The registration of the toy stage: its module among the imports, its config field, its STAGES entry."""
    lines = config_py.splitlines(keepends=True)
    out = []
    for line in lines:
        if line.startswith("from dataeff.experiment.stages import "):
            names = sorted([*line.removeprefix("from dataeff.experiment.stages import ").strip().split(", "), "toy"])
            line = f"from dataeff.experiment.stages import {', '.join(names)}\n"
        out.append(line)
        if line.lstrip().startswith("downstream: downstream.DownstreamStageConfig"):
            out.append('    toy: toy.ToyConfig = section(toy.ToyConfig, "a toy stage")\n')
        if line.strip() == "downstream.STAGE,":
            out.append("    toy.STAGE,\n")
    return "".join(out)


def test_a_new_stage_is_its_own_file_and_two_registration_lines(small_corpus: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(Path(dataeff.__file__).parent, src / "dataeff", ignore=shutil.ignore_patterns("__pycache__"))
    package = src / "dataeff"
    before = {p.relative_to(package): p.read_text() for p in package.rglob("*.py")}
    (package / "experiment" / "stages" / "toy.py").write_text(TOY_STAGE)
    config_py = package / "experiment" / "config.py"
    config_py.write_text(_register(config_py.read_text()))

    after = {p.relative_to(package): p.read_text() for p in package.rglob("*.py")}
    changed = {p for p in after if before.get(p) != after[p]}
    assert changed == {Path("experiment/stages/toy.py"), Path("experiment/config.py")}
    diff = [d for d in difflib.unified_diff(before[Path("experiment/config.py")].splitlines(),
                                            after[Path("experiment/config.py")].splitlines(), lineterm="", n=0)
            if d[:1] in "+-" and not d.startswith(("+++", "---"))]
    added = [d for d in diff if d.startswith("+") and "import" not in d]
    assert len(added) == 2 and all("toy" in d for d in diff if d.startswith("+")), diff

    root = tmp_path / "p"
    cfg = from_dict(PipelineConfig, {
        "name": "toy", "root": str(root),
        "base": {"data": {"corpus": str(small_corpus), "val_docs": 20, "train_tokens": 1500, "cache_dir": str(tmp_path / "cache")},
                 "tokenizer": {"kind": "bpe", "vocab_size": 300}, "model": {"seq_len": 16},
                 "train": {"batch_tokens": 128, "eval_tokens": 512, "progress": False, "epochs": 1}},
        "sizes": ["nano"], "max_extensions": 0, "fit": {"n_boot": 20},
        "recipes": [{"name": "standard", "grid": {"optim.lr": [3e-3, 1e-2]}, "fixed": {"optim.weight_decay": 0.1}}],
        "executor": {"workers": 2, "threads_per_worker": 1},
    })
    path = tmp_path / "toy.yaml"
    dump_yaml(cfg, path)
    text = path.read_text() + "toy:\n  factor: 3.0\n"
    path.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", DRIVER, str(path), str(root / "results.json")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    shown = json.loads(out.stdout.strip().splitlines()[-1])
    doc = json.loads((root / "results.json").read_text())
    best = min(p["best_loss"] for p in doc["tuning"]["tuned"])
    assert doc["toy"] == {"best": best, "scaled": 6 * best} and shown["toy"] == 6 * best
    assert shown["verdict"][-1] == f"toy: scaled {6 * best:.4f}"
    assert (next((root / "toy").iterdir()) / "doubled.txt").read_text() == str(2 * best)
    md = (root / "report" / "report.md").read_text()
    sections = [line for line in md.splitlines() if line.startswith("## ")]
    assert sections[-2:] == ["## Toy", "## Failed runs"] and f"best {best:.4f}, scaled {6 * best:.4f}" in md


def test_every_registered_stage_has_a_config_field_and_a_typed_result() -> None:
    cfg = PipelineConfig()
    names = [s.name for s in STAGES]
    assert names[0] == "tuning" and len(set(names)) == len(names)
    for stage in STAGES:
        assert stage.config(cfg) is not None and isinstance(stage.enabled(stage.config(cfg)), bool)
        assert hasattr(stage.result, "__dataclass_fields__"), stage.name
