"""One model with or without a report: report dropout's learned no-report path in the network, the segmenter,
lvit predict / test / app, and the reworded reports of bench/rephrase_reports.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from files import load_bench

from lvit.commands.cli import main
from lvit.core.errors import ConfigError
from lvit.models import LViTConfig, build_model
from lvit.presets import preset_path
from lvit.train import load_config
from lvit.train.runner import train

SMALL = dict(image_size=32, base_channels=8, text_dim=16, text_tokens=5, vit_heads=2)


def _inputs(batch: int = 3):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(batch, 3, 32, 32, generator=g), torch.randn(batch, 5, 16, generator=g),
            torch.ones(batch, 5, dtype=torch.bool))


# --- the network ------------------------------------------------------------------------------------------------


def test_report_dropout_is_checked_and_adds_one_tensor_only_when_on():
    for bad in (-0.1, 1.0, True, "0.2"):
        with pytest.raises(ConfigError, match="report_dropout"):
            LViTConfig(**SMALL, report_dropout=bad)
    with pytest.raises(ConfigError, match="use_text"):
        LViTConfig(**SMALL, use_text=False, report_dropout=0.2)
    plain = build_model("lvit", LViTConfig(**SMALL)).state_dict()
    with_path = build_model("lvit", LViTConfig(**SMALL, report_dropout=0.2)).state_dict()
    assert set(with_path) - set(plain) == {"no_report_text"}  # the official-keyed weights are untouched
    assert tuple(with_path["no_report_text"].shape) == (5, 16)


def test_no_report_rows_read_the_learned_stand_in_and_the_others_their_report():
    torch.manual_seed(0)
    model = build_model("lvit", LViTConfig(**SMALL, report_dropout=0.3)).eval()
    with torch.no_grad():
        model.no_report_text.normal_()  # not the zero initialisation: a stand-in that differs from any report
        image, text, mask = _inputs()
        none = model(image, None)
        given = model(image, text, mask)
        mixed = model(image, text, mask, no_report=torch.tensor([True, False, True]))
        stand_in = model(image, model.no_report_text.expand(3, -1, -1), mask)
    assert torch.allclose(none, stand_in, atol=1e-6)
    assert torch.allclose(mixed[[0, 2]], none[[0, 2]], atol=1e-6)
    assert torch.allclose(mixed[1], given[1], atol=1e-6)
    assert not torch.allclose(none[1], given[1], atol=1e-3)


def test_train_mode_drops_each_report_with_the_configured_probability():
    model = build_model("lvit", LViTConfig(**SMALL, report_dropout=0.4)).train()
    image, text, mask = (t.repeat(400, 1, 1, 1) if t.ndim == 4 else t.repeat(400, 1, 1) if t.ndim == 3 else t.repeat(
        400, 1) for t in _inputs(1))
    torch.manual_seed(5)
    stand_in = model.no_report_text.unsqueeze(0)
    used, _ = model.with_no_report(stand_in, text, mask, None)
    dropped = (used == model.no_report_text).all(-1).all(-1)
    torch.manual_seed(5)
    assert torch.equal(dropped, torch.rand(400) < 0.4)  # one uniform draw per sample, in batch order
    assert 0.3 < dropped.float().mean() < 0.5
    model.eval()
    kept, _ = model.with_no_report(stand_in, text, mask, None)
    assert torch.equal(kept, text)  # eval mode never drops a report


def test_in_train_mode_a_given_no_report_chooses_the_dropped_rows_without_a_draw():
    model = build_model("lvit", LViTConfig(**SMALL, report_dropout=0.9)).train()
    _, text, mask = _inputs(4)
    stand_in = model.no_report_text.unsqueeze(0)
    torch.manual_seed(3)
    used, used_mask = model.with_no_report(stand_in, text, mask, torch.tensor([False, True, False, False]))
    assert torch.equal(torch.rand(1), torch.manual_seed(3) and torch.rand(1))  # the RNG was not touched
    assert torch.equal(used[[0, 2, 3]], text[[0, 2, 3]]) and torch.equal(used[1], model.no_report_text)
    assert bool(used_mask.all())


# --- distillation of the report's answer into the no-report path ------------------------------------------------


def test_the_dropped_rows_are_chosen_without_reading_them_back_to_the_host():
    """A branch on the draw (``if drop.any()``) waits for the device at every training step and breaks
    torch.compile's graph and CUDA graphs: the choice must trace as one graph, in train mode and with a given
    ``no_report``, and still leave the kept rows exactly as they were."""
    model = build_model("lvit", LViTConfig(**SMALL, report_dropout=0.5)).train()
    _, text, mask = _inputs(4)
    stand_in = model.no_report_text.detach().unsqueeze(0)  # [1, L, D], as forward passes it
    traced = torch.compile(model.with_no_report, backend="eager", fullgraph=True)
    torch.manual_seed(0)  # this draw drops rows 0, 2 and 3 and keeps row 1: both kinds in one batch
    used, used_mask = traced(stand_in, text, mask, None)
    torch.manual_seed(0)
    expected, expected_mask = model.with_no_report(stand_in, text, mask, None)
    assert torch.equal(used, expected) and torch.equal(used_mask, expected_mask)
    assert torch.equal(used[1], text[1]) and torch.equal(used[0], stand_in[0])
    given = torch.tensor([False, False, False, False])
    kept, kept_mask = traced(stand_in, text, mask, given)
    assert torch.equal(kept, text) and torch.equal(kept_mask, mask)


def test_distillation_loss_by_hand():
    from lvit.train.losses import distillation_loss

    teacher = torch.full((1, 1, 2, 2), float(np.log(3.0)), requires_grad=True)  # p = 0.75
    student = torch.zeros(1, 1, 2, 2, requires_grad=True)  # q = 0.5
    loss = distillation_loss(student, teacher)
    expected = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)  # KL(Bernoulli(0.75) || Bernoulli(0.5))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0  # only the student learns
    same = torch.tensor([[[[-30.0, -2.0], [0.5, 40.0]]]])
    assert distillation_loss(same, same).item() == pytest.approx(0.0, abs=1e-6)  # saturated logits stay finite


def test_distill_weight_is_checked():
    for bad in ("-1.0", "true", '"1"', "abc"):
        with pytest.raises(ConfigError, match="distill_weight"):
            load_config(preset_path("synth"), ["model.report_dropout=0.3", f"loss.distill_weight={bad}"])
    with pytest.raises(ConfigError, match="needs model.report_dropout"):
        load_config(preset_path("synth"), ["loss.distill_weight=1.0"])
    for bad in ("-1", "1.5", "true"):
        with pytest.raises(ConfigError, match="distill_start_epoch"):
            load_config(preset_path("synth"), ["model.report_dropout=0.3", "loss.distill_weight=1.0",
                                               f"loss.distill_start_epoch={bad}"])
    with pytest.raises(ConfigError, match="would never run"):
        load_config(preset_path("synth"), ["model.report_dropout=0.3", "loss.distill_weight=1.0",
                                           "trainer.max_epochs=3", "loss.distill_start_epoch=3"])
    load_config(preset_path("synth"), ["model.report_dropout=0.3", "loss.distill_weight=1.0",
                                       "trainer.max_epochs=3", "loss.distill_start_epoch=2"])
    with pytest.raises(ConfigError, match="no effect without loss.distill_weight"):
        load_config(preset_path("synth"), ["model.report_dropout=0.3", "loss.distill_start_epoch=1"])


def test_distillation_waits_for_its_start_epoch_with_the_same_draw(monkeypatch):
    from lvit.train.module import SegmentationModule

    config = load_config(preset_path("synth"), ["model.report_dropout=0.5", "loss.distill_weight=1.0",
                                                "loss.distill_start_epoch=2"])
    model = build_model("lvit", LViTConfig(**SMALL, report_dropout=0.5))
    with torch.no_grad():
        model.no_report_text.normal_()
    module = SegmentationModule(model, config).train()
    image, text, mask = _inputs(6)
    batch = {"image": image, "text": text, "text_mask": mask}
    drawn, teacher_calls = [], []
    real = model.forward_with_aux
    def spy(*args):
        if model.training:  # the student pass (the teacher's eval pass runs with the model in eval mode)
            drawn.append(args[3])
        return real(*args)

    monkeypatch.setattr(model, "forward_with_aux", spy)
    real_teacher = module.answer_with_report
    monkeypatch.setattr(module, "answer_with_report", lambda *args: teacher_calls.append(1) or real_teacher(*args))
    aux = {}
    for epoch in (0, 1, 2, 3):
        monkeypatch.setattr(SegmentationModule, "current_epoch", property(lambda self, e=epoch: e))
        torch.manual_seed(11)
        aux[epoch] = module._logits_and_aux_loss(batch)[1]
    assert all(torch.equal(d, drawn[0]) for d in drawn) and 0 < int(drawn[0].sum()) < 6  # one draw, every epoch
    assert aux[0] is None and aux[1] is None  # before the start epoch: no term, no teacher pass
    assert len(teacher_calls) == 2 and aux[2].item() > 0 and aux[3].item() > 0


def test_training_distils_the_answer_with_the_report_into_the_dropped_rows(monkeypatch):
    from lvit.train.losses import distillation_loss
    from lvit.train.module import SegmentationModule

    config = load_config(preset_path("synth"), ["model.report_dropout=0.5", "loss.distill_weight=2.0"])
    model = build_model("lvit", LViTConfig(**SMALL, report_dropout=0.5))
    with torch.no_grad():
        model.no_report_text.normal_()
    module = SegmentationModule(model, config).train()
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    image, text, mask = _inputs(6)
    batch = {"image": image, "text": text, "text_mask": mask, "mask": (image[:, :1] > 0.5).float(),
             "has_mask": torch.ones(6, dtype=torch.bool)}
    torch.manual_seed(11)
    dropped = torch.rand(6) < 0.5
    assert 0 < int(dropped.sum()) < 6
    calls = []
    real = model.forward_with_aux

    def spy(*args):
        calls.append((model.training, args[3]))
        return real(*args)

    monkeypatch.setattr(model, "forward_with_aux", spy)
    torch.manual_seed(11)
    logits, aux_loss = module._logits_and_aux_loss(batch)
    assert torch.equal(calls[0][1], dropped) and calls[0][0]  # the student pass: the module's rows, train mode
    assert model.training  # the teacher's eval pass handed the train mode back
    model.eval()  # the teacher the long way: eval mode, with the BatchNorm statistics the student pass updated
    with torch.no_grad():
        teacher = model(image[dropped], text[dropped], mask[dropped])
    model.train()
    assert aux_loss.item() == pytest.approx(2.0 * distillation_loss(logits[dropped], teacher).item(), rel=1e-5)
    aux_loss.backward()
    assert model.no_report_text.grad.abs().sum() > 0  # the stand-in learns from the distillation term


def test_a_distillation_teacher_gives_the_target_and_stays_out_of_training_and_weights(monkeypatch):
    from lvit.train.losses import distillation_loss
    from lvit.train.module import SegmentationModule

    config = load_config(preset_path("synth"), ["model.report_dropout=0.5", "loss.distill_weight=2.0",
                                                "loss.distill_teacher=elsewhere"])
    torch.manual_seed(0)
    model = build_model("lvit", LViTConfig(**SMALL, report_dropout=0.5))
    teacher = build_model("lvit", LViTConfig(**SMALL)).train()  # another network; handed over in train mode
    module = SegmentationModule(model, config).train()
    module.set_distill_teacher(teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert set(module.state_dict()) == set(SegmentationModule(model, config).state_dict())  # not in the weights
    assert all(p is not q for p in module.parameters() for q in teacher.parameters())  # nor in the optimizer's
    image, text, mask = _inputs(6)
    batch = {"image": image, "text": text, "text_mask": mask}
    torch.manual_seed(11)
    dropped = torch.rand(6) < 0.5
    assert 0 < int(dropped.sum()) < 6
    torch.manual_seed(11)
    logits, aux_loss = module._logits_and_aux_loss(batch)
    with torch.no_grad():
        target = teacher(image[dropped], text[dropped], mask[dropped])
        own = module.model.eval()(image[dropped], text[dropped], mask[dropped])
    module.model.train()
    assert aux_loss.item() == pytest.approx(2.0 * distillation_loss(logits[dropped], target).item(), rel=1e-5)
    assert aux_loss.item() != pytest.approx(2.0 * distillation_loss(logits[dropped], own).item(), rel=1e-3)
    aux_loss.backward()
    assert model.no_report_text.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())
    # A student computing in bf16 (trainer.precision bf16-true) still gets the float32 teacher's answer.
    half = module.answer_with_report(image[dropped].bfloat16(), text[dropped].bfloat16(), mask[dropped])
    assert half.dtype == torch.float32 and torch.allclose(half, target, atol=0.05)


def test_distill_teacher_is_checked():
    with pytest.raises(ConfigError, match="no effect without loss.distill_weight"):
        load_config(preset_path("synth"), ["model.report_dropout=0.3", "loss.distill_teacher=some/run"])
    with pytest.raises(ConfigError, match="distill_teacher must be"):
        load_config(preset_path("synth"), ["model.report_dropout=0.3", "loss.distill_weight=1.0",
                                           "loss.distill_teacher=' '"])


def test_a_model_without_the_path_refuses_a_missing_report():
    model = build_model("lvit", LViTConfig(**SMALL)).eval()
    image, text, mask = _inputs()
    with pytest.raises(ValueError, match="no no-report path"):
        model(image, None)
    with pytest.raises(ValueError, match="no no-report path"):
        model(image, text, mask, no_report=torch.tensor([True, False, False]))


# --- a trained run: segmenter, lvit test / predict / app ----------------------------------------------------------

COMMON = ["model.image_size=32", "model.base_channels=8", "model.vit_heads=4", "data.batch_size=3",
          "trainer.max_epochs=1", "trainer.progress=false", "data.num_workers=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data, a 1-epoch LViT with report dropout, one without)."""
    from lvit.data.synthetic import generate_synthetic

    base = tmp_path_factory.mktemp("optional")
    data = generate_synthetic(base / "data", n_train=6, n_val=2, n_test=3, size=64, seed=1, progress=False)
    train(load_config(preset_path("synth"), COMMON + ["model.report_dropout=0.3"]), data, base / "rd")
    train(load_config(preset_path("synth"), COMMON), data, base / "plain")
    return data, base / "rd", base / "plain"


