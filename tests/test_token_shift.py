"""text.token_shift: a training report's word pieces read at other positions, none changed or lost."""

from __future__ import annotations

import pytest
import torch

from lvit.core.errors import ConfigError
from lvit.models import LViTConfig, build_model
from lvit.presets import preset_path
from lvit.train import load_config
from lvit.train.token_shift import shift_tokens, shuffle_tokens


def _reports() -> tuple[torch.Tensor, torch.Tensor]:
    """Two reports of 5 and 7 word pieces in L = 8 positions; piece i of a report is the vector [i, i]."""
    tokens = torch.zeros(2, 8, 2)
    tokens[0, :5] = torch.arange(1, 6, dtype=torch.float).unsqueeze(1)
    tokens[1, :7] = torch.arange(1, 8, dtype=torch.float).unsqueeze(1)
    return tokens, tokens[..., 0] != 0


def test_the_words_keep_their_order_and_none_is_lost_or_pushed_past_l():
    tokens, mask = _reports()
    generator = torch.Generator().manual_seed(0)
    shifts = set()
    for _ in range(200):
        out, out_mask = shift_tokens(tokens, mask, 3, generator)
        for b, n in enumerate((5, 7)):
            assert out_mask[b].sum() == n
            assert out[b][out_mask[b]][:, 0].tolist() == list(range(1, n + 1))  # every word, in order
            assert (out[b][~out_mask[b]] == 0).all()  # the inserted positions are empty, as padding is
            last = int(out_mask[b].nonzero().max())
            shifts.add((b, last + 1 - n))  # how many empty positions went in before the last word
    assert {k for b, k in shifts if b == 0} == {0, 1, 2, 3}  # up to max_shift: L - 5 = 3 leaves room for all
    assert {k for b, k in shifts if b == 1} == {0, 1}  # only L - 7 = 1 position of room


def test_no_shift_a_full_report_and_a_seed_give_the_same_draw():
    tokens, mask = _reports()
    assert shift_tokens(tokens, mask, 0)[0] is tokens
    full = torch.arange(1, 9, dtype=torch.float).view(1, 8, 1)
    out, _ = shift_tokens(full, torch.ones(1, 8, dtype=torch.bool), 4)
    assert torch.equal(out, full)  # no room: nothing moves, nothing is cut
    a = shift_tokens(tokens, mask, 3, torch.Generator().manual_seed(5))
    b = shift_tokens(tokens, mask, 3, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ids = torch.tensor([[4, 9, 7, 0, 0, 0]])
    moved, _ = shift_tokens(ids, ids != 0, 3, torch.Generator().manual_seed(1))
    assert moved[moved != 0].tolist() == [4, 9, 7]  # learned-embedding ids: 0 is padding there too


def test_shuffled_reports_keep_their_words_and_positions_in_another_order():
    tokens, mask = _reports()
    generator = torch.Generator().manual_seed(0)
    orders, shuffled = set(), 0
    for _ in range(200):
        out = shuffle_tokens(tokens, mask, 0.5, generator)
        assert (out[~mask] == 0).all()  # padding stays where it was
        for b, n in enumerate((5, 7)):
            words = out[b][mask[b]][:, 0].tolist()
            assert sorted(words) == list(range(1, n + 1))  # every word once, none added
            shuffled += words != list(range(1, n + 1))
            orders.add((b, tuple(words)))
    assert 160 < shuffled < 240  # about half of the 400 reports (a draw may keep the order: 1 in 120 or 5,040)
    assert len({o for b, o in orders if b == 0}) > 30  # many orders, not one rotation
    assert shuffle_tokens(tokens, mask, 0.0) is tokens
    assert torch.equal(shuffle_tokens(tokens, mask, 1.0, torch.Generator().manual_seed(2)),
                       shuffle_tokens(tokens, mask, 1.0, torch.Generator().manual_seed(2)))  # seeded
    ids = torch.tensor([[4, 9, 7, 0, 0, 0]])
    moved = shuffle_tokens(ids, ids != 0, 1.0, torch.Generator().manual_seed(1))
    assert sorted(moved[0, :3].tolist()) == [4, 7, 9] and moved[0, 3:].tolist() == [0, 0, 0]


def test_the_training_step_shuffles_then_shifts_and_without_shuffle_draws_as_before(monkeypatch):
    from lvit.train.module import SegmentationModule

    model = build_model("lvit", LViTConfig(image_size=32, base_channels=8, text_dim=2, text_tokens=8, vit_heads=2))
    tokens, mask = _reports()
    batch = {"image": torch.rand(2, 3, 32, 32), "text": tokens, "text_mask": mask}

    def moved(*overrides):
        module = SegmentationModule(model, load_config(preset_path("synth"), list(overrides)))
        torch.manual_seed(3)
        return module._moved_reports(batch)

    shift_only = moved("text.token_shift=3")
    torch.manual_seed(3)
    assert torch.equal(shift_only["text"], shift_tokens(tokens, mask, 3)[0])  # the shift's draws as before
    both = moved("text.token_shift=3", "text.token_shuffle=1")
    torch.manual_seed(3)
    expected = shift_tokens(shuffle_tokens(tokens, mask, 1.0), mask, 3)
    assert torch.equal(both["text"], expected[0]) and torch.equal(both["text_mask"], expected[1])
    only = moved("text.token_shuffle=1")
    assert torch.equal(only["text_mask"], mask.clone()) and not torch.equal(only["text"], tokens)
    # Nothing else is drawn: the stream after a shift-only step is the stream after the shift alone.
    moved("text.token_shift=3")
    after_step = torch.rand(1)
    torch.manual_seed(3)
    shift_tokens(tokens, mask, 3)
    assert torch.equal(after_step, torch.rand(1))
    # Learned-embedding ids (0 is padding): shuffled among the words, then shifted, none lost.
    ids = torch.tensor([[4, 9, 7, 5, 0, 0, 0, 0]])
    module = SegmentationModule(model, load_config(preset_path("synth"), ["text.token_shift=2",
                                                                          "text.token_shuffle=1"]))
    torch.manual_seed(0)
    out = module._moved_reports({"image": batch["image"][:1], "text_ids": ids})["text_ids"]
    assert sorted(out[out != 0].tolist()) == [4, 5, 7, 9] and out.shape == ids.shape


@pytest.mark.parametrize("overrides, message", [
    (["text.token_shuffle=1.5"], "text.token_shuffle must be a probability"),
    (["text.token_shuffle=null"], "text.token_shuffle must be a probability"),
    (["text.token_shuffle=0.5", "semi.mode=mean-teacher", "semi.labeled_fraction=0.5"],
     "text.token_shuffle does not combine with semi.mode mean-teacher"),
    (["text.token_shift=2", "semi.mode=mean-teacher", "semi.labeled_fraction=0.5"],
     "text.token_shift does not combine with semi.mode mean-teacher"),
    (["text.token_shuffle=0.5", "model.use_text=false"], "text.token_shuffle needs a model that reads reports"),
    (["text.token_shuffle=0.5", "fast.enabled=true"], "text.token_shuffle is not available on the fast path"),
    (["text.token_shift=-1"], "text.token_shift must be an integer from 0 to 16"),
    (["text.token_shift=17"], "text.token_shift must be an integer from 0 to 16"),
    (["text.token_shift=2", "model.use_text=false"], "text.token_shift needs a model that reads reports"),
    (["text.token_shift=2", "fast.enabled=true"], "text.token_shift is not available on the fast path"),
])
def test_token_shift_is_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset_path("synth"), overrides)


