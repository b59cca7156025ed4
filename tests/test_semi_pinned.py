"""The semi-supervised step pinned with a stub network: EPI targets (paper Eq. 8), the unlabelled loss, one bank
update per image per epoch, and the ``--beta`` / ``--lv-weight`` flags reaching the bank and the loss.

The stub returns pre-set probabilities per (epoch, image), so every pseudo label is a fraction worked out by
hand: with beta = 0.75 and predictions in {1/4, 1/2, 3/4}, P_1 is in sixteenths and P_2 in 64ths, exact in the
bank's float16.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

BETA, ALPHA = 0.75, 0.3
LABELLED = [True, False, False, False]  # image 0 has a mask; 1, 2, 3 are unlabelled
ORDER = [1, 2, 3, 0, 1, 3]  # every epoch; batches of 2: [1, 2], [3, 0], [1, 3] - images 1 and 3 twice per epoch

# Probabilities the stub predicts, per epoch and image (2 x 2 maps).
Q = {
    0: {0: [[.75, .25], [.25, .25]], 1: [[.25, .75], [.5, .5]], 2: [[.75, .25], [.25, .25]], 3: [[.5, .5], [.5, .5]]},
    1: {0: [[.75, .25], [.25, .25]], 1: [[.75, .75], [.25, .25]], 2: [[.25, .25], [.75, .75]],
        3: [[.75, .25], [.75, .25]]},
    2: {0: [[.75, .25], [.25, .25]], 1: [[.5, .25], [.75, .25]], 2: [[.75, .75], [.75, .75]],
        3: [[.25, .25], [.25, .25]]},
}
# Pseudo labels after each epoch, by hand. Warm-up 0: P_0 is the model's prediction at the start of epoch 0
# (initialise_bank), which counts as epoch 0's update; then P_e = 0.75 * P_{e-1} + 0.25 * Q_e.
P = {
    0: {i: Q[0][i] for i in (1, 2, 3)},
    1: {1: [[.375, .75], [.4375, .4375]],  # .75 * [[.25, .75], [.5, .5]] + .25 * [[.75, .75], [.25, .25]]
        2: [[.625, .25], [.375, .375]],  # .75 * [[.75, .25], [.25, .25]] + .25 * [[.25, .25], [.75, .75]]
        3: [[.5625, .4375], [.5625, .4375]]},  # .75 * .5 + .25 * [[.75, .25], [.75, .25]]
    2: {1: [[.40625, .625], [.515625, .390625]],  # .75 * P_1 + .25 * [[.5, .25], [.75, .25]]
        2: [[.65625, .375], [.46875, .46875]],  # .75 * P_1 + .25 * .75
        3: [[.484375, .390625], [.484375, .390625]]},  # .75 * P_1 + .25 * .25
}
CONTRAST = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 0.0]]]])  # [2, 1, 2, 2], unequal areas
CONTRAST_INDEX = torch.tensor([-1, 0, 1, 1])  # image -> row of CONTRAST (-1: labelled)


def _logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


class EpochStub(nn.Module):
    """Logits = logit(Q[epoch][image]); the image is identified by its constant pixel value (its index)."""

    def __init__(self):
        super().__init__()
        self.table = torch.stack([torch.stack([_logit(Q[e][i]) for i in range(4)]) for e in range(3)])[:, :, None]
        self.w = nn.Parameter(torch.ones(()))  # gets a zero gradient: the logits never change with training
        self.epoch = lambda: 0

    def forward(self, image, text=None, text_mask=None):
        index = image[:, 0, 0, 0].round().long()
        return self.table[self.epoch(), index] + 0.0 * self.w  # [B, 1, 2, 2]


class Recorder(nn.Module):
    """Stands in for the module's loss_fn for one call: records the target, returns the real loss."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.targets = inner, []

    def forward(self, logits, target):
        self.targets.append(target.detach().cpu().clone())
        return self.inner(logits, target)


class FixedOrder(Sampler[int]):
    def __iter__(self):
        return iter(ORDER)

    def __len__(self):
        return len(ORDER)


def _items():
    items = []
    for i in range(4):
        mask = CONTRAST[0].clone() if LABELLED[i] else torch.zeros(1, 2, 2)
        items.append({"image": torch.full((1, 2, 2), float(i)), "mask": mask, "has_mask": LABELLED[i], "index": i,
                      "hidden_mask": torch.zeros(1, 2, 2), "hidden_has_mask": False})
    return items