def test_a_run_with_distillation_trains_and_answers_without_a_report(runs, tmp_path):
    import csv

    from lvit.data import load_split, read_image
    from lvit.inference import Segmenter

    data = runs[0]
    train(load_config(preset_path("synth"), COMMON + ["model.report_dropout=0.5", "loss.distill_weight=1.0",
                                                      "trainer.max_epochs=2"]), data, tmp_path / "kd")
    rows = list(csv.DictReader((tmp_path / "kd" / "metrics.csv").open()))
    assert len(rows) == 2 and all(np.isfinite(float(r["train_loss"])) for r in rows)
    image = read_image(load_split(data, "test")[0].image_path)
    assert np.isfinite(Segmenter(tmp_path / "kd").predict(image)).all()


def test_a_run_distils_from_a_frozen_teacher_run_and_refuses_one_that_reads_other_inputs(runs, tmp_path, capsys):
    import csv

    from lvit.core.errors import LvitError

    data, rd, plain = runs
    student = COMMON + ["model.report_dropout=0.5", "loss.distill_weight=1.0"]
    before = {p: p.read_bytes() for p in sorted((plain / "checkpoints").iterdir()) if p.is_file()}
    train(load_config(preset_path("synth"), student + [f"loss.distill_teacher={plain}"]), data, tmp_path / "kd")
    rows = list(csv.DictReader((tmp_path / "kd" / "metrics.csv").open()))
    assert len(rows) == 1 and np.isfinite(float(rows[0]["train_loss"]))
    assert {p: p.read_bytes() for p in before} == before  # the teacher's run is read, never written
    for extra, says in ((["model.image_size=64"], "its model.image_size is 32, this run's 64"),
                        (["model_name=lvit-t"], None)):
        out = tmp_path / f"refused-{len(extra[0])}"
        if says is None:  # a text-free teacher: refused by what it is (the student here is an LViT)
            teacher = tmp_path / "text-free"
            train(load_config(preset_path("synth"), COMMON + extra), data, teacher)
            with pytest.raises(LvitError, match="reads no report"):
                train(load_config(preset_path("synth"), student + [f"loss.distill_teacher={teacher}"]), data, out)
        else:
            with pytest.raises(LvitError, match=says):
                train(load_config(preset_path("synth"), student + extra + [f"loss.distill_teacher={plain}"]),
                      data, out)
        assert not (out / "config.yaml").exists()  # refused before the run folder was written
    with pytest.raises(LvitError, match="no such run folder"):
        train(load_config(preset_path("synth"), student + [f"loss.distill_teacher={tmp_path / 'missing'}"]),
              data, tmp_path / "refused-missing")
    out = tmp_path / "refused-learned"
    with pytest.raises(LvitError, match="learns its own text embedding"):
        train(load_config(preset_path("synth"), student + ["text.encoder=learned", f"loss.distill_teacher={plain}"]),
              data, out)
    assert not out.exists() or not any(out.iterdir())  # nothing written (no vocab.json either)
    with pytest.raises(ConfigError, match="fast path"):
        load_config(preset_path("synth"), student + ["fast.enabled=true"])


