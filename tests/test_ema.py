"""The weight average of a supervised run (optim.ema_decay, lvit.train.ema): its decay ramp and swap by hand, the
update after every optimizer step, validation and the saved weights scoring the average, an exact resume, and the
refusals."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
from torch import nn

OVERRIDES = ["model_name=lvit", "text.encoder=learned", "model.image_size=32", "model.base_channels=8",
             "model.text_tokens=8", "data.batch_size=4", "data.num_workers=0", "trainer.progress=false",
             "trainer.patience=null", "optim.lr=1e-3", "trainer.max_epochs=3"]


class _Net(nn.Module):
    """A 3x3 convolution and a BatchNorm: parameters, float buffers and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 1, 3, padding=1), nn.BatchNorm2d(1)

    def forward(self, image, text=None, text_mask=None):
        return self.norm(self.conv(image[:, :1]))


def test_decay_ramp_by_hand():
    from lvit.train.ema import ema_decay_at

    assert ema_decay_at(1, 0.99) == pytest.approx(2 / 11)
    assert ema_decay_at(5, 0.99) == pytest.approx(6 / 15)
    assert ema_decay_at(89, 0.9) == pytest.approx(0.9)  # 90 / 99 > 0.9: the set decay from here on
    assert ema_decay_at(80, 0.9) == pytest.approx(81 / 90)
    assert ema_decay_at(10_000, 0.999) == 0.999


def test_swap_exchanges_values_and_keeps_the_tensors():
    from lvit.train.ema import swap_weights

    a, b = _Net(), _Net()
    with torch.no_grad():
        a.conv.weight.fill_(1.0), b.conv.weight.fill_(2.0)
        a.norm.running_var.fill_(3.0), b.norm.running_var.fill_(4.0)
        a.norm.num_batches_tracked.fill_(7), b.norm.num_batches_tracked.fill_(9)
    weight = a.conv.weight
    swap_weights(a, b)
    assert a.conv.weight is weight  # an optimizer holding a's parameters still holds them
    assert torch.all(a.conv.weight == 2.0) and torch.all(b.conv.weight == 1.0)
    assert a.norm.running_var.item() == 4.0 and b.norm.running_var.item() == 3.0
    assert a.norm.num_batches_tracked.item() == 9 and b.norm.num_batches_tracked.item() == 7
    with pytest.raises(ValueError, match="same network"):
        swap_weights(a, nn.Conv2d(1, 1, 3))


def _batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand((2, 1, 6, 6), generator=g),
            "mask": (torch.rand((2, 1, 6, 6), generator=g) > 0.5).float(),
            "has_mask": torch.ones(2, dtype=torch.bool), "index": torch.arange(2)}


