"""Shared test fixtures. Tests stay small: tiny images, narrow models, a handful of samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two CPU cores on the reference machine: don't oversubscribe them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (real MoNuSeg data, LV templates); skip cleanly where absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (shared data is only beside the developers' and CI's checkouts)")
    return SHARED