def test_a_resumed_run_reloads_its_teacher_and_refuses_other_weights(runs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from lvit.train.runner import resume_config

    data, _, plain = runs
    teacher = tmp_path / "teacher"
    shutil.copytree(plain, teacher)
    student = COMMON + ["model.report_dropout=0.5", "loss.distill_weight=1.0", f"loss.distill_teacher={teacher}"]
    run = tmp_path / "kd"
    train(load_config(preset_path("synth"), student), data, run)
    record = json.loads((run / "distill_teacher.json").read_text())
    assert record["weights"] == str((teacher / "checkpoints" / "best.safetensors").resolve())
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any("distill_teacher" in k for k in state["state_dict"])  # the teacher is not in the checkpoint
    train(resume_config(run, ["trainer.max_epochs=2"])[0], data, run, resume=True)  # the teacher loads again
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
    weights = teacher / "checkpoints" / "best.safetensors"
    changed = load_file(weights)
    first = next(iter(changed))
    changed[first] = changed[first] + 1.0
    save_file(changed, weights)
    config_before = (run / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match="not the ones this run distilled from so far"):
        train(resume_config(run, ["trainer.max_epochs=3"])[0], data, run, resume=True)
    assert (run / "config.yaml").read_bytes() == config_before
    assert len((run / "metrics.csv").read_text().splitlines()) == 3


def test_predictor_mixes_reports_and_missing_ones_row_by_row(runs):
    from lvit.data import load_split, read_image
    from lvit.inference import Segmenter

    data, rd, plain = runs
    records = load_split(data, "test")
    images = [read_image(r.image_path) for r in records]
    texts = [r.text for r in records]
    segmenter = Segmenter(rd)
    assert segmenter.has_no_report_path and segmenter.report_path([None, None]) == "no report"
    assert segmenter.report_path([texts[0], ""]) == "mixed" and segmenter.report_path(texts) == "report"
    mixed = segmenter.predict_many(images, [texts[0], None, texts[2]])
    assert np.allclose(mixed[0], segmenter.predict(images[0], texts[0]), atol=1e-6)
    assert np.allclose(mixed[1], segmenter.predict(images[1]), atol=1e-6)
    assert np.allclose(mixed[2], segmenter.predict(images[2], texts[2]), atol=1e-6)
    with pytest.raises(ConfigError, match="no no-report path"):
        Segmenter(plain).predict(images[0])


def test_the_self_described_path_reads_the_report_its_first_mask_describes(runs):
    """Second pass = the report path given describe_mask(first mask at the model's resolution); rows with a report
    are untouched; the description is kept for the caller."""
    import torch

    from lvit.data import load_split, read_image
    from lvit.data.describe import describe_mask
    from lvit.inference import Segmenter

    data, rd, _ = runs
    records = load_split(data, "test")
    learned, described = Segmenter(rd), Segmenter(rd, no_report_path="self-described")
    batch = torch.stack([learned.preprocess(read_image(r.image_path)) for r in records])
    first = learned.logits(batch)  # [3, 1, 32, 32], all without a report
    reports = [describe_mask((first[i, 0] >= 0).numpy()) for i in range(len(records))]
    expected = learned.logits(batch, *learned.text_for(reports, len(reports)))
    assert torch.allclose(described.logits(batch), expected, atol=1e-6)
    assert described.last_descriptions == reports
    emb, mask = described.text_for([records[0].text, None, records[2].text], 3)  # mixed: only row 1 is re-read
    mixed = described.logits(batch, emb, mask)
    assert torch.allclose(mixed[[0, 2]], learned.logits(batch[[0, 2]], emb[[0, 2]], mask[[0, 2]]), atol=1e-6)
    assert torch.allclose(mixed[1], expected[1], atol=1e-6)
    assert described.last_descriptions == [reports[1]]
    with pytest.raises(ConfigError, match="no-report path"):
        Segmenter(rd, no_report_path="guess")


def test_the_no_report_path_never_loads_the_text_encoder(runs, monkeypatch):
    import lvit.inference.segmenter as segmenter_module
    from lvit.data import load_split, read_image

    data, rd, _ = runs

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder was loaded")

    monkeypatch.setattr(segmenter_module, "run_text_encoder", refuse)
    segmenter = segmenter_module.Segmenter(rd)
    prob = segmenter.predict(read_image(load_split(data, "test")[0].image_path))
    assert prob.shape == (64, 64) and np.isfinite(prob).all()


def test_lvit_test_reports_none_says_which_path(runs, tmp_path, capsys):
    data, rd, plain = runs
    assert main(["test", str(rd), "--data", str(data), "--out", str(tmp_path / "none"), "--reports", "none",
                 "--no-progress", "--k", "0"]) == 0
    assert "masks from the no-report path" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "none" / "metrics.json").read_text())
    assert metrics["reports"] == {"source": "none", "path": "no report"}
    assert main(["test", str(rd), "--data", str(data), "--out", str(tmp_path / "true"), "--no-progress",
                 "--k", "0"]) == 0
    assert "masks from the report path" in capsys.readouterr().out
    assert main(["test", str(plain), "--data", str(data), "--out", str(tmp_path / "x"), "--reports", "none"]) == 2
    err = capsys.readouterr().err
    assert "no no-report path" in err and len(err.strip().splitlines()) == 1


