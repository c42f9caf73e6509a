"""The package's structure, checked: no import cycle, layers that import only downward, config modules that
import only configs, and the flat module paths of dataeff 0.1 still importable (see docs/architecture.md)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import dataeff
from dataeff._imports import MOVED

SRC = Path(dataeff.__file__).resolve().parent

# Which packages each layer may import (besides the top-level utility modules: config, errors, fsutil).
LAYERS: dict[str, set[str]] = {
    "data": set(),
    "model": {"data"},  # Hugging Face export writes the tokenizer beside the weights
    "train": {"data", "model", "eval"},
    "eval": {"data", "model", "train"},
    "generate": {"data", "model", "train", "eval"},
    "synth": {"data", "model", "train", "eval", "generate"},
    "experiment": {"data", "model", "train", "eval", "generate", "synth", "report"},
    "report": {"experiment"},
}
CONFIG_MODULES = ["dataeff.data.config", "dataeff.model.config", "dataeff.train.config"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """Every dataeff module ``module`` imports, at module level or inside functions (TYPE_CHECKING blocks
    excepted: they never run). A package's own ancestors are not edges: importing them is implied."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for stmt in node.body for n in ast.walk(stmt)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            if target in MOVED:
                target = MOVED[target][0]
            r = _resolve(target)
            if r and r != module and not module.startswith(r + "."):
                found.add(r)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    graph = {m: imports_of(m) for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n):], n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_layers_import_only_what_they_may() -> None:
    for module in MODULES:
        layer = module.split(".")[1] if module.count(".") else None
        if layer not in LAYERS:
            continue
        for dep in imports_of(module):
            other = dep.split(".")[1] if dep.count(".") else None
            if other in LAYERS and other != layer:
                assert other in LAYERS[layer], f"{module} imports {dep}: {layer}/ may import only {sorted(LAYERS[layer])}"


def test_training_never_imports_synthetic_data_producers() -> None:
    for module in MODULES:
        if module.startswith(("dataeff.train", "dataeff.data", "dataeff.model", "dataeff.eval")):
            assert not any(d.startswith("dataeff.synth") for d in imports_of(module)), module


def test_config_modules_import_only_configs() -> None:
    allowed = {"dataeff.config", "dataeff.errors", "dataeff.fsutil", *CONFIG_MODULES}
    for module in CONFIG_MODULES:
        assert imports_of(module) <= allowed, f"{module} imports {sorted(imports_of(module) - allowed)}"
    # Nor, through them, any tensor library: a sweep can be planned where torch is not installed.
    code = "import sys; " + "; ".join(f"import {m}" for m in CONFIG_MODULES) + "; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_flat_module_paths_still_import(old: str) -> None:
    module = importlib.import_module(old)
    home = importlib.import_module(MOVED[old][0])
    if len(MOVED[old]) == 1:
        assert module is home
    # Every public name of every new home answers through the old path.
    for name in (n for h in MOVED[old] for n in vars(importlib.import_module(h)) if not n.startswith("_")):
        assert getattr(module, name) is not None


def test_public_names_of_the_old_packages_still_import(small_corpus: Path) -> None:
    from dataeff.data import DataConfig, load_documents
    from dataeff.model import ModelConfig, Transformer, count_parameters
    from dataeff.report import write_report
    from dataeff.train import RunConfig, run_hash, train
    from dataeff.train.loop import train as loop_train

    assert train is loop_train
    assert callable(write_report) and callable(load_documents) and callable(count_parameters)
    corpus = DataConfig(corpus=str(small_corpus))
    assert run_hash(RunConfig(data=corpus, model=ModelConfig())) == run_hash(RunConfig(data=corpus))
    assert Transformer.__module__ == "dataeff.model.transformer"
