"""ONNX export: ORT matches PyTorch (dynamic batch), atomic + no-clobber writes, the CLI on a run folder."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")

from lvit.artifacts.export import OnnxSegmenter, example_inputs, export_onnx, onnx_for_run
from lvit.core.errors import LvitError, OutputExistsError
from lvit.models import LViTConfig, build_model

TINY = dict(image_size=32, base_channels=8, text_dim=16, vit_heads=2, dropout=0.0)
# Logits of the tiny net are O(1); fp32 ORT vs PyTorch differ by ~1e-7 in practice.
ATOL = 1e-4


def _cli(argv: list[str]) -> int:
    """Parse and run ``lvit export`` alone (the command module, as lvit.commands.cli wires it)."""
    import argparse

    from lvit.commands import export as export_command

    parser = argparse.ArgumentParser(prog="lvit")
    export_command.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def _model(name: str = "lvit") -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, LViTConfig(**TINY)).eval()
    # Non-trivial BatchNorm statistics, so a wrong BN folding in the export would show.
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def test_onnx_matches_pytorch_with_dynamic_batch(tmp_path):
    model = _model()
    path = tmp_path / "model.onnx"
    summary = export_onnx(model, path)
    assert summary["inputs"] == ["image", "text", "text_mask"]
    assert summary["opset"] == 17 and summary["max_abs_diff"] <= ATOL
    session = OnnxSegmenter(path)
    assert session.image_size == 32
    for batch in (1, 3):  # exported at batch 2: other batch sizes run through the dynamic axis
        image, text, text_mask = example_inputs(batch, 32, 3, 10, 16, seed=batch)
        with torch.no_grad():
            expected = model(image, text, text_mask)
        got = session(image, text, text_mask)
        assert got.shape == expected.shape == (batch, 1, 32, 32)
        assert float((got - expected).abs().max()) < ATOL
    # The mask is an input of the graph, not a constant: padding tokens change the output.
    image, text, text_mask = example_inputs(2, 32, 3, 10, 16)
    masked = text_mask.clone()
    masked[:, 3:] = False
    assert float((session(image, text, masked) - session(image, text, text_mask)).abs().max()) > 1e-6


def test_text_free_models_export_an_image_only_graph(tmp_path):
    model = _model("lvit-t")
    summary = export_onnx(model, tmp_path / "t.onnx")
    assert summary["inputs"] == ["image"]
    image = example_inputs(2, 32)[0]
    with torch.no_grad():
        expected = model(image)
    assert float((OnnxSegmenter(tmp_path / "t.onnx")(image) - expected).abs().max()) < ATOL


def test_export_refuses_clobber_and_wrong_sizes(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        export_onnx(_model(), path)
    assert path.read_bytes() == b"keep me"
    export_onnx(_model(), path, force=True, check=False)
    session = OnnxSegmenter(path)
    with pytest.raises(LvitError, match="exported for 32x32"):
        session(*example_inputs(1, 64, 3, 10, 16))
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind
    with pytest.raises(LvitError, match="not a loadable ONNX model"):
        OnnxSegmenter(tmp_path / "bad.onnx") if (tmp_path / "bad.onnx").write_bytes(b"junk") else None


def test_export_cli_on_a_run_folder(tmp_path):
    from lvit.artifacts.runs import save_weights, write_run_config

    model = _model()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    write_run_config(run, {"model_name": "lvit", "model": LViTConfig(**TINY).to_dict(),
                           "text_encoder": {"spec": "minilm", "max_tokens": 10}})
    save_weights(run / "checkpoints" / "best.safetensors", model)
    out = tmp_path / "exported.onnx"
    assert _cli(["export", str(run), "--onnx", str(out)]) == 0
    with pytest.raises(OutputExistsError):  # exists: refused without --force
        _cli(["export", str(run), "--onnx", str(out)])
    image, text, text_mask = example_inputs(2, 32, 3, 10, 16)
    with torch.no_grad():
        expected = model(image, text, text_mask)
    assert float((OnnxSegmenter(out)(image, text, text_mask) - expected).abs().max()) < ATOL
    # The predict backend reuses <run>/model.onnx when it was exported from this run's config.
    (run / "model.onnx").write_bytes(out.read_bytes())
    assert onnx_for_run(model, run).path == run / "model.onnx"


def test_predict_onnx_backend_matches_torch(tmp_path):
    import numpy as np

    from lvit.artifacts.runs import save_weights, write_run_config
    from lvit.inference import Segmenter

    model = _model("lvit-t")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    write_run_config(run, {"model_name": "lvit-t", "model": {**LViTConfig(**TINY).to_dict(), "use_text": False}})
    save_weights(run / "checkpoints" / "best.safetensors", model)
    image = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)  # any size in
    expected = Segmenter(run, backend="torch").predict(image)
    segmenter = Segmenter(run, backend="onnx")
    assert isinstance(segmenter.model, OnnxSegmenter)
    got = segmenter.predict(image)
    assert got.shape == expected.shape == (40, 48)
    assert float(np.abs(got - expected).max()) < 1e-5  # probabilities
