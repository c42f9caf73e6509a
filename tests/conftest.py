"""Shared fixtures. Tests that need the real corpora skip cleanly when DATAEFF_DATA_DIR is unset or absent."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Two xdist workers share two cores: one thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture
def data_dir() -> Path:
    value = os.environ.get("DATAEFF_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("DATAEFF_DATA_DIR is not set to the shared data directory")
    return Path(value)


_WORDS = [
    "the", "a", "cat", "dog", "sat", "ran", "on", "under", "big", "small", "red", "blue", "house", "tree",
    "river", "stone", "happy", "sad", "quickly", "slowly", "and", "but", "then", "because", "it", "was",
    "very", "day", "night", "little", "girl", "boy", "found", "played", "with", "her", "his", "friend",
]


def write_small_corpus(directory: Path) -> Path:
    """A blank-line separated .txt corpus of 200 short synthetic documents (seeded, so always the same)."""
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(_WORDS, size=int(rng.integers(5, 40)))) + "." for _ in range(200)]
    path = directory / "small.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    return write_small_corpus(tmp_path)


@pytest.fixture(scope="module")
def small_corpus_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same corpus, shared by a module's tests (for a base run trained once)."""
    return write_small_corpus(tmp_path_factory.mktemp("corpus"))