def test_the_training_step_reads_shifted_reports_and_validation_the_reports_as_they_are(monkeypatch):
    from lvit.train.module import SegmentationModule

    config = load_config(preset_path("synth"), ["text.token_shift=3"])
    model = build_model("lvit", LViTConfig(image_size=32, base_channels=8, text_dim=2, text_tokens=8, vit_heads=2))
    module = SegmentationModule(model, config).train()
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    tokens, mask = _reports()
    image = torch.rand(2, 3, 32, 32)
    batch = {"image": image, "text": tokens, "text_mask": mask, "mask": (image[:, :1] > 0.5).float(),
             "has_mask": torch.ones(2, dtype=torch.bool)}
    seen = []

    def spy_on(name):
        real = getattr(model, name)

        def spy(image, text=None, text_mask=None, *rest):
            seen.append((text.clone(), text_mask.clone()))
            return real(image, text, text_mask, *rest)
        monkeypatch.setattr(model, name, spy)

    spy_on("forward_with_aux")  # the training step's pass
    spy_on("forward")  # validation's
    torch.manual_seed(0)
    for _ in range(8):
        module.training_step(batch, 0)
    assert len(seen) == 8
    assert all(torch.equal(m.sum(1), mask.sum(1)) for _, m in seen)
    assert any(not torch.equal(m, mask) for _, m in seen)  # some step moved the words
    seen.clear()
    module.eval()
    module.validation_step(batch, 0)
    assert torch.equal(seen[0][0], tokens) and torch.equal(seen[0][1], mask)


def test_a_run_trains_with_shifted_reports_and_records_the_setting(tiny_synth, tmp_path):
    import yaml

    from lvit.train.runner import train

    config = load_config(preset_path("synth"), [
        "model.image_size=32", "model.base_channels=8", "model.vit_heads=4", "data.batch_size=3",
        "trainer.max_epochs=1", "trainer.progress=false", "data.num_workers=0", "text.token_shift=4"])
    train(config, tiny_synth, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "best.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["text"]["token_shift"] == 4
