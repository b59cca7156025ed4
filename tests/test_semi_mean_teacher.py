"""The mean-teacher recipe (semi.mode mean-teacher): its consistency loss and EMA update by hand, the paired
batches, that unlabelled images never reach the supervised loss, and a tiny run end to end with an exact resume
and a branch from an EPI run's warm-up."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch
from torch import nn

OVERRIDES = ["model_name=lvit", "text.encoder=learned", "model.image_size=32", "model.base_channels=8",
             "model.text_tokens=8", "data.batch_size=4", "data.num_workers=0", "trainer.progress=false",
             "trainer.patience=null", "optim.lr=1e-3", "trainer.max_epochs=3"]
STANDARD = ("epoch", "train_loss", "val_loss", "val_dice", "val_iou", "lr", "best")


def _logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


# ---------------------------------------------------------------------- the loss, the ramp, the EMA
def test_consistency_loss_with_confidence_mask_and_cutout_by_hand():
    from lvit.train.semi.mean_teacher import consistency_loss

    # Two 2x2 images, confidence 0.8: a pixel counts when the teacher says <= 0.2 or >= 0.8.
    teacher = torch.tensor([[[[0.9, 0.3], [0.1, 0.85]]],  # y = [[1, 0], [0, 1]]; 0.3 unconfident
                            [[[0.5, 0.95], [0.05, 0.15]]]])  # y = [[1, 1], [0, 0]]; 0.5 unconfident
    keep = torch.tensor([[[[True, True], [True, False]]],  # image 0: the bottom-right pixel was cut out
                         [[[True, True], [True, True]]]])
    q = torch.tensor([[[[0.8, 0.5], [0.2, 0.6]]], [[[0.7, 0.9], [0.4, 0.1]]]])  # the student's probabilities
    loss, used = consistency_loss(_logit(q), teacher, 0.8, keep, dice_weight=0.5, bce_weight=0.5)

    # Used pixels: image 0 (0,0) q .8 y 1 and (1,0) q .2 y 0; image 1 (0,1) q .9 y 1, (1,0) q .4 y 0, (1,1) q .1 y 0.
    # BCE: positives over all 3 kept positives (image 0: one, the other was cut out; image 1: two), negatives over
    # all 4 kept negatives; unconfident pixels add 0.
    pos = (-math.log(0.8) - math.log(0.9)) / 3
    neg = (-math.log(0.8) - math.log(0.6) - math.log(0.9)) / 4
    s = 4e-5  # the official smoothing
    dice0 = 1 - (2 * 0.8 + s) / (0.8 ** 2 + 0.2 ** 2 + 1 + s)  # 1 - 1.6 / 1.68
    dice1 = 1 - (2 * 0.9 + s) / (0.9 ** 2 + 0.4 ** 2 + 0.1 ** 2 + 1 + s)  # 1 - 1.8 / 1.98
    expected = 0.5 * (dice0 + dice1) / 2 + 0.5 * (0.5 * pos + 0.5 * neg)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert used.item() == pytest.approx(5 / 7)  # 5 used of 7 kept pixels

    # The teacher gets no gradient; the student does, only at used pixels.
    logits = _logit(q).requires_grad_(True)
    consistency_loss(logits, teacher.requires_grad_(True), 0.8, keep)[0].backward()
    assert teacher.grad is None
    unused = torch.tensor([[[[0, 1], [0, 1]]], [[[1, 0], [0, 0]]]], dtype=torch.bool)
    assert torch.all(logits.grad[unused] == 0) and torch.all(logits.grad[~unused] != 0)
    # An image whose used pixels are all background stays out of the Dice term: here only BCE on its two used
    # negatives (of 3 kept negatives; its one lesion pixel, 0.5, is unconfident).
    alone, _ = consistency_loss(_logit([[[[0.2, 0.5], [0.5, 0.5]]]]), torch.tensor([[[[0.05, 0.1], [0.3, 0.5]]]]),
                                0.8)
    assert alone.item() == pytest.approx(0.5 * 0.5 * (-math.log(0.8) - math.log(0.5)) / 3, rel=1e-5)
    # A teacher confident nowhere gives exactly 0.
    zero, frac = consistency_loss(_logit(q), torch.full_like(teacher, 0.6), 0.9)
    assert zero.item() == 0.0 and frac.item() == 0.0


def test_sigmoid_rampup():
    from lvit.train.semi.mean_teacher import sigmoid_rampup

    assert sigmoid_rampup(0.0, 2.0) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(1.0, 2.0) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(2.0, 2.0) == sigmoid_rampup(7.0, 2.0) == 1.0
    assert sigmoid_rampup(0.0, 0.0) == 1.0


class _Net(nn.Module):
    """A 3x3 convolution and a BatchNorm: parameters, float buffers and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 1, 3, padding=1), nn.BatchNorm2d(1)

    def forward(self, image, text=None, text_mask=None):
        return self.norm(self.conv(image[:, :1]))


