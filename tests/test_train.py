"""Training end to end on a tiny synthetic set: run folder, loss decrease, exact resume, NaN stop, clobbering."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lvit.artifacts.runs import load_run, load_state_file, load_weights
from lvit.core.errors import CheckpointError, OutputExistsError, TrainingDiverged
from lvit.presets import preset_path
from lvit.train import load_config
from lvit.train.module import SegmentationModule
from lvit.train.plugins import Callbacks
from lvit.train.runner import resume_config, train

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.image_size=64", "model.base_channels=8", "model.vit_heads=4", "data.batch_size=2",
        "data.num_workers=0", "trainer.progress=false", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def synth64(tmp_path_factory) -> Path:
    from lvit.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("synth") / "data", n_train=12, n_val=4, n_test=4,
                              size=64, seed=0, progress=False)


def tiny_config(*extra: str):
    return load_config(preset_path("synth"), TINY + list(extra))


def read_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_two_epochs_write_run_folder_and_loss_goes_down(synth64, tmp_path):
    result = train(tiny_config("trainer.max_epochs=2"), synth64, tmp_path / "run")
    run = tmp_path / "run"
    for rel in ("config.yaml", "metrics.csv", "checkpoints/best.safetensors", "checkpoints/last.safetensors",
                "checkpoints/last.ckpt"):
        assert (run / rel).is_file(), rel
    assert any((run / "tensorboard").iterdir())
    rows = read_rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert set(rows[0]) >= {"train_loss", "val_loss", "val_dice", "val_iou", "lr"}
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert 0.0 <= result.best_dice <= 1.0 and result.epochs == 2
    # The full state loads with weights_only=True (no pickled code) and the run rebuilds for inference.
    state = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert state["epoch"] == 1 and "RunCheckpoint" in state["callbacks"]
    loaded = load_run(run)
    model, cfg = loaded.model, loaded.config
    assert cfg["model_name"] == "lvit" and cfg["text_encoder"]["dim"] == cfg["model"]["text_dim"]
    best = load_weights(run / "checkpoints/best.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(value, best[key]), key
    assert not model.training


class _Crash(Exception):
    pass


class _CrashAt(pl.Callback):
    """Simulates a killed run: raises in the middle of ``epoch`` (after some optimizer steps)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 2:
            raise _Crash("simulated kill")


def test_resume_after_interruption_gives_identical_weights(synth64, tmp_path):
    epochs = ["trainer.max_epochs=3", "optim.t0=2"]  # t0=2: the resumed epoch crosses a warm restart
    train(tiny_config(*epochs), synth64, tmp_path / "full")

    with pytest.raises(_Crash):
        train(tiny_config(*epochs), synth64, tmp_path / "cut", plugins=[Callbacks(_CrashAt(epoch=2))])
    assert len(read_rows(tmp_path / "cut")) == 2  # epochs 1-2 finished before the kill
    config, root = resume_config(tmp_path / "cut")
    assert Path(root) == synth64.resolve()
    result = train(config, root, tmp_path / "cut", resume=True)
    assert result.epochs == 3

    full = load_weights(tmp_path / "full/checkpoints/last.safetensors")
    resumed = load_weights(tmp_path / "cut/checkpoints/last.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    def without_time(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert without_time(read_rows(tmp_path / "full")) == without_time(read_rows(tmp_path / "cut"))


def test_worker_loaders_take_every_random_choice_from_the_main_stream(synth64):
    """With DataLoader workers (kept across epochs) the order and each item's augmentation follow from the main
    process's torch stream at the epoch's start: the same for any number of workers, and a loader created anew
    with the stream restored (a resumed run) repeats the epoch a kept one gives; creating iterators (training
    or validation) takes nothing from that stream."""
    import monai.transforms  # noqa: F401 - imported before the workers fork, as lvit train has it

    from lvit.train.checkpoint import rng_state, set_rng_state
    from lvit.train.datamodule import build_train_data

    def loaders(workers: int):
        config = tiny_config("model_name=lvit-t", f"data.num_workers={workers}", "data.batch_size=4")
        return build_train_data(config, synth64).loaders(config)

    def epoch(loader) -> list[torch.Tensor]:
        return [torch.cat([b["image"].flatten(), b["mask"].flatten(), b["index"].float()]) for b in loader]

    def run(workers: int):
        torch.manual_seed(5)
        train_loader, val_loader = loaders(workers)
        first = epoch(train_loader)
        saved = rng_state()
        epoch(val_loader)
        assert torch.equal(torch.get_rng_state(), saved["torch"])  # validation drew nothing
        return first, saved, epoch(train_loader), torch.get_rng_state()

    first, saved, second, after = run(2)
    assert not all(torch.equal(a, b) for a, b in zip(first, second))  # the epochs differ (order, augmentation)
    one_worker = run(1)
    assert all(torch.equal(a, b) for a, b in zip(one_worker[0] + one_worker[2], first + second))
    set_rng_state(saved)
    train_loader, _ = loaders(2)
    resumed = epoch(train_loader)
    assert all(torch.equal(a, b) for a, b in zip(resumed, second))
    assert torch.equal(torch.get_rng_state(), after)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(synth64, tmp_path, monkeypatch):
    original = SegmentationModule.supervised_loss

    def poisoned(self, logits, mask):
        loss = original(self, logits, mask)
        return loss * float("nan") if self.current_epoch == 1 and self.training else loss

    monkeypatch.setattr(SegmentationModule, "supervised_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="epoch 1"):
        train(tiny_config("trainer.max_epochs=3"), synth64, tmp_path / "run")
    weights = load_weights(tmp_path / "run/checkpoints/last.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert len(read_rows(tmp_path / "run")) == 1


def test_refuses_to_clobber_a_run_folder(synth64, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        train(tiny_config(), synth64, run)
    assert (run / "notes.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny_config(), synth64, run, resume=True)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as fh:
        torch.save({"state_dict": {}, "payload": _Evil()}, fh)
    with pytest.raises(CheckpointError, match="refused"):
        load_state_file(path)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        load_state_file(tmp_path / "junk.ckpt")


def test_lr_follows_cosine_warm_restarts():
    """Official schedule: eta_min + (lr - eta_min) * (1 + cos(pi * t / T0)) / 2, restarting every T0 epochs."""
    from lvit.train.module import SegmentationModule

    cfg = tiny_config("optim.lr=1e-3", "optim.t0=4")
    module = SegmentationModule(torch.nn.Linear(1, 1), cfg)
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1e-4 + 9e-4 * (1 + math.cos(math.pi * (e % 4) / 4)) / 2 for e in range(6)]
    assert lrs == pytest.approx(expected)
    assert load_config(None, ["optim.lr=1e-4"]).effective_eta_min == pytest.approx(1e-5)
