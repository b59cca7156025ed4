"""Semi-supervised training end to end on a tiny synthetic set: EPI + LV, metrics.csv, exact bank resume."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from lvit.artifacts.runs import load_state_file

pytestmark = pytest.mark.slow

SEMI_OVERRIDES = ["model_name=lvit-t", "model.image_size=32", "model.base_channels=8", "data.batch_size=4",
                  "data.num_workers=0", "trainer.progress=false", "trainer.patience=null", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from lvit.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("semi") / "data", n_train=8, n_val=2, n_test=1, size=32,
                              seed=1, progress=False)


def _train(data, run_dir, epochs, semi, resume=False, overrides=()):
    from lvit.train.config import load_config
    from lvit.train.runner import train

    cfg = load_config(None, SEMI_OVERRIDES + [f"trainer.max_epochs={epochs}", *overrides])
    cfg.semi = semi
    cfg.validate()
    return train(cfg, data, run_dir, resume=resume, force=not resume)


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
    # The warm-up epoch iterates labelled images only (no unlabelled prediction to score), the next one all.
    assert rows[0]["unlabelled_pred_dice"] == "nan" and rows[1]["unlabelled_pred_dice"] != "nan"
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
    # The LV report vectors were cached with the dataset's text cache: the resumed run never loads the encoder.
    assert list((tiny_data / ".lvit_cache").glob("text-*-L64.safetensors"))
    from lvit.text.encoders import HFEncoder

    def no_model(self):
        raise AssertionError("report vectors should come from the text cache")

    monkeypatch.setattr(HFEncoder, "_load", no_model)
    # With a worker process the first batches are drawn while Lightning restores the run, before it tells the
    # sampler the epoch: the sampler must follow the restored epoch (past the warm-up) by itself.
    _train(tiny_data, run, 3, semi, resume=True, overrides=["data.num_workers=1"])
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


def test_bank_starts_from_the_warm_up_models_eval_prediction():
    import numpy as np
    from torch import nn

    from lvit.train.config import load_config
    from lvit.train.semi.module import SemiConfig, SemiSupervisedModule
    from lvit.train.semi.pseudo_labels import PseudoLabelBank

    class Net(nn.Module):  # dropout makes train-mode and eval-mode predictions differ
        def __init__(self):
            super().__init__()
            self.conv, self.drop = nn.Conv2d(1, 1, 3, padding=1), nn.Dropout(0.5)

        def forward(self, image, text=None, text_mask=None):
            return self.conv(self.drop(image))

    torch.manual_seed(0)
    images = torch.rand(5, 1, 8, 8)
    dataset = [{"image": images[i], "index": i} for i in range(5)]
    bank = PseudoLabelBank(5, (8, 8), beta=0.99, storage="memory")
    cfg = load_config(None, SEMI_OVERRIDES)
    net = Net()
    module = SemiSupervisedModule(net, cfg, SemiConfig(mode="epi", labeled_fraction=0.4, warmup_epochs=0), bank,
                                  unlabelled_source=(dataset, np.array([1, 3, 4])))
    module.train()
    module.initialise_bank()
    assert module.training  # mode restored
    assert bank.initialised().tolist() == [False, True, False, True, True]
    expected = torch.sigmoid(net.eval()(images[[1, 3, 4]]))  # eval mode: no dropout
    assert torch.allclose(bank.get([1, 3, 4]).float(), expected, atol=1e-3)
    # Already-initialised images keep their pseudo label (a resumed run past the warm-up does not reset it).
    before = bank.get([1, 3, 4]).clone()
    net.conv.weight.data.add_(1.0)
    module.initialise_bank()
    assert torch.equal(bank.get([1, 3, 4]), before)
