"""DDP: two CPU processes on the gloo backend train one epoch through the real CLI (in a subprocess)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_two_gloo_processes_one_epoch(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    from lvit.data.synthetic import generate_synthetic

    data = generate_synthetic(tmp_path / "data", n_train=8, n_val=4, n_test=2, size=64, seed=2, progress=False)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "lvit.cli", "train", "--config", str(REPO / "configs" / "synth.yaml"),
           "--data", str(data), "--out", str(run), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
           "--epochs", "1", "--batch-size", "2", "--no-progress",
           "--set", "model.image_size=64", "--set", "model.base_channels=8", "--set", "model.vit_heads=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and float(rows[0]["val_dice"]) >= 0.0
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "best.safetensors").is_file()
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # 8 training images over 2 processes with batch 2: 2 optimizer steps per process per epoch.
    assert state["global_step"] == 2