def _expected_loss(logits_u: torch.Tensor, target: torch.Tensor, contrast: torch.Tensor, alpha: float) -> float:
    """Dice-BCE against the pseudo label + alpha * mean(1 - cos(prob, contrast)), the cosine worked out in numpy."""
    from lvit.train.losses import DiceBCELoss

    probs = torch.sigmoid(logits_u.double()).flatten(1).numpy()
    cont = contrast.double().flatten(1).numpy()
    cos = (probs * cont).sum(1) / (np.linalg.norm(probs, axis=1) * np.linalg.norm(cont, axis=1))
    return float(DiceBCELoss(0.5, 0.5)(logits_u, target)) + alpha * float(np.mean(1.0 - cos))


def test_semi_step_targets_loss_and_one_update_per_epoch_with_a_stub_network():
    import lightning.pytorch as pl

    from lvit.train import load_config
    from lvit.train.semi.module import SemiConfig, SemiSupervisedModule
    from lvit.train.semi.pseudo_labels import PseudoLabelBank

    class Spy(SemiSupervisedModule):
        """Records per unlabelled term: epoch, indices, logits, the target given to Dice-BCE, bank before, loss."""

        def unlabelled_loss(self, batch, logits, unlabelled):
            inner = self.loss_fn
            self.loss_fn = recorder = Recorder(inner)
            before = self.bank.get(range(4)).clone()
            try:
                loss = super().unlabelled_loss(batch, logits, unlabelled)
            finally:
                self.loss_fn = inner
            steps.append({"epoch": self.current_epoch, "index": batch["index"][unlabelled].tolist(),
                          "logits": logits[unlabelled].detach().clone(), "target": recorder.targets[0],
                          "before": before, "loss": float(loss.detach())})
            return loss

    class AfterEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer, module):
            state = module.bank.state_dict()
            banks.append((state["values"].float().clone(), state["last_epoch"].clone()))

    steps, banks = [], []
    items = _items()
    stub = EpochStub()
    semi = SemiConfig(mode="epi+lv", labeled_fraction=0.25, beta=BETA, lv_weight=ALPHA, warmup_epochs=0)
    bank = PseudoLabelBank(4, (2, 2), beta=BETA, storage="memory")
    module = Spy(stub, load_config(None, ["data.batch_size=2", "trainer.progress=false"]), semi, bank,
                 CONTRAST_INDEX, CONTRAST, unlabelled_source=(items, np.flatnonzero(~np.array(LABELLED))))
    stub.epoch = lambda: module.current_epoch
    loader = DataLoader(items, batch_size=2, sampler=FixedOrder())
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=[AfterEpoch()])
    trainer.fit(module, train_dataloaders=loader)

    # Each epoch every unlabelled image is updated exactly once (last_epoch = that epoch), to the hand value.
    assert len(banks) == 3
    for epoch, (values, last_epoch) in enumerate(banks):
        assert last_epoch.tolist() == [-1, epoch, epoch, epoch]
        for i in (1, 2, 3):
            assert values[i].tolist() == P[epoch][i], (epoch, i)

    # Three unlabelled terms per epoch: images [1, 2], [3], [1, 3] (the last two seen a second time).
    assert [(s["epoch"], s["index"]) for s in steps] == [(e, ix) for e in range(3) for ix in ([1, 2], [3], [1, 3])]
    for n, s in enumerate(steps):
        epoch, again = s["epoch"], n % 3 == 2
        probs = torch.sigmoid(s["logits"].double())
        for row, i in enumerate(s["index"]):
            target = s["target"][row, 0].double()
            # The target is P_t (Eq. 8, this epoch's prediction included) - by hand:
            assert target.tolist() == P[epoch][i], (epoch, i)
            if epoch > 0 and not again:  # ... and by the formula, from the bank before this step
                formula = BETA * s["before"][i, 0].double() + (1 - BETA) * probs[row, 0]
                assert torch.allclose(target, formula, atol=1e-6), (epoch, i)
        # Loss = Dice-BCE(prediction, P_t) + alpha * mean(1 - cos(prediction, contrast label)).
        expected = _expected_loss(s["logits"], s["target"], CONTRAST[CONTRAST_INDEX[s["index"]]], ALPHA)
        assert s["loss"] == pytest.approx(expected, rel=1e-5), n


