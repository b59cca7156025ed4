"""Semi-supervised training end to end on a tiny synthetic set: EPI + LV, metrics.csv, exact bank resume."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from lvit.train.checkpoint import load_state_file

pytestmark = pytest.mark.slow

SEMI_OVERRIDES = ["model_name=lvit-t", "model.image_size=32", "model.base_channels=8", "data.batch_size=4",
                  "data.num_workers=0", "trainer.progress=false", "trainer.patience=null", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from lvit.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("semi") / "data", n_train=8, n_val=2, n_test=1, size=32,
                              seed=1, progress=False)


def _train(data, run_dir, epochs, semi, resume=False):
    from lvit.train.config import load_config
    from lvit.train.runner import train
    from lvit.train.semi.module import make_setup_hook

    cfg = load_config(None, SEMI_OVERRIDES + [f"trainer.max_epochs={epochs}"])
    return train(cfg, data, run_dir, resume=resume, force=not resume, setup_hook=make_setup_hook(semi))


def test_semi_supervised_run_end_to_end_and_exact_resume(tiny_data, tmp_path, monkeypatch):
    from lvit.train.semi.module import CHECKPOINT_KEY, SemiConfig

    semi = SemiConfig(mode="epi+lv", labeled_fraction=0.25, beta=0.5, warmup_epochs=1,
                      lv_contrast="templates", lv_encoder="minilm")
    run = tmp_path / "run"
    _train(tiny_data, run, 2, semi)

    # The split is written to the run folder: 2 of 8 labelled.
    split = json.loads((run / "labelled_subset.json").read_text())
    assert split["n_labelled"] == 2 and split["n_unlabelled"] == 6
    # Pseudo-label quality is logged per epoch (NaN during the warm-up epoch, a Dice afterwards).
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 2 and "pseudo_dice" in rows[0]
    assert rows[0]["pseudo_dice"] == "nan"
    assert 0.0 <= float(rows[1]["pseudo_dice"]) <= 1.0
    assert float(rows[1]["unlabelled_loss"]) > 0

    state = load_state_file(run / "checkpoints" / "last.ckpt")  # weights_only=True
    bank = state[CHECKPOINT_KEY]["bank"]
    assert int((bank["last_epoch"] == 1).sum()) == 6  # each unlabelled image updated once in epoch 2
    assert int((bank["last_epoch"] == -1).sum()) == 2  # labelled images never
    assert bank["values"].dtype == torch.float16 and float(bank["values"].float().sum()) > 0

    # Resume for one more epoch: the bank restored from last.ckpt equals the saved one exactly.
    from lvit.train.semi import module as semi_module

    captured = {}
    original = semi_module.SemiSupervisedModule.on_load_checkpoint

    def spy(self, checkpoint):
        original(self, checkpoint)
        captured["values"] = self.bank.state_dict()["values"].clone()
        captured["last_epoch"] = self.bank.state_dict()["last_epoch"].clone()

    monkeypatch.setattr(semi_module.SemiSupervisedModule, "on_load_checkpoint", spy)
    _train(tiny_data, run, 3, semi, resume=True)
    assert torch.equal(captured["values"], bank["values"])
    assert torch.equal(captured["last_epoch"], bank["last_epoch"])
    resumed = load_state_file(run / "checkpoints" / "last.ckpt")[CHECKPOINT_KEY]["bank"]
    assert int((resumed["last_epoch"] == 2).sum()) == 6
    assert len(list(csv.DictReader((run / "metrics.csv").open()))) == 3
    # The split was read back, not re-drawn.
    assert json.loads((run / "labelled_subset.json").read_text()) == split


def test_supervised_subset_only_trains_on_labelled(tiny_data, tmp_path):
    from lvit.train.semi.module import SemiConfig

    result = _train(tiny_data, tmp_path / "sup", 1, SemiConfig(mode="none", labeled_fraction=0.5))
    info = (tmp_path / "sup" / "config.yaml").read_text()
    assert result.epochs == 1 and "n_train: 4" in info  # only the labelled half is trained on
    split = json.loads((tmp_path / "sup" / "labelled_subset.json").read_text())
    assert split["n_labelled"] == 4
