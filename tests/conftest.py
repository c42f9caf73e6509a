"""Shared fixtures. Tests that need the real corpora skip cleanly when DATAEFF_DATA_DIR is unset or absent."""

from __future__ import annotations

import os
from pathlib import Path

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
