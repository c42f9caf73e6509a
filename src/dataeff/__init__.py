"""dataeff: data-efficient language-model pretraining."""

from dataeff import _imports

__version__ = "0.1.0"

_imports.install()