def test_beta_and_lv_weight_flags_reach_the_bank_and_the_loss(tmp_path, monkeypatch):
    """``lvit train ... --beta 0.8 --lv-weight 0.7``: the targets follow beta 0.8, the loss weighs LV by 0.7, and the
    checkpointed bank records beta 0.8. Two epochs, warm-up 0: epoch 0 sets P_0, epoch 1 averages."""
    from lvit.artifacts.runs import load_state_file
    from lvit.commands.cli import main
    from lvit.data.synthetic import generate_synthetic
    from lvit.train.semi import module as semi_module

    beta, weight = 0.8, 0.7
    data = generate_synthetic(tmp_path / "data", n_train=8, n_val=1, n_test=1, size=32, seed=2, progress=False)
    seen = []
    original = semi_module.SemiSupervisedModule.unlabelled_loss

    def spy(self, batch, logits, unlabelled):
        inner = self.loss_fn
        self.loss_fn = recorder = Recorder(inner)
        index = batch["index"][unlabelled].long().cpu()
        before, had = self.bank.get(index).clone(), self.bank.initialised(index).clone()
        try:
            loss = original(self, batch, logits, unlabelled)
        finally:
            self.loss_fn = inner
        if loss is not None:
            seen.append({"epoch": self.current_epoch, "logits": logits[unlabelled].detach().float().cpu(),
                         "target": recorder.targets[0], "before": before, "had": had, "loss": float(loss.detach()),
                         "contrast": self.contrast_masks[self.contrast_index[index]].cpu()})
        return loss

    monkeypatch.setattr(semi_module.SemiSupervisedModule, "unlabelled_loss", spy)
    run = tmp_path / "run"
    assert main(["train", "--config", "synth", "--data", str(data), "--out", str(run), "--model", "lvit-t",
                 "--epochs", "2", "--batch-size", "4", "--workers", "0", "--no-progress",
                 "--set", "model.image_size=32", "--set", "model.base_channels=8", "--set", "trainer.patience=null",
                 "--labeled-fraction", "0.25", "--semi", "epi+lv", "--semi-warmup", "0", "--lv-contrast", "templates",
                 "--beta", str(beta), "--lv-weight", str(weight)]) == 0

    later = [s for s in seen if s["epoch"] == 1]
    assert later and len(seen) > len(later)  # both epochs trained on unlabelled images
    for s in seen:
        probs = torch.sigmoid(s["logits"].double())
        if s["epoch"] == 1:  # P_1 = 0.8 * P_0 + 0.2 * prediction (float16 bank: 1e-3)
            assert bool(s["had"].all())
            formula = beta * s["before"].double() + (1 - beta) * probs
            assert torch.allclose(s["target"].double(), formula, atol=1e-3)
            assert not torch.allclose(s["target"].double(), 0.99 * s["before"].double() + 0.01 * probs, atol=1e-3)
        assert s["loss"] == pytest.approx(_expected_loss(s["logits"], s["target"], s["contrast"], weight), rel=1e-4)
    state = load_state_file(run / "checkpoints" / "last.ckpt")
    assert float(state[semi_module.CHECKPOINT_KEY]["bank"]["beta"]) == beta


def test_lv_loss_soft_prediction_against_a_larger_mask_of_another_size_by_hand():
    """1 - cos on a soft prediction and contrast masks of other areas (and twice the resolution, resized by
    nearest). For equal-area binary masks cos equals Dice, so only a case like this tells 1 - cos from 1 - Dice."""
    from lvit.train.semi import lv_loss

    pred = torch.tensor([[[[0.5, 0.25], [1.0, 0.0]]], [[[0.75, 0.75], [0.25, 0.0]]]])  # [2, 1, 2, 2]
    small = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    contrast = small.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)  # [2, 1, 4, 4], 2 x 2 blocks
    # sample 0: p.c = 0.5 + 1.0 = 1.5; |p|^2 = 0.25 + 0.0625 + 1 = 1.3125; |c|^2 = 3
    # sample 1: p.c = 0.75; |p|^2 = 0.5625 + 0.5625 + 0.0625 = 1.1875; |c|^2 = 1
    cos0, cos1 = 1.5 / math.sqrt(1.3125 * 3), 0.75 / math.sqrt(1.1875 * 1)  # 0.75593, 0.68825
    expected = ((1 - cos0) + (1 - cos1)) / 2  # 0.27791
    assert lv_loss(pred, contrast).item() == pytest.approx(expected, rel=1e-6)
    # Not 1 - soft Dice (2 p.c / (sum p + sum c)): 1 - 3 / 4.75 and 1 - 1.5 / 2.75, mean 0.41181.
    assert abs(lv_loss(pred, contrast).item() - ((1 - 3 / 4.75) + (1 - 1.5 / 2.75)) / 2) > 0.1
    # The prediction gets the gradient of (1 - cos) / 2 for sample 1: -(c / (|p||c|) - (p.c) p / (|p|^3 |c|)) / 2.
    p = pred.clone().requires_grad_(True)
    lv_loss(p, contrast).backward()
    norm = math.sqrt(1.1875)
    assert p.grad[1, 0, 0, 0].item() == pytest.approx(-(1 / norm - 0.75 * 0.75 / norm**3) / 2, rel=1e-5)  # c = 1
    assert p.grad[1, 0, 1, 0].item() == pytest.approx(0.75 * 0.25 / norm**3 / 2, rel=1e-5)  # c = 0, p = 0.25
