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


def _ddp_train(tmp_path, size: int, n_val: int, n_test: int, extra: list[str]) -> Path:
    """Generate 8 synthetic training images and train on them with two gloo processes through the CLI."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    from lvit.data.synthetic import generate_synthetic

    data = generate_synthetic(tmp_path / "data", n_train=8, n_val=n_val, n_test=n_test, size=size, seed=2,
                              progress=False)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "lvit", "train", "--config", "synth",
           "--data", str(data), "--out", str(run), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
           "--batch-size", "2", "--no-progress", "--set", f"model.image_size={size}",
           "--set", "model.base_channels=8", "--set", "model.vit_heads=4", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.mark.slow
def test_ddp_two_gloo_processes_one_epoch(tmp_path):
    run = _ddp_train(tmp_path, 64, 4, 2, ["--epochs", "1"])
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and float(rows[0]["val_dice"]) >= 0.0
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "best.safetensors").is_file()
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # 8 training images over 2 processes with batch 2: 2 optimizer steps per process per epoch.
    assert state["global_step"] == 2


@pytest.mark.slow
def test_ddp_semi_supervised_warm_up_then_identical_banks(tmp_path):
    """Two gloo processes: the warm-up epoch draws labelled images only (Lightning shards WarmupSampler), then P_0
    is predicted in shares and gathered, so every unlabelled image is in the bank exactly once."""
    run = _ddp_train(tmp_path, 32, 2, 1, ["--epochs", "2", "--labeled-fraction", "0.25", "--semi", "epi",
                                          "--semi-warmup", "1"])
    rows = list(csv.DictReader((run / "metrics.csv").open(newline="")))
    # Epoch 1 (warm-up) saw no unlabelled image on either rank; epoch 2 scored the pseudo labels.
    assert rows[0]["unlabelled_pred_dice"] == "nan" and rows[1]["pseudo_dice"] != "nan"
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4  # 8 images / 2 ranks / batch 2, two epochs: the length never changed
    bank = state["semi_supervised"]["bank"]
    assert int((bank["last_epoch"] == 1).sum()) == 6 and int((bank["last_epoch"] == -1).sum()) == 2
