"""Shared test fixtures. Tests stay small: tiny images, narrow models, a handful of samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see lvit/__init__.py

import torch  # noqa: E402

# Tests use tiny tensors: one intra-op thread is fastest, and on a busy 2-core machine extra OpenMP threads only
# spin waiting for CPU time (measured: a tiny backward pass 0.27 s with 1 thread vs 5.8 s with 2 under load).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (real MoNuSeg data, LV templates); skip cleanly where absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (shared data is only beside the developers' and CI's checkouts)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """A tiny synthetic dataset in the official layout (12 train / 4 val / 4 test, 64 px, seed 0); its root.

    Shared by the whole session: treat it as read-only (copy it before corrupting or extending it).
    """
    from lvit.data import generate_synthetic

    root = tmp_path_factory.mktemp("tiny_synth") / "synth"
    generate_synthetic(root, n_train=12, n_val=4, n_test=4, size=64, seed=0, progress=False)
    return root