def test_lvit_predict_without_text_uses_the_no_report_path(runs, tmp_path, capsys):
    from lvit.data import load_split

    data, rd, _ = runs
    image = load_split(data, "test")[0].image_path
    assert main(["predict", str(rd), "--image", str(image), "--out", str(tmp_path / "m.png")]) == 0
    out = capsys.readouterr().out
    assert "no-report path" in out and (tmp_path / "m.png").is_file()
    assert not (tmp_path / "m.report.txt").exists()  # nothing was generated
    assert main(["predict", str(rd), "--images", str(image.parent), "--out", str(tmp_path / "folder"),
                 "--no-progress"]) == 0
    assert "no-report path" in capsys.readouterr().out
    assert len(list((tmp_path / "folder" / "masks").glob("*.png"))) == 3


def test_the_app_accepts_an_empty_report_box_with_the_path(runs):
    from lvit.commands.webapp import Page
    from lvit.data import load_split

    data, rd, plain = runs
    image = load_split(data, "test")[0].image_path
    with_path = Page(rd).segment(str(image), "", 0.5)
    assert with_path.overlay is not None and any("no-report path" in n for n in with_path.notes)
    assert Page(plain).segment(str(image), "", 0.5).overlay is None  # asks for the report instead


# --- reworded reports -----------------------------------------------------------------------------------------