@pytest.mark.filterwarnings("ignore:.*self.log.*")
@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_average_follows_every_step_and_is_what_validation_scores():
    """Through Lightning: after optimizer step t, average = d_t * average + (1 - d_t) * network; during
    validation the network holds the average's values, and afterwards its own again."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lvit.train.config import load_config
    from lvit.train.ema import ema_decay_at
    from lvit.train.module import SegmentationModule

    torch.manual_seed(0)
    module = SegmentationModule(_Net(), load_config(None, ["optim.ema_decay=0.9", "optim.lr=0.1"]))
    assert not any(p.requires_grad for p in module.ema.parameters())  # the optimizer never sees the average
    items = [{k: v[i] for k, v in _batch(seed).items()} for seed in range(3) for i in range(2)]
    seen = []  # (average, network) before each step and after the last
    in_validation = []

    def record(m):
        seen.append((copy.deepcopy(m.ema["model"].state_dict()), copy.deepcopy(m.model.state_dict())))

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, m, batch, batch_idx):
            record(m)

        def on_validation_batch_start(self, trainer, m, batch, batch_idx, dataloader_idx=0):
            in_validation.append(copy.deepcopy(m.model.state_dict()))

        def on_train_epoch_end(self, trainer, m):  # after validation
            record(m)

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[Watch()])
    trainer.fit(module, DataLoader(items, batch_size=2), DataLoader(items[:2], batch_size=2))
    assert trainer.global_step == 3 and len(seen) == 4
    # The average starts as the initial network.
    assert all(torch.equal(seen[0][0][k], seen[0][1][k]) for k in seen[0][0])
    for step, ((before, _), (after, network)) in enumerate(zip(seen, seen[1:]), start=1):
        d = ema_decay_at(step, 0.9)  # 2/11, 3/12, 4/13: the ramp, not yet 0.9
        for key, value in before.items():
            if value.dtype.is_floating_point:
                assert torch.allclose(after[key], d * value + (1 - d) * network[key], atol=1e-6), (step, key)
            else:
                assert torch.equal(after[key], network[key]), key
    # Validation ran on the average's values; the network got its own back (and the weights saved are the average).
    average, network = seen[-1]
    assert all(torch.equal(in_validation[0][k], average[k]) for k in average)
    assert not torch.equal(average["conv.weight"], network["conv.weight"])
    assert torch.equal(module.model.conv.weight, network["conv.weight"])
    assert module.weights_to_save()[0] is module.ema["model"]


def _config(*extra):
    from lvit.train.config import load_config

    return load_config(None, [*OVERRIDES, *extra])


def _rows(run):
    with (run / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from lvit.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("ema") / "data", n_train=8, n_val=2, n_test=1, size=32,
                              seed=1, progress=False)


@pytest.mark.slow
def test_run_with_average_saves_it_resumes_exactly_and_refuses_a_state_without_one(tiny_data, tmp_path):
    from lvit.artifacts.runs import load_state_file, load_weights
    from lvit.commands.cli import main
    from lvit.core.errors import CheckpointError, ConfigError
    from lvit.train.plugins import Callbacks
    from lvit.train.runner import resume_config, train
    from lvit.train.semi.branch import KeepStateAfter, branch_run

    direct = tmp_path / "direct"
    train(_config("optim.ema_decay=0.5"), tiny_data, direct)
    rows = _rows(direct)
    assert len(rows) == 3
    weights = load_state_file(direct / "checkpoints" / "last.ckpt")["state_dict"]
    average = {k[len("ema."):]: v for k, v in weights.items() if k.startswith("ema.")}
    trained = {k: v for k, v in weights.items() if k.startswith(("model.", "text_embedding."))}
    assert average.keys() == trained.keys() and any(k.startswith("text_embedding.") for k in average)
    assert not all(torch.equal(average[k], trained[k]) for k in average)
    saved = load_weights(direct / "checkpoints" / "last.safetensors")  # the average, as validated
    for key, value in saved.items():
        assert torch.equal(value, average[key if key.startswith("text_embedding.") else "model." + key]), key

    # The same run without the average trains the same network (the average never feeds back) but validates it.
    plain = tmp_path / "plain"
    train(_config(), tiny_data, plain)
    plain_weights = load_state_file(plain / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(plain_weights[k], trained[k]) for k in trained)
    assert [r["val_loss"] for r in _rows(plain)] != [r["val_loss"] for r in rows]

    # `lvit train --set optim.ema_decay=0.5`, stopped after epoch 2 and resumed: the same figures and weights.
    resumed = tmp_path / "resumed"
    settings = [*OVERRIDES, "optim.ema_decay=0.5", "trainer.max_epochs=2"]
    assert main(["train", "--data", str(tiny_data), "--out", str(resumed),
                 *[arg for item in settings for arg in ("--set", item)]]) == 0
    assert main(["train", "--out", str(resumed), "--resume", "--epochs", "3"]) == 0
    assert _rows(resumed) == rows
    again = load_state_file(resumed / "checkpoints" / "last.ckpt")["state_dict"]
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)

    # A state written without the average is not continued by a run with one: a branch from a steps run's kept
    # warm-up is refused (the average acts from the first step, so the branch would not equal a run from scratch),
    # and so is a run whose saved config was edited to add it.
    steps = ["semi.mode=epi", "semi.labeled_fraction=0.5", "semi.warmup_epochs=3"]
    shared = tmp_path / "shared"
    train(_config(*steps), tiny_data, shared, plugins=[Callbacks(KeepStateAfter(shared, 1))])
    with pytest.raises(ConfigError, match="optim.ema_decay differs"):
        branch_run(shared, 1, tmp_path / "branched", _config(*steps, "optim.ema_decay=0.5"))
    config_file = plain / "config.yaml"
    config_file.write_text(config_file.read_text().replace("ema_decay: 0.0", "ema_decay: 0.5"))
    with pytest.raises(CheckpointError, match="no weight average"):
        train(resume_config(plain, ["trainer.max_epochs=4"])[0], tiny_data, plain, resume=True)


def test_refusals():
    from lvit.core.errors import ConfigError
    from lvit.train.config import load_config

    assert load_config(None, []).optim.ema_decay == 0.0
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match=r"optim.ema_decay must be a number in \[0, 1\)"):
            load_config(None, [f"optim.ema_decay={bad}"])
    with pytest.raises(ConfigError, match="optim.ema_decay: expected a number"):
        load_config(None, ["optim.ema_decay=true"])
    with pytest.raises(ConfigError, match="does not combine with semi.mode mean-teacher"):
        load_config(None, ["optim.ema_decay=0.9", "semi.mode=mean-teacher", "semi.labeled_fraction=0.25"])
