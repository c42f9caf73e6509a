"""How names are found: lazy package exports, and the flat module paths of dataeff 0.1 that still import.

Each package's ``__init__`` lists the public names of its modules and imports a module only when one of its
names is first used, so ``import dataeff.train.config`` does not pull in the training loop (and with it torch)
and packages never import each other just by being imported.

Until the layered layout, dataeff was one flat package (``dataeff.tokens``, ``dataeff.scaling``, ...). Those
paths keep working: :data:`MOVED` maps each to its new home, and an import hook makes the old name the very
same module object (so ``monkeypatch.setattr(dataeff.tokens, ...)`` still reaches the code it patches). An
old module that was split answers for the names of all its parts.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

# Old flat module -> its new home(s). The first is the module itself; later ones hold names split off it.
MOVED: dict[str, tuple[str, ...]] = {
    "dataeff.tokenizer": ("dataeff.data.tokenizer",),
    "dataeff.tokens": ("dataeff.data.tokens",),
    "dataeff.order": ("dataeff.data.order",),
    "dataeff.hf": ("dataeff.model.hf",),
    "dataeff.checkpoint": ("dataeff.train.checkpoint",),
    "dataeff.averaging": ("dataeff.train.averaging",),
    "dataeff.distill": ("dataeff.train.distill",),
    "dataeff.dist": ("dataeff.train.dist",),
    "dataeff.rundir": ("dataeff.train.rundir",),
    "dataeff.evaluate": ("dataeff.eval.loss",),
    "dataeff.ensemble": ("dataeff.eval.ensemble",),
    "dataeff.tasks": ("dataeff.eval.tasks",),
    "dataeff.lm_eval_adapter": ("dataeff.eval.lm_eval_adapter",),
    "dataeff.evaluate_run": ("dataeff.eval.command", "dataeff.train.rundir"),
    "dataeff.sample": ("dataeff.generate.sample",),
    "dataeff.pipeline": ("dataeff.experiment.pipeline", "dataeff.experiment.config", "dataeff.experiment.stage",
                         "dataeff.experiment.fitting", "dataeff.experiment.stages.tuning",
                         "dataeff.experiment.stages.overfitting", "dataeff.experiment.stages.ensembles",
                         "dataeff.experiment.stages.distillation", "dataeff.experiment.stages.downstream"),
    "dataeff.executor": ("dataeff.experiment.executor",),
    "dataeff.runstore": ("dataeff.experiment.runstore",),
    "dataeff.tune": ("dataeff.experiment.tune",),
    "dataeff.scaling": ("dataeff.experiment.scaling",),
    "dataeff.ensemble_train": ("dataeff.experiment.ensemble_train",),
}


def lazy_exports(package: str, modules: dict[str, list[str]]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a package whose ``modules`` (a submodule name -> the public names it
    defines) are imported on first use of one of their names."""
    where = {name: f"{package}.{module}" for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return __getattr__, __dir__


class _Union(types.ModuleType):
    """An old module that was split: its names are looked up in each of its new homes in turn."""

    def __init__(self, name: str, homes: tuple[str, ...]):
        super().__init__(name)
        self.__homes = homes

    def __getattr__(self, name: str) -> Any:
        for home in self.__homes:
            module = importlib.import_module(home)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        homes = MOVED[spec.name]
        return importlib.import_module(homes[0]) if len(homes) == 1 else _Union(spec.name, homes)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the module is its new home, already imported."""

    def get_code(self, fullname: str) -> types.CodeType | None:
        # `python -m dataeff.lm_eval_adapter` runs the new home's code, as `-m` would have run the old file.
        spec = importlib.util.find_spec(MOVED[fullname][0])
        loader = spec.loader if spec is not None else None
        return loader.get_code(spec.name) if isinstance(loader, importlib.abc.InspectLoader) and spec else None


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