BILATERAL = "bilateral pulmonary infection, four infected areas, upper middle lower left lung and lower right lung."


@pytest.fixture(scope="module")
def rephrase():
    return load_bench("bench/rephrase_reports.py", "rephrase_reports")


def test_every_rule_keeps_the_facts_and_the_check_reads_them_back(rephrase):
    from lvit.data.describe import parse_findings

    texts = [BILATERAL, "unilateral pulmonary infection, one infected area, lower right lung.",
             "bilateral pulmonary infection, two infected areas, middle left lung and middle right lung.",
             "unilateral pulmonary infection, three infected areas, upper middle lower left lung."] * 25
    reworded, used = rephrase.rephrase_all(texts, seed=3)
    assert set(used) == set(rephrase.RULES)  # every rule was exercised
    assert all(a != b for a, b in zip(texts, reworded))
    assert all(rephrase.facts(b) == parse_findings(a) for a, b in zip(texts, reworded))


def test_the_fact_check_fails_when_a_side_or_count_or_zone_changes(rephrase):
    reworded = "All left lung and right lower zone: pulmonary opacity in both lungs, 4 affected areas."
    assert rephrase.same_facts(BILATERAL, reworded)
    assert not rephrase.same_facts(BILATERAL, reworded.replace("right lower", "left lower"))  # a side changed
    assert not rephrase.same_facts(BILATERAL, reworded.replace("All left lung", "All right lung")
                                   .replace("right lower zone", "left lower zone"))
    assert not rephrase.same_facts(BILATERAL, reworded.replace("4 affected", "3 affected"))
    assert not rephrase.same_facts(BILATERAL, reworded.replace("lower zone", "mid zone"))
    assert not rephrase.same_facts(BILATERAL, reworded.replace("in both lungs", "in one lung"))


