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
    """A 3x3 convolution and a BatchNorm (parameters, float buffers and an integer buffer), plus the mean of the
    report's token vectors as a bias, so that a learned text embedding trains too."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 1, 3, padding=1), nn.BatchNorm2d(1)

    def forward(self, image, text=None, text_mask=None):
        out = self.norm(self.conv(image[:, :1]))
        return out if text is None else out + text.mean(dim=(1, 2)).view(-1, 1, 1, 1)


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
            "text_ids": torch.randint(1, 6, (2, 3), generator=g),
            "has_mask": torch.ones(2, dtype=torch.bool), "index": torch.arange(2)}


def _module(*overrides):
    from lvit.train.config import load_config
    from lvit.train.module import SegmentationModule

    torch.manual_seed(0)
    return SegmentationModule(_Net(), load_config(None, ["optim.ema_decay=0.9", "optim.lr=0.1", *overrides]),
                              text_embedding=nn.Embedding(6, 3, padding_idx=0))


def _network(m) -> dict:
    """The trained network and text embedding, keyed as in the average (``m.ema``)."""
    return {**{f"model.{k}": v for k, v in m.model.state_dict().items()},
            **{f"text_embedding.{k}": v for k, v in m.text_embedding.state_dict().items()}}


@pytest.mark.filterwarnings("ignore:.*self.log.*")
@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_average_follows_every_step_and_is_what_validation_scores():
    """Through Lightning: after optimizer step t, average = d_t * average + (1 - d_t) * network; during
    validation the network holds the average's values, and afterwards its own again."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lvit.train.ema import ema_decay_at

    module = _module()
    assert not any(p.requires_grad for p in module.ema.parameters())  # the optimizer never sees the average
    items = [{k: v[i] for k, v in _batch(seed).items()} for seed in range(3) for i in range(2)]
    seen = []  # (average, network) before each step and after the last
    in_validation = []

    def record(m):
        seen.append((copy.deepcopy(m.ema.state_dict()), copy.deepcopy(_network(m))))

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, m, batch, batch_idx):
            record(m)

        def on_validation_batch_start(self, trainer, m, batch, batch_idx, dataloader_idx=0):
            in_validation.append(copy.deepcopy(_network(m)))

        def on_train_epoch_end(self, trainer, m):  # after validation
            record(m)

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[Watch()])
    trainer.fit(module, DataLoader(items, batch_size=2), DataLoader(items[:2], batch_size=2))
    assert trainer.global_step == 3 and len(seen) == 4
    # The average starts as the initial network (and text embedding).
    assert seen[0][0].keys() == seen[0][1].keys() and "text_embedding.weight" in seen[0][0]
    assert all(torch.equal(seen[0][0][k], seen[0][1][k]) for k in seen[0][0])
    for step, ((before, _), (after, network)) in enumerate(zip(seen, seen[1:]), start=1):
        d = ema_decay_at(step, 0.9)  # 2/11, 3/12, 4/13: the ramp, not yet 0.9
        for key, value in before.items():
            if value.dtype.is_floating_point:
                assert torch.allclose(after[key], d * value + (1 - d) * network[key], atol=1e-6), (step, key)
            else:
                assert torch.equal(after[key], network[key]), key
        for key in ("model.conv.weight", "text_embedding.weight"):  # both trained, so both averages moved
            assert not torch.equal(after[key], before[key]), (step, key)
    # Validation ran on the average's values; the network got its own back (and the weights saved are the average).
    average, network = seen[-1]
    assert all(torch.equal(in_validation[0][k], average[k]) for k in average)
    for key in ("model.conv.weight", "text_embedding.weight"):
        assert not torch.equal(average[key], network[key])
    assert torch.equal(module.model.conv.weight, network["model.conv.weight"])
    assert torch.equal(module.text_embedding.weight, network["text_embedding.weight"])
    saved_model, saved_embedding = module.weights_to_save()
    assert saved_model is module.ema["model"] and saved_embedding is module.ema["text_embedding"]


def test_a_checkpoint_taken_during_validation_keeps_the_network_and_the_average_apart():
    module = _module()
    with torch.no_grad():
        for p in module.ema.parameters():
            p.add_(1.0)  # an average that differs from the network
    network, average = copy.deepcopy(_network(module)), copy.deepcopy(module.ema.state_dict())
    module.on_validation_start()  # the average swapped in, as while validating
    assert torch.equal(module.model.conv.weight, average["model.conv.weight"])
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    state = checkpoint["state_dict"]
    for key in network:
        assert torch.equal(state[key], network[key]) and torch.equal(state["ema." + key], average[key]), key
    module.on_validation_end()
    assert all(torch.equal(v, network[k]) for k, v in _network(module).items())


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

    # The EPI module (the steps-matched rows of bench/qata.py) keeps and saves the average too, pseudo labels on:
    # it moves in every epoch, warm-up and pseudo-label epochs alike.
    import lightning.pytorch as pl

    averages = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, m):
            averages.append({k: v.clone() for k, v in m.ema.state_dict().items() if v.is_floating_point()})

    epi = tmp_path / "epi"
    train(_config("semi.mode=epi", "semi.labeled_fraction=0.5", "semi.warmup_epochs=1", "optim.ema_decay=0.5"),
          tiny_data, epi, plugins=[Callbacks(Record())])
    assert len(averages) == 3
    for before, after in zip(averages, averages[1:]):
        for part in ("model.", "text_embedding."):
            assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(part)), part
    state = load_state_file(epi / "checkpoints" / "last.ckpt")["state_dict"]
    saved = load_weights(epi / "checkpoints" / "last.safetensors")
    for key, value in saved.items():
        assert torch.equal(value, state["ema." + (key if key.startswith("text_embedding.") else "model." + key)]), key

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
    with pytest.raises(ConfigError, match="does not combine with trainer.precision bf16-true"):
        load_config(None, ["optim.ema_decay=0.9", "trainer.precision=bf16-true"])
    with pytest.raises(ConfigError, match="does not combine with semi.mode mean-teacher"):
        load_config(None, ["optim.ema_decay=0.9", "semi.mode=mean-teacher", "semi.labeled_fraction=0.25"])