def test_ema_update_one_step_by_hand():
    from lvit.train.ema import ema_update

    student, teacher = _Net(), _Net()
    with torch.no_grad():
        teacher.conv.weight.fill_(1.0), teacher.conv.bias.fill_(-2.0)
        student.conv.weight.fill_(3.0), student.conv.bias.fill_(2.0)
        teacher.norm.running_mean.fill_(0.0), student.norm.running_mean.fill_(1.0)
        teacher.norm.running_var.fill_(1.0), student.norm.running_var.fill_(2.0)
        teacher.norm.num_batches_tracked.fill_(0), student.norm.num_batches_tracked.fill_(5)
    ema_update(teacher, student, 0.75)
    assert torch.all(teacher.conv.weight == 0.75 * 1.0 + 0.25 * 3.0)  # 1.5
    assert torch.all(teacher.conv.bias == 0.75 * -2.0 + 0.25 * 2.0)  # -1.0
    assert teacher.norm.running_mean.item() == 0.25 and teacher.norm.running_var.item() == 1.25  # averaged
    assert teacher.norm.num_batches_tracked.item() == 5  # integer: copied
    assert torch.all(student.conv.weight == 3.0)  # the student is untouched
    with pytest.raises(ValueError, match="same network"):
        ema_update(teacher, nn.Conv2d(1, 1, 3), 0.5)


# ---------------------------------------------------------------------- the module on hand-made batches
def _module(warmup=0, **semi):
    from lvit.train.config import load_config
    from lvit.train.semi.mean_teacher import MeanTeacherModule

    cfg = load_config(None, ["semi.mode=mean-teacher", "semi.labeled_fraction=0.5", f"semi.warmup_epochs={warmup}",
                             "semi.rampup_epochs=0", "semi.confidence=0.6",
                             *[f"semi.{k}={v}" for k, v in semi.items()]])
    torch.manual_seed(0)
    return MeanTeacherModule(_Net(), cfg)