# --- the recipe learns both paths ---------------------------------------------------------------------------------


def _two_lesion_dataset(root: Path, seed: int = 0) -> Path:
    """32 px images with one bright square in each half; the mask is the square the report names ("lower left
    lung" or "lower right lung"): only the report tells which, so reading it is worth Dice, and an image alone
    says where the squares are."""
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("Train_Folder", 96), ("Val_Folder", 8), ("Test_Folder", 24)):
        (root / split / "img").mkdir(parents=True)
        (root / split / "labelcol").mkdir(parents=True)
        rows = []
        for i in range(n):
            image = rng.normal(60, 10, (32, 32)).clip(0, 255)
            squares = []
            for side in (0, 1):
                square = np.zeros((32, 32), bool)
                y, x, s = rng.integers(4, 22), rng.integers(2, 9) + 16 * side, rng.integers(5, 8)
                square[y:y + s, x:x + s] = True
                image[square] = 200
                squares.append(square)
            side = int(rng.integers(2))
            name = f"{split[:-7].lower()}_{i:03d}.png"
            Image.fromarray(image.astype(np.uint8)).save(root / split / "img" / name)
            Image.fromarray(squares[side].astype(np.uint8) * 255).save(root / split / "labelcol" / name)
            rows.append({"Image": name, "Description": "unilateral pulmonary infection, one infected area, lower "
                                                       f"{('left', 'right')[side]} lung."})
        pd.DataFrame(rows).to_excel(root / split / f"{split[:-7]}_text.xlsx", index=False)
    return root


