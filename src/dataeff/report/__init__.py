"""The experiment report: blocks rendered to Markdown and HTML (``blocks``), shared plot helpers (``plots``) and
the writer (``write``) that lays out each stage's section."""

from dataeff._imports import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"write": ["write_report"]})