def _batch(has_mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(has_mask)
    return {"image": torch.rand((n, 1, 6, 6), generator=g),
            "mask": (torch.rand((n, 1, 6, 6), generator=g) > 0.5).float(),
            "has_mask": torch.tensor(has_mask), "index": torch.arange(n),
            "hidden_mask": (torch.rand((n, 1, 6, 6), generator=g) > 0.5).float(),
            "hidden_has_mask": torch.ones(n, dtype=torch.bool)}


def _garbage(batch, rows, seed):
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in batch.items()}
    for key in ("mask", "hidden_mask"):
        out[key][rows] = torch.rand(out[key][rows].shape, generator=g) * 7 - 3  # not even a mask
    return out


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_unlabelled_images_never_contribute_a_supervised_loss_term():
    module = _module(consistency_weight=0.5)
    module.train()
    unlabelled = torch.tensor([False, False, True, True])
    mixed = _batch([True, True, False, False])
    base = module.training_step(mixed, 0)
    # Whatever sits in the unlabelled images' mask (and hidden mask) slots, the loss is the same ...
    for seed in (1, 2):
        assert torch.equal(module.training_step(_garbage(mixed, unlabelled, seed), 0), base)
    # ... while the labelled masks do count.
    assert not torch.equal(module.training_step(_garbage(mixed, ~unlabelled, 3), 0), base)
    # A batch of unlabelled images only: the consistency term alone, whatever their masks.
    only = _batch([False] * 4, seed=4)
    running = module.model.norm.running_mean.clone()
    a, b = (module.training_step(_garbage(only, torch.ones(4, dtype=torch.bool), s), 0) for s in (5, 6))
    assert torch.equal(a, b)
    # The strong view leaves the student's running BatchNorm statistics to the labelled images.
    assert torch.equal(module.model.norm.running_mean, running)
    from lvit.train.semi.mean_teacher import consistency_loss

    module.teacher["model"].eval()
    probs = torch.sigmoid(module.teacher["model"](only["image"]))
    strong, keep = module.strong(only["image"], module._generator())
    module.teacher["model"].train()
    expected = 0.5 * consistency_loss(module.model(strong), probs, 0.6, keep)[0]
    assert a.item() == pytest.approx(expected.item(), rel=1e-6)

    # During the warm-up the unlabelled part is not even forwarded: only-unlabelled batches train nothing, and a
    # mixed batch's loss is the supervised loss of its labelled part.
    warm = _module(warmup=1)
    warm.train()
    assert warm.training_step(only, 0) is None
    expected = warm.supervised_loss(warm.model(mixed["image"][~unlabelled]), mixed["mask"][~unlabelled])
    assert warm.training_step(_garbage(mixed, unlabelled, 7), 0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_strong_view_moves_no_pixel_and_is_seeded():
    from lvit.train.semi.mean_teacher import StrongAugment

    images = torch.rand(6, 3, 16, 16)
    images[:, 1:] = images[:, :1]  # grey, as X-rays are
    aug = StrongAugment(cutout_prob=1.0)
    a, keep = aug(images, torch.Generator().manual_seed(1))
    b, _ = aug(images, torch.Generator().manual_seed(1))
    c, _ = aug(images, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == images.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a[:, 0], a[:, 2])  # the same jitter for every channel
    assert bool((~keep).any(dim=(1, 2, 3)).all())  # every image got its cut-out square ...
    cut = ~keep.expand_as(a)
    means = images.mean(dim=(1, 2, 3), keepdim=True).expand_as(a)
    assert torch.allclose(a[cut], means[cut])  # ... filled with its mean
    # Intensity only: the strong view stays a monotone function of the image outside the square (no moved pixel).
    for i in range(6):
        inside = keep[i, 0]
        order = images[i, 0][inside].argsort()
        assert bool((a[i, 0][inside][order].diff() >= -0.2).all())
    assert torch.equal(aug(images, torch.Generator().manual_seed(1))[1], keep)


def test_paired_sampler_gives_every_batch_the_baselines_labelled_images_plus_unlabelled_ones():
    from lvit.train.semi import PairedSampler, WarmupSampler

    labelled = np.zeros(10, dtype=bool)
    labelled[[1, 4, 7]] = True
    sampler = PairedSampler(labelled, batch_size=4, unlabelled_batch=2, seed=3)
    assert sampler.loader_batch_size == 6 and sampler.num_batches == 3 and len(sampler) == 10 + 3 * 2
    for epoch in (0, 5):
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches = [order[i:i + 6] for i in range(0, len(order), 6)]
        assert [len(b) for b in batches] == [6, 6, 4]  # the last labelled part is short: 10 = 4 + 4 + 2
        # The labelled part is the steps-matched baseline's order (its warm-up order) for this epoch.
        baseline = WarmupSampler(labelled, warmup_epochs=99, seed=3).order(epoch).tolist()
        assert [i for b in batches for i in b[:-2]] == baseline
        assert all(not labelled[i] for b in batches for i in b[-2:])
        assert len({i for b in batches for i in b[-2:]}) == 6  # one pass over the 7 unlabelled images
    assert list(sampler.order(5)) != list(sampler.order(4))
    sampler.epoch_source = lambda: 5
    assert list(sampler) == list(sampler.order(5))
    everything = PairedSampler(np.ones(5, dtype=bool), 2, 2, seed=0)  # no unlabelled images: labelled batches
    assert everything.loader_batch_size == 2 and sorted(everything) == list(range(5))


@pytest.mark.filterwarnings("ignore:.*self.log.*", "ignore:You defined a `validation_step`")
def test_ema_follows_every_optimizer_step_in_training():
    """Through Lightning: after each optimizer step, teacher = d * teacher + (1 - d) * student (d = 0.5)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    module = _module(ema_decay=0.5)
    items = [{k: v[i] for k, v in _batch([True, False, True, False], seed=i).items()} for i in range(4)]
    seen = []  # (teacher, student) before each step and after the last: the EMA runs after the callbacks' hook

    def record(m):
        seen.append((copy.deepcopy(m.teacher["model"].state_dict()), copy.deepcopy(m.model.state_dict())))

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, m, batch, batch_idx):
            record(m)

        def on_train_end(self, trainer, m):
            record(m)

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[Watch()])
    trainer.fit(module, train_dataloaders=DataLoader(items, batch_size=2))
    assert trainer.global_step == 2 and len(seen) == 3
    # Before the first step the teacher is the student (copied when the epoch after the warm-up starts) ...
    assert all(torch.equal(seen[0][0][k], seen[0][1][k]) for k in seen[0][0])
    # ... and after each step it moved half-way to the student that step made.
    for (before, _), (after, student) in zip(seen, seen[1:]):
        assert not torch.equal(after["conv.weight"], before["conv.weight"])
        for key, value in before.items():
            if value.dtype.is_floating_point:
                assert torch.allclose(after[key], 0.5 * value + 0.5 * student[key], atol=1e-7), key
            else:
                assert torch.equal(after[key], student[key]), key


# ---------------------------------------------------------------------- settings and the command line
def test_settings_flags_and_refusals(tmp_path):
    from files import semi_flag_overrides

    from lvit.core.errors import ConfigError
    from lvit.train.config import load_config

    overrides = semi_flag_overrides(tmp_path, "--labeled-fraction", "0.25", "--semi", "mean-teacher",
                                    "--ema-decay", "0.95", "--confidence", "0.8", "--consistency-weight", "2")
    assert overrides == ["semi.labeled_fraction=0.25", "semi.mode=mean-teacher", "semi.ema_decay=0.95",
                         "semi.confidence=0.8", "semi.consistency_weight=2.0"]
    semi = load_config(None, overrides + ["semi.rampup_epochs=1", "semi.unlabelled_batch=16",
                                          "semi.eval_model=student"]).semi
    assert (semi.mode, semi.ema_decay, semi.confidence, semi.consistency_weight, semi.rampup_epochs,
            semi.unlabelled_batch, semi.eval_model) == ("mean-teacher", 0.95, 0.8, 2.0, 1.0, 16, "student")
    base = ["semi.mode=mean-teacher", "semi.labeled_fraction=0.25"]
    for bad, match in (("semi.ema_decay=1.0", "ema_decay"), ("semi.confidence=0.4", "confidence"),
                       ("semi.eval_model=average", "eval_model"), ("semi.unlabelled_batch=0", "unlabelled_batch"),
                       ("semi.rampup_epochs=-1", "rampup_epochs"), ("semi.consistency_weight=-1", "consistency")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, base + [bad])
    with pytest.raises(ConfigError, match="ema_decay is a mean-teacher setting, but semi.mode is epi"):
        load_config(None, ["semi.mode=epi", "semi.labeled_fraction=0.25", "semi.ema_decay=0.9"])


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from lvit.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("mt") / "data", n_train=8, n_val=2, n_test=1, size=32,
                              seed=1, progress=False)


def _config(semi: dict, *extra):
    from lvit.train.config import load_config

    return load_config(None, [*OVERRIDES, *[f"semi.{k}={v}" for k, v in semi.items()], *extra])


def _rows(run, columns=None):
    with (run / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items() if k != "seconds" and (columns is None or k in columns)}
                for r in csv.DictReader(f)]


MT = {"mode": "mean-teacher", "labeled_fraction": 0.25, "warmup_epochs": 1, "rampup_epochs": 1,
      "confidence": 0.6, "ema_decay": 0.9}


@pytest.mark.slow
def test_mean_teacher_run_end_to_end_resumes_exactly_and_branches_from_an_epi_warmup(tiny_data, tmp_path):
    from lvit.artifacts.runs import load_state_file, load_weights
    from lvit.train.plugins import Callbacks
    from lvit.train.runner import resume_config, train
    from lvit.train.semi.branch import KeepStateAfter, branch_run
    from lvit.train.semi.mean_teacher import CHECKPOINT_KEY

    direct = tmp_path / "direct"
    train(_config(MT), tiny_data, direct)
    rows = _rows(direct)
    assert len(rows) == 3
    # Warm-up epoch: no teacher, no pseudo labels; afterwards the teacher's labels are scored against the hidden
    # masks every epoch, and validation scores both networks (val_dice is the teacher's).
    assert rows[0]["pseudo_dice"] == "nan" and rows[0]["val_dice_teacher"] == "nan"
    for r in rows[1:]:
        assert 0.0 <= float(r["pseudo_dice"]) <= 1.0 and 0.0 <= float(r["confident_fraction"]) <= 1.0
        assert r["val_dice"] == r["val_dice_teacher"] and r["val_dice_student"] != "nan"
    assert 0 < float(rows[1]["consistency_ramp"]) < float(rows[2]["consistency_ramp"]) <= 1
    # Each step carried the 4 labelled-batch slots plus 4 unlabelled images: 2 batches an epoch (8 images / 4).
    state = load_state_file(direct / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 6 and CHECKPOINT_KEY in state
    weights = state["state_dict"]
    teacher = {k[len("teacher."):]: v for k, v in weights.items() if k.startswith("teacher.")}
    student = {k: v for k, v in weights.items() if k.startswith(("model.", "text_embedding."))}
    assert teacher.keys() == student.keys() and any("text_embedding" in k for k in teacher)
    assert not all(torch.equal(teacher[k], student[k]) for k in teacher)
    # The saved last weights are the teacher's (eval_model teacher).
    saved = load_weights(direct / "checkpoints" / "last.safetensors")
    for key, value in saved.items():
        assert torch.equal(value, teacher[key if key.startswith("text_embedding.") else "model." + key]), key

    # Through `lvit train --set semi.mode=mean-teacher ...`, resumed after epoch 2 with `--resume`: every figure
    # and every weight (teacher included) as in the uninterrupted run.
    from lvit.commands.cli import main

    resumed = tmp_path / "resumed"
    settings = [*OVERRIDES, *[f"semi.{k}={v}" for k, v in MT.items()], "trainer.max_epochs=2"]
    assert main(["train", "--data", str(tiny_data), "--out", str(resumed),
                 *[arg for item in settings for arg in ("--set", item)]]) == 0
    assert main(["train", "--out", str(resumed), "--resume", "--epochs", "3"]) == 0
    assert _rows(resumed) == rows
    again = load_state_file(resumed / "checkpoints" / "last.ckpt")["state_dict"]
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)

    # Branched from an EPI run's labelled-only warm-up (what bench/qata.py does with the steps-matched run): the
    # same run as from scratch. (The warm-up epoch's row keeps the EPI run's extra columns.)
    shared = tmp_path / "shared"
    steps = {"mode": "epi", "labeled_fraction": 0.25, "warmup_epochs": 3}
    train(_config(steps), tiny_data, shared, plugins=[Callbacks(KeepStateAfter(shared, 1))])
    branched = branch_run(shared, 1, tmp_path / "branched", _config(MT))
    train(resume_config(branched)[0], tiny_data, branched, resume=True)
    assert _rows(branched, STANDARD) == _rows(direct, STANDARD)
    final = load_state_file(branched / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(final[k], weights[k]) for k in weights)


# ---------------------------------------------------------------------- report-aware CutMix (semi.cutmix)
def test_same_report_pairs_by_ids_by_vectors_and_without_reports():
    from lvit.train.semi.mean_teacher import same_report

    image = torch.zeros(4, 1, 2, 2)
    ids = torch.tensor([[5, 6, 0], [5, 7, 0], [5, 6, 0], [9, 0, 0]])
    assert same_report({"image": image, "text_ids": ids}).tolist() == [
        [True, False, True, False], [False, True, False, False], [True, False, True, False],
        [False, False, False, True]]
    text = torch.rand(4, 3, 2)
    text[2] = text[0]
    text[1] = text[0]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)  # 1: same vectors, shorter
    pairs = same_report({"image": image, "text": text, "text_mask": mask})
    assert pairs[0, 2] and not pairs[0, 1] and not pairs[0, 3] and bool(pairs.diagonal().all())
    assert bool(same_report({"image": image}).all())  # a text-free network: any two images may mix


def test_report_cutmix_takes_a_box_from_a_same_report_partner_in_image_label_and_kept_pixels_alike():
    from lvit.train.semi.mean_teacher import ReportCutMix

    n, h, w = 3, 20, 20
    images = torch.stack([torch.full((2, h, w), float(i)) for i in range(n)])  # image i is all i
    probs = torch.stack([torch.full((1, h, w), 0.1 * (i + 1)) for i in range(n)])
    keep = torch.ones(n, 1, h, w, dtype=torch.bool)
    keep[1, :, :5, :] = False  # image 1 had a cut-out band
    partners = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])  # 0 and 1 share
    copies = [t.clone() for t in (images, probs, keep)]
    mix = ReportCutMix(prob=1.0, area=(0.2, 0.3))
    x, p, k, source = mix(images, probs, keep, partners, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(copies, (images, probs, keep)))  # inputs untouched
    assert torch.equal(source[2], torch.full((1, h, w), 2))  # no partner: left alone
    assert torch.equal(x[2], images[2]) and torch.equal(p[2], probs[2]) and torch.equal(k[2], keep[2])
    for i, j in ((0, 1), (1, 0)):
        box = source[i, 0] == j
        assert set(source[i].unique().tolist()) == {i, j}
        rows, cols = torch.nonzero(box, as_tuple=True)
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(box.sum()) == height * width  # one rectangle ...
        assert 0.2 * h * w * 0.8 <= height * width <= 0.3 * h * w * 1.25  # ... of the asked area (rounded)
        for view, original in ((x, images), (p, probs), (k, keep)):  # the same pixels taken in all three
            assert torch.equal(view[i][:, box], original[j][:, box])
            assert torch.equal(view[i][:, ~box], original[i][:, ~box])
    again = mix(images, probs, keep, partners, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(again, (x, p, k, source)))  # seeded
    off = ReportCutMix(prob=0.0)(images, probs, keep, partners, torch.Generator().manual_seed(3))
    assert torch.equal(off[0], images) and torch.equal(off[3], torch.arange(n).view(n, 1, 1, 1).expand(n, 1, h, w))


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_cutmix_training_step_uses_the_mixed_view_and_labels_and_is_off_by_default():
    from lvit.core.errors import ConfigError
    from lvit.train.config import load_config
    from lvit.train.semi.mean_teacher import consistency_loss, same_report

    only = _batch([False] * 4, seed=8)
    # Confidence 0.5: every pixel counts (the tiny network's teacher is confident about none at 0.6).
    plain, mixed = _module(confidence=0.5), _module(confidence=0.5, cutmix=1.0)
    assert plain.cutmix is None and mixed.cutmix.prob == 1.0
    for m in (plain, mixed):
        m.train()
    a, b = plain.training_step(only, 0), mixed.training_step(only, 0)
    assert not torch.equal(a, b)

    mixed.teacher["model"].eval()
    probs = torch.sigmoid(mixed.teacher["model"](only["image"]))
    g = mixed._generator()
    strong, keep = mixed.strong(only["image"], g)
    strong, targets, keep, source = mixed.cutmix(strong, probs, keep, same_report(only), g)
    mixed.teacher["model"].train()
    assert bool((source != torch.arange(4).view(4, 1, 1, 1)).any())  # something was mixed
    expected = consistency_loss(mixed.model(strong), targets, 0.5, keep)[0]
    assert expected.item() > 0 and b.item() == pytest.approx(expected.item(), rel=1e-6)

    for bad, match in (("semi.cutmix=1.5", "cutmix must be a probability"),
                       ("semi.cutmix=-0.1", "cutmix must be a probability"), ("semi.cutmix=true", "expected a number")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, ["semi.mode=mean-teacher", "semi.labeled_fraction=0.25", bad])
    with pytest.raises(ConfigError, match="cutmix is a mean-teacher setting"):
        load_config(None, ["semi.mode=epi", "semi.labeled_fraction=0.25", "semi.cutmix=0.5"])


def test_cutmix_partners_are_unlabelled_images_of_the_same_report_chosen_among_several():
    # A mixed batch: rows 0-1 labelled, 2-7 unlabelled; unlabelled rows 2, 4, 6 share one report, 3 and 7 another,
    # 5 is alone; labelled row 0 shares 2's report (it must never lend a box: only the unlabelled rows are mixed).
    module = _module(confidence=0.5, cutmix=1.0)
    module.train()
    batch = _batch([True, True, False, False, False, False, False, False], seed=9)
    batch["text_ids"] = torch.tensor([[1, 2], [9, 9], [1, 2], [3, 4], [1, 2], [5, 6], [1, 2], [3, 4]])
    seen = []
    mix = module.cutmix

    def spy(images, probs, keep, partners, generator):
        out = mix(images, probs, keep, partners, generator)
        seen.append((partners.clone(), out[3]))
        return out

    module.cutmix = spy
    seeds = iter(range(100))
    module._generator = lambda: torch.Generator().manual_seed(next(seeds))  # other draws at every step
    taken = {i: set() for i in range(6)}  # unlabelled position -> the images its boxes came from
    for _ in range(12):
        module.training_step(batch, 0)
        partners, source = seen[-1]
        assert partners.shape == (6, 6)  # the unlabelled rows only
        for i in range(6):
            taken[i] |= set(source[i].unique().tolist()) - {i}
    # Unlabelled positions: 0, 2, 4 (rows 2, 4, 6) share a report; 1, 5 (rows 3, 7) another; 3 (row 5) is alone.
    assert taken[3] == set()
    assert taken[1] == {5} and taken[5] == {1}
    assert taken[0] == {2, 4} and taken[2] == {0, 4} and taken[4] == {0, 2}  # each partner in turn, no other


def test_report_cutmix_chooses_uniformly_among_several_partners_and_honours_its_probability():
    from lvit.train.semi.mean_teacher import ReportCutMix

    n = 4
    images, probs = torch.rand(n, 1, 8, 8), torch.rand(n, 1, 8, 8)
    keep = torch.ones(n, 1, 8, 8, dtype=torch.bool)
    partners = torch.ones(n, n, dtype=torch.bool)
    counts, mixed = torch.zeros(n, n), 0
    for seed in range(300):
        source = ReportCutMix(prob=0.5)(images, probs, keep, partners, torch.Generator().manual_seed(seed))[3]
        for i in range(n):
            others = set(source[i].unique().tolist()) - {i}
            mixed += bool(others)
            for j in others:
                counts[i, j] += 1
    assert 0.4 < mixed / (300 * n) < 0.6  # about half of the images mixed
    off_diagonal = counts[~torch.eye(n, dtype=torch.bool)]
    assert counts.diagonal().sum() == 0 and float(off_diagonal.min()) > 0.6 * float(off_diagonal.mean())


def test_unlabelled_prediction_dice_is_scored_against_the_hidden_masks_mixed_the_same_way():
    from lvit.core.metrics import batch_dice_iou

    module = _module(cutmix=1.0)
    h = w = 4
    hidden = torch.zeros(3, 1, h, w)
    hidden[0, :, :2] = 1  # image 0: top half
    hidden[1, :, :, :2] = 1  # image 1: left half
    hidden[2] = 1
    weak = {"hidden_mask": hidden, "hidden_has_mask": torch.tensor([True, True, False])}
    source = torch.arange(3).view(3, 1, 1, 1).repeat(1, 1, h, w)
    source[0, :, 2:, :2] = 1  # image 0 took image 1's bottom-left quarter
    source[1, :, :1, :] = 2  # image 1 took a band of image 2, whose mask is unknown: not scored
    student = torch.full((3, 1, h, w), -5.0)
    student[0, :, :2] = 5  # predicts image 0's own lesion, misses the pasted one
    probs = torch.full((3, 1, h, w), 0.9)
    module._log_quality(weak, probs, student, source)
    mixed0 = hidden[0].clone()
    mixed0[:, 2:, :2] = 1
    expected = batch_dice_iou(student[:1] > 0, mixed0[None] > 0.5)[0].item()
    assert module.unlabelled_pred_dice.compute().item() == pytest.approx(expected)
    assert expected == pytest.approx(2 * 8 / (8 + 12))  # 8 predicted pixels, 12 mixed lesion pixels, 8 shared
    pseudo = batch_dice_iou(probs[:2] >= 0.5, hidden[:2] > 0.5)[0].mean().item()  # the teacher: unmixed, known
    assert module.pseudo_dice.compute().item() == pytest.approx(pseudo)