@pytest.mark.slow
def test_a_model_trained_with_report_dropout_answers_with_and_without_a_report(tmp_path):
    from lvit.data import load_split, read_mask
    from lvit.evaluate.testing import run_test

    data = _two_lesion_dataset(tmp_path / "data")
    config = load_config(preset_path("synth"), [
        "model.image_size=32", "model.base_channels=8", "model.report_dropout=0.3", "trainer.seed=0",
        "trainer.max_epochs=40", "optim.t0=40", "optim.lr=0.002", "data.augment=false", "trainer.progress=false",
        "data.num_workers=0"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the arithmetic of one thread, whatever other tests left behind
    try:
        train(config, data, tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    true = run_test(tmp_path / "run", data, "test", tmp_path / "true", progress=False, k=0)["dice"]
    none = run_test(tmp_path / "run", data, "test", tmp_path / "none", progress=False, k=0, reports="none")["dice"]
    # Chance: the best mask that does not look at the image (the training masks' frequency map at any threshold).
    train_masks = np.stack([read_mask(r.mask_path) > 127 for r in load_split(data, "train")])
    test_masks = [read_mask(r.mask_path) > 127 for r in load_split(data, "test")]
    frequency = train_masks.mean(0)

    def dice(a, b):
        return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)

    chance = max(np.mean([dice(frequency >= t, m) for m in test_masks]) for t in np.linspace(0.01, 0.5, 50))
    assert none > chance + 0.2  # the no-report path segments from the image alone
    assert true > none + 0.1  # and the report path reads which square the report names


def test_the_bench_names_each_recipe_from_its_run_config():
    bench = load_bench("bench/report_optional.py", "report_optional")
    qata = load_bench("bench/qata.py", "bench_qata")

    def recipe(row):
        config = load_config(preset_path("qata-cpu"), qata.ROWS[row][1]).to_dict()
        return bench.recipe_of(config)

    assert recipe("lvit") == "none (always a report)"
    assert recipe("lvit-rd25") == "report dropout 0.25"
    assert recipe("lvit-rdw") == "report dropout 0.25 + 3 reworded copies per training report"
    assert recipe("lvit-rdkd") == "report dropout 0.25 + distillation into the no-report path (weight 1)"
    assert recipe("lvit-rdkd-e3") == ("report dropout 0.25 + distillation into the no-report path (weight 1); "
                                      "3-epoch pilot")
    assert recipe("lvit-rd25-e3") == "report dropout 0.25; 3-epoch pilot"
    assert recipe("lvit-rdts") == "report dropout 0.25 + word pieces shifted by up to 4 positions"
    assert recipe("lvit-rdtsp") == ("report dropout 0.25 + word pieces shifted by up to 4 positions + word pieces "
                                    "in a random order with probability 0.25")
    assert recipe("lvit-rd25-e30") == "report dropout 0.25; 30 epochs"
    assert recipe("lvit-rd25-ema") == "report dropout 0.25 + weight average (EMA 0.999)"
    assert recipe("lvit-rd25-160") == "report dropout 0.25; 160 px"
    assert recipe("lvit-rd25-160-e30") == "report dropout 0.25; 160 px; 30 epochs"
    assert recipe("lvit-rdkd-w1-e3") == ("report dropout 0.25 + distillation into the no-report path (weight 1, "
                                         "from epoch 2); 3-epoch pilot")
    assert recipe("lvit-rdkd-w3") == ("report dropout 0.25 + distillation into the no-report path (weight 1, "
                                      "from epoch 4)")
    assert recipe("lvit-ft-rd25-e3") == "from qata-lvit: report dropout 0.25; 3-epoch pilot"
    assert recipe("lvit-ft-rdkd-w02-e3") == ("from qata-lvit: report dropout 0.25 + distillation into the no-report "
                                             "path (weight 0.2, frozen teacher qata-lvit); 3-epoch pilot")
    assert set(qata.ROW_LABELS) <= set(qata.ROWS) and {r for r in qata.ROWS if "rd" in r} <= set(qata.ROW_LABELS)


def test_the_bench_table_leaves_the_columns_a_pilot_did_not_score_empty(tmp_path):
    import argparse

    bench = load_bench("bench/report_optional.py", "report_optional")
    full = {"model": "lvit-rd25-s0", "row": "lvit-rd25", "seed": 0, "recipe": "report dropout 0.25", "n_test": 10,
            "true": 0.82, "none": 0.76, "self_described": 0.75, "generated": None, "rephrased": 0.74,
            "swapped_changed": 0.52, "true_changed": 0.75, "n_changed": 4, "machine": "m"}
    pilot = {**full, "model": "lvit-rdkd-e3-s0", "recipe": "report dropout 0.25 + distillation; 3-epoch pilot",
             "self_described": None, "rephrased": None, "swapped_changed": None, "true": 0.7, "none": 0.65}
    raw, md = tmp_path / "raw.json", tmp_path / "RESULTS.md"
    raw.write_text(json.dumps([full, pilot]))
    md.write_text("# Results\n")
    bench.render(argparse.Namespace(results=raw, results_md=md))
    rows = [line for line in md.read_text().splitlines() if line.startswith("| lvit-")]
    assert rows[0].endswith("| 0.8200 | 0.7600 | 0.7500 | n/a | 0.7400 | 0.5200 | 0.7500 | 0.080 | 0.230 |")
    assert rows[1].endswith("| 0.7000 | 0.6500 | n/a | n/a | n/a | n/a | 0.7500 | n/a | n/a |")


def test_the_bench_reads_each_runs_curves_from_its_metrics(tmp_path):
    from files import load_bench

    bench = load_bench("bench/report_optional.py", "report_optional")
    (tmp_path / "metrics.csv").write_text("epoch,train_loss,val_loss,val_dice,seconds\n"
                                          "1,0.31234,0.27655,0.59518,300\n2,0.2,0.21453,0.68886,290\n")
    assert bench.training_facts(tmp_path) == {"val_dice_per_epoch": [0.5952, 0.6889],
                                              "val_loss_per_epoch": [0.2766, 0.2145],
                                              "train_loss_per_epoch": [0.3123, 0.2]}


# bench/rephrase_reports.py's seeded rewording (seed 0) of [BILATERAL, one lung] as lvit 41cc381 wrote it: the
# "reworded" column of every earlier entry was scored on this draw.
DEFAULT_DRAW = ["Bilateral pulmonary lesions, 4 regions involved, left upper, mid and lower zones and right lower "
                "zone.", "Localized to lower right lung: unilateral pulmonary infection, one infected area."]


def test_one_rule_at_a_time_rewords_only_where_it_applies_and_keeps_the_facts(rephrase):
    """``only=RULE``: that rule and no other; a report it cannot change comes back as it was; the default draw
    is untouched by the option (the seeded rewording of the "reworded" column stays the same)."""
    from lvit.data.describe import parse_findings

    one_lung = "unilateral pulmonary infection, one infected area, lower right lung."
    texts = [BILATERAL, one_lung] * 3
    for rule in rephrase.RULES:
        reworded, used = rephrase.rephrase_all(texts, seed=1, only=rule)
        assert set(used) <= {rule} and all(rephrase.facts(b) == parse_findings(a) for a, b in zip(texts, reworded))
    assert rephrase.rephrase_all([one_lung], only="side-order")[0] == [one_lung]
    assert rephrase.rephrase_all([one_lung], only="whole-lung")[0] == [one_lung]
    assert rephrase.rephrase_all([BILATERAL], only="side-order")[0] == [
        "Bilateral pulmonary infection, four infected areas, lower right lung and upper middle lower left lung."]
    assert rephrase.rephrase_all([BILATERAL], only="digits")[0] == [
        "Bilateral pulmonary infection, 4 infected areas, upper middle lower left lung and lower right lung."]
    with pytest.raises(ValueError, match="unknown rewording rule 'typos'"):
        rephrase.rephrase(BILATERAL, np.random.default_rng(0), only="typos")
    assert rephrase.rephrase_all([BILATERAL, one_lung], seed=0)[0] == DEFAULT_DRAW  # as written before only=RULE


def test_rule_costs_are_taken_over_the_images_each_rule_changes(rephrase, tmp_path):
    import argparse

    bench = load_bench("bench/report_optional.py", "report_optional")
    one_lung = "unilateral pulmonary infection, one infected area, lower right lung."
    texts, names = [BILATERAL, one_lung], ["a", "b"]
    true = {"a": 0.8, "b": 0.6}
    # a stand-in model: 0.1 less on a reworded report, the true figure on an unchanged one
    score = lambda rule, reworded: {n: true[n] - 0.1 * (r != t) for n, r, t in zip(names, reworded, texts)}
    costs = bench.rule_costs(texts, true, names, rephrase, score, truncated=lambda text: "right lung and" in text)
    assert costs["side-order"] == {"n_changed": 1, "true": 0.8, "rephrased": pytest.approx(0.7), "n_truncated": 1}
    assert costs["digits"] == {"n_changed": 2, "true": pytest.approx(0.7), "rephrased": pytest.approx(0.6),
                               "n_truncated": 0}
    entry = {"model": "lvit-x-s0", "row": "lvit-x", "seed": 0, "recipe": "r", "n_test": 2, "true": 0.7,
             "none": None, "self_described": None, "generated": None, "rephrased": 0.6, "swapped_changed": None,
             "true_changed": 0.7, "n_changed": 1, "machine": "m", "rephrased_by_rule": costs}
    raw, md = tmp_path / "raw.json", tmp_path / "RESULTS.md"
    raw.write_text(json.dumps([entry]))
    md.write_text("# Results\n")
    bench.render(argparse.Namespace(results=raw, results_md=md))
    row = next(line for line in md.read_text().splitlines() if line.startswith("| lvit-x-s0 | 0.100 ("))
    assert "| 0.100 (1; 1 cut) |" in row and "| 0.100 (2) |" in row
    with pytest.raises(SystemExit, match="--by-rule scores the reworded reports, which a --pilot leaves out"):
        bench.main(["evaluate", "--data", str(tmp_path), "--work", str(tmp_path), "--runs", "x", "--pilot",
                    "--by-rule", "--results", str(raw)])
