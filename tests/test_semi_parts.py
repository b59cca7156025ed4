"""Semi-supervised building blocks: EPI bank, LV loss, contrast labels, labelled subset (all fast, no model)."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
import torch

from lvit.core.errors import CheckpointError, DataError
from lvit.train.semi import (
    ContrastLabelBank,
    PseudoLabelBank,
    choose_fraction,
    choose_listed,
    default_contrast_bank,
    gather_updates,
    lv_loss,
    nearest_labelled,
    report_vectors,
    write_subset,
)


# ---------------------------------------------------------------------- EPI bank
def test_epi_update_matches_eq8_by_hand():
    bank = PseudoLabelBank(3, (2, 2), beta=0.75, storage="memory")
    first = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]]])  # [1, 1, 2, 2]
    out0 = bank.update([1], first, epoch=0)
    # The first prediction initialises P_0.
    assert torch.equal(out0, first)
    second = torch.tensor([[[[1.0, 0.0], [0.5, 0.75]]]])
    out1 = bank.update(torch.tensor([1]), second, epoch=1)
    # P_1 = 0.75 * P_0 + 0.25 * pred_1, worked out by hand (all exact in float16).
    expected = torch.tensor([[[[0.25, 0.75], [0.5, 0.375]]]])
    assert torch.equal(out1, expected)
    assert torch.equal(bank.get([1]), expected)
    # Untouched images stay unset.
    assert bank.initialised().tolist() == [False, True, False]


def test_epi_updates_each_image_once_per_epoch():
    bank = PseudoLabelBank(2, (1, 2), beta=0.5, storage="memory")
    bank.update([0], torch.tensor([[[[0.0, 0.0]]]]), epoch=0)
    # Same epoch again (e.g. a DistributedSampler repeat): ignored, the stored value is returned.
    out = bank.update([0, 0], torch.tensor([[[[1.0, 1.0]]], [[[1.0, 1.0]]]]), epoch=0)
    assert torch.equal(out, torch.zeros(2, 1, 1, 2))
    # A repeated index within one call in a new epoch is applied once (first occurrence wins).
    out = bank.update([0, 0], torch.tensor([[[[1.0, 1.0]]], [[[0.0, 0.0]]]]), epoch=1)
    assert torch.equal(out, torch.full((2, 1, 1, 2), 0.5))


def test_epi_bank_rejects_bad_input():
    bank = PseudoLabelBank(2, (4, 4), storage="memory")
    with pytest.raises(IndexError):
        bank.update([2], torch.zeros(1, 1, 4, 4), epoch=0)
    with pytest.raises(ValueError):
        bank.update([0], torch.zeros(1, 1, 8, 8), epoch=0)


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_bank_state_dict_round_trip_exact(tmp_path, storage):
    torch.manual_seed(0)
    bank = PseudoLabelBank(5, (6, 7), beta=0.9, storage=storage, path=tmp_path / "bank.npy")
    assert bank.on_disk == (storage == "disk")
    for epoch in range(3):
        bank.update([0, 3, 4], torch.rand(3, 1, 6, 7), epoch=epoch)
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = PseudoLabelBank(5, (6, 7), beta=0.5, storage=storage, path=tmp_path / "bank2.npy")
    fresh.load_state_dict(state)
    assert fresh.beta == 0.9
    assert torch.equal(fresh.get(range(5)), bank.get(range(5)))
    assert torch.equal(fresh.initialised(), bank.initialised())
    # Continuing both gives identical results (exact resume), including the once-per-epoch bookkeeping.
    pred = torch.rand(2, 1, 6, 7)
    assert torch.equal(fresh.update([3, 1], pred, epoch=2), bank.update([3, 1], pred, epoch=2))
    assert torch.equal(fresh.update([3, 1], pred, epoch=3), bank.update([3, 1], pred, epoch=3))
    with pytest.raises(CheckpointError):
        PseudoLabelBank(4, (6, 7), storage="memory").load_state_dict(state)


def test_bank_auto_storage_goes_to_disk_when_large(tmp_path):
    bank = PseudoLabelBank(4, (8, 8), storage="auto", path=tmp_path / "b.npy", memory_limit_bytes=100)
    assert bank.on_disk and (tmp_path / "b.npy").is_file()
    assert not PseudoLabelBank(4, (8, 8), storage="auto").on_disk


def test_pseudo_label_dice_against_hidden_masks():
    bank = PseudoLabelBank(3, (2, 2), storage="memory")
    bank.update([0, 1], torch.tensor([[[[0.9, 0.9], [0.1, 0.1]]], [[[0.1, 0.1], [0.1, 0.1]]]]), epoch=0)
    masks = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    dice = bank.dice_against([0, 1, 2], masks)
    assert dice[0].item() == pytest.approx(2 / 3)
    assert dice[1].item() == 1.0  # both empty
    assert torch.isnan(dice[2])  # never predicted


def test_gather_updates_with_a_fake_world():
    """Two 'ranks' in threads share a fake all_gather; both get the same rank-major list, ragged sizes padded."""
    world = 2
    barrier = threading.Barrier(world)
    slots: list = [None] * world

    def make_all_gather(rank):
        def all_gather(t):
            slots[rank] = t.clone()
            barrier.wait()
            out = torch.stack(list(slots))
            barrier.wait()  # nobody overwrites a slot before everyone has read it
            return out

        return all_gather

    batches = {
        0: (torch.tensor([4, 1]), torch.full((2, 1, 3, 3), 0.25)),
        1: (torch.tensor([2]), torch.full((1, 1, 3, 3), 0.75)),
    }
    results = {}

    def run(rank):
        idx, probs = batches[rank]
        results[rank] = gather_updates(idx, probs, make_all_gather(rank), world)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    for rank in range(world):
        idx, probs = results[rank]
        assert idx.tolist() == [4, 1, 2]
        assert probs.shape == (3, 1, 3, 3)
        assert probs[:2].eq(0.25).all() and probs[2].eq(0.75).all()
    # Both ranks' banks, updated from the gathered lists, stay identical.
    banks = [PseudoLabelBank(5, (3, 3), storage="memory") for _ in range(world)]
    for rank in range(world):
        banks[rank].update(*results[rank], epoch=0)
    assert torch.equal(banks[0].state_dict()["values"], banks[1].state_dict()["values"])
    # World of one: pass-through.
    idx, probs = batches[0]
    assert gather_updates(idx, probs, lambda t: t, 1)[0] is idx


# ---------------------------------------------------------------------- LV loss
def test_lv_loss_zero_for_identical_and_grows_with_difference():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1.0
    assert lv_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    losses = []
    for shift in (1, 2, 3, 4):
        moved = torch.roll(target, shifts=shift, dims=-1)
        losses.append(lv_loss(moved, target).item())
    assert all(a < b for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] == pytest.approx(1.0)  # disjoint masks
    # Batched: mean over samples; gradients flow into the prediction; contrast resized to the prediction.
    pred = torch.rand(2, 1, 8, 8, requires_grad=True)
    big = torch.nn.functional.interpolate(target.repeat(2, 1, 1, 1), size=(16, 16), mode="nearest")
    loss = lv_loss(pred, big)
    loss.backward()
    assert pred.grad is not None and 0.0 < loss.item() < 1.0


class _BagOfWordsEncoder:
    """Deterministic stand-in for a TextEncoder: one-hot word tokens, padding masked out."""

    name, dim, max_tokens = "bow", 32, 12

    def encode(self, texts):
        emb = torch.zeros(len(texts), self.max_tokens, self.dim)
        mask = torch.zeros(len(texts), self.max_tokens, dtype=torch.bool)
        for i, text in enumerate(texts):
            for j, word in enumerate(text.lower().replace(",", " ").replace(".", " ").split()[: self.max_tokens]):
                emb[i, j, sum(map(ord, word)) % self.dim] = 1.0
                mask[i, j] = True
        return emb, mask


def test_report_vectors_ignore_padding_tokens():
    enc = _BagOfWordsEncoder()
    vecs = report_vectors(enc, ["left lung", "left lung", "right"])
    assert vecs.shape == (3, 32)
    assert torch.allclose(vecs.norm(dim=1), torch.ones(3))
    assert torch.allclose(vecs[0], vecs[1])


def test_nearest_report_lookup_returns_the_right_labelled_image():
    labelled = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0]])
    unlabelled = torch.tensor([[0.0, 5.0, 0.1], [3.0, 4.1, 0.0], [0.9, 0.0, 0.2]])
    assert nearest_labelled(unlabelled, labelled).tolist() == [1, 2, 0]
    # With real report text through an encoder: the report mentioning the same zones wins.
    enc = _BagOfWordsEncoder()
    bank = ContrastLabelBank.from_labelled(
        torch.zeros(3, 1, 4, 4),
        ["bilateral infection upper left lung", "unilateral infection lower right lung", "no infection"],
        ["a.png", "b.png", "c.png"],
    )
    idx = bank.assign(enc, ["unilateral infection lower right lung", "bilateral infection upper left lung"])
    assert idx.tolist() == [1, 0]


def test_packaged_chest_xray_templates():
    bank = default_contrast_bank(image_size=32)
    assert len(bank) == 14 and bank.masks.shape == (14, 1, 32, 32)
    assert set(bank.masks.unique().tolist()) == {0.0, 1.0}
    assert bank.names[0] == "fig1.png" and "all left lung" in bank.texts[0]
    # Every template holds some lesion and some background.
    frac = bank.masks.flatten(1).mean(1)
    assert (frac > 0.02).all() and (frac < 0.6).all()


def test_contrast_bank_from_user_folder(tmp_path):
    from PIL import Image

    for name in ("a.png", "b.png"):
        arr = np.zeros((10, 10), np.uint8)
        arr[2:5, 2:5] = 255
        Image.fromarray(arr).save(tmp_path / name)
    (tmp_path / "reports.csv").write_text("Image,Description\na.png,one area\nb.png,two areas\n")
    bank = ContrastLabelBank.from_folder(tmp_path, image_size=20)
    assert bank.names == ["a.png", "b.png"] and bank.masks.shape == (2, 1, 20, 20)
    (tmp_path / "reports.csv").write_text("Image,Description\nmissing.png,x\n")
    with pytest.raises(DataError, match="missing.png"):
        ContrastLabelBank.from_folder(tmp_path, image_size=20)
    with pytest.raises(DataError):
        ContrastLabelBank.from_folder(tmp_path / "nope", image_size=20)


def test_packaged_templates_match_shared_copy(shared_dir):
    folder = shared_dir / "datasets" / "LV_contrast_labels"
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    theirs = ContrastLabelBank.from_folder(folder, image_size=48)
    ours = default_contrast_bank(image_size=48)
    assert theirs.texts == ours.texts and torch.equal(theirs.masks, ours.masks)


# ---------------------------------------------------------------------- labelled subset
def test_labelled_fraction_seeded_and_right_size(tmp_path):
    names = [f"img_{i:03d}.png" for i in range(40)]
    a = choose_fraction(names, 0.25, seed=3)
    b = choose_fraction(names, 0.25, seed=3)
    c = choose_fraction(names, 0.25, seed=4)
    assert a == b and a.labelled != c.labelled
    assert len(a.labelled) == 10 and len(a.unlabelled) == 30
    assert set(a.labelled) | set(a.unlabelled) == set(names)
    assert list(a.labelled) == sorted(a.labelled)  # dataset order
    assert a.mask_for(names).sum() == 10
    assert len(choose_fraction(names[:3], 0.1).labelled) == 1  # never zero labelled images
    path = write_subset(tmp_path, a)
    saved = json.loads(path.read_text())
    assert saved["labelled"] == list(a.labelled) and saved["n_unlabelled"] == 30
    # The written file can be fed back as --labeled-list: same split.
    assert choose_listed(names, path).labelled == a.labelled


def test_labelled_list_by_name_or_stem(tmp_path):
    names = ["x1.png", "x2.png", "x3.png"]
    lst = tmp_path / "labelled.txt"
    lst.write_text("# chosen by a radiologist\nx3\nx1.png\n")
    subset = choose_listed(names, lst)
    assert subset.labelled == ("x1.png", "x3.png") and subset.unlabelled == ("x2.png",)
    lst.write_text("x9.png\n")
    with pytest.raises(DataError, match="not training images"):
        choose_listed(names, lst)


# ---------------------------------------------------------------------- CLI flags
def test_train_cli_semi_flags_are_overrides_of_the_semi_section(tmp_path):
    import argparse

    from lvit.commands import train as train_cmd
    from lvit.core.errors import ConfigError
    from lvit.train.config import load_config
    from lvit.train.semi_flags import semi_overrides

    parser = argparse.ArgumentParser()
    train_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["train", "--out", str(tmp_path), "--labeled-fraction", "0.25", "--semi", "epi+lv",
                              "--beta", "0.9", "--lv-weight", "0.2", "--semi-warmup", "3"])
    overrides = semi_overrides(args)
    assert overrides == ["semi.labeled_fraction=0.25", "semi.mode=epi+lv", "semi.beta=0.9", "semi.lv_weight=0.2",
                         "semi.warmup_epochs=3"]
    semi = load_config(None, overrides + ["semi.pseudo_threshold=0.6"]).semi
    assert (semi.active, semi.mode, semi.labeled_fraction, semi.beta, semi.lv_weight, semi.warmup_epochs,
            semi.pseudo_threshold) == (True, "epi+lv", 0.25, 0.9, 0.2, 3, 0.6)
    assert semi_overrides(parser.parse_args(["train", "--out", "x"])) == []
    assert not load_config(None).semi.active
    with pytest.raises(ConfigError, match="needs --labeled-fraction"):
        load_config(None, semi_overrides(parser.parse_args(["train", "--out", "x", "--semi", "epi"])))
    with pytest.raises(ConfigError, match=r"semi\.beta=1\.0.*beta"):
        load_config(None, ["semi.mode=epi", "semi.labeled_fraction=0.5", "semi.beta=1.0"])
    # A resumed run keeps the settings in its config.yaml: new flags are refused.
    assert semi_overrides(parser.parse_args(["train", "--out", "x"]), resume=True) == []
    with pytest.raises(ConfigError, match="--resume keeps"):
        semi_overrides(args, resume=True)


def test_warmup_sampler_draws_labelled_batches_then_everything():
    import numpy as np

    from lvit.train.semi import WarmupSampler

    labelled = np.zeros(10, dtype=bool)
    labelled[[1, 4, 7]] = True
    sampler = WarmupSampler(labelled, warmup_epochs=2, seed=3)
    assert len(sampler) == 10
    for epoch in (0, 1):  # warm-up: an epoch's worth of indices, labelled only, each 3 or 4 times
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == 10 and set(order) == {1, 4, 7}
        assert sorted(np.bincount(order, minlength=10)[[1, 4, 7]].tolist()) == [3, 3, 4]
    sampler.set_epoch(2)  # after the warm-up: a permutation of every image
    assert sorted(sampler) == list(range(10))
    # Deterministic per (seed, epoch), different across epochs; epoch_source (the module's epoch) wins.
    assert list(sampler) == list(WarmupSampler(labelled, 2, 3).order(2))
    assert list(sampler.order(3)) != list(sampler.order(2))
    sampler.epoch_source = lambda: 0
    assert set(sampler) == {1, 4, 7}
