"""LViT, LViT-T and U-Net: shapes, gradients, text use, determinism, serialisation, input checks, size."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lvit.core.errors import ConfigError
from lvit.models import LViT, LViTConfig, UNet, build_model, count_parameters

TINY = LViTConfig(image_size=64, base_channels=8, text_dim=16, text_tokens=10, vit_heads=2)
OFFICIAL_USED_PARAMETERS = 29_908_033  # the official LViT's parameters that take part in its forward pass


def make_inputs(batch: int, height: int, width: int, cfg: LViTConfig = TINY, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, cfg.in_channels, height, width, generator=gen)
    text = torch.randn(batch, cfg.text_tokens, cfg.text_dim, generator=gen)
    return image, text


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    return {name: build_model(name, TINY).eval() for name in ("lvit", "lvit-t", "unet")}


@pytest.mark.parametrize("batch,height,width", [(1, 64, 64), (2, 32, 96), (3, 96, 64)])
@pytest.mark.parametrize("name", ["lvit", "lvit-t", "unet"])
def test_output_shape_any_multiple_of_32(tiny_models, name, batch, height, width):
    image, text = make_inputs(batch, height, width)
    with torch.no_grad():
        logits = tiny_models[name](image, text)
    assert logits.shape == (batch, TINY.n_classes, height, width)
    assert torch.isfinite(logits).all()


def test_multi_class_head():
    model = LViT(dataclasses.replace(TINY, n_classes=3, in_channels=1)).eval()
    image, text = make_inputs(2, 64, 64, dataclasses.replace(TINY, in_channels=1))
    with torch.no_grad():
        assert model(image, text).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("name", ["lvit", "lvit-t", "unet"])
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(1)
    model = build_model(name, TINY).train()
    image, text = make_inputs(2, 64, 64, seed=1)
    model(image, text).square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    zero_grad = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    assert not zero_grad, f"parameters with an all-zero gradient: {zero_grad}"


def test_lvit_reads_the_text(tiny_models):
    model = tiny_models["lvit"]
    image, text = make_inputs(2, 64, 64)
    with torch.no_grad():
        a = model(image, text)
        b = model(image, text + torch.randn_like(text))
    assert not torch.allclose(a, b), "LViT's output does not depend on the text"


def test_text_mask_zeroes_padded_tokens(tiny_models):
    model = tiny_models["lvit"]
    image, text = make_inputs(2, 64, 64)
    mask = torch.ones(2, TINY.text_tokens, dtype=torch.bool)
    mask[:, 6:] = False
    noisy = text.clone()
    noisy[:, 6:] += 100 * torch.randn_like(noisy[:, 6:])
    zeroed = text.clone()
    zeroed[:, 6:] = 0
    with torch.no_grad():
        masked = model(image, noisy, mask)
        assert torch.allclose(masked, model(image, text, mask), atol=1e-6)  # padding content is ignored
        assert torch.allclose(masked, model(image, zeroed), atol=1e-6)  # == padding with zeros


def test_lvit_t_has_no_text_parameters_and_ignores_text(tiny_models):
    model = tiny_models["lvit-t"]
    assert model.config.use_text is False
    assert not [n for n, _ in model.named_parameters() if n.startswith("text")]
    assert count_parameters(model) < count_parameters(tiny_models["lvit"])
    image, _ = make_inputs(2, 64, 64)
    with torch.no_grad():
        a = model(image, None)
        b = model(image, torch.randn(2, 3, 5))  # any text, even of the wrong shape, is ignored
    assert torch.equal(a, b)


def test_unet_ignores_text(tiny_models):
    image, text = make_inputs(1, 64, 64)
    with torch.no_grad():
        assert torch.equal(tiny_models["unet"](image, text), tiny_models["unet"](image))


@pytest.mark.parametrize("name", ["lvit", "lvit-t", "unet"])
def test_eval_mode_is_deterministic(tiny_models, name):
    """In eval mode the logits of an image are a fixed function of that image: the same on a second call under
    another RNG seed (dropout off), the same alone as in a batch (BatchNorm uses its running statistics, not the
    batch's: a network normalising with batch statistics in eval mode passes a same-input-twice check), and the
    call changes no state (running statistics untouched)."""
    model = tiny_models[name]
    image, text = make_inputs(3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        torch.manual_seed(0)
        first = model(image, text)
        torch.manual_seed(1)
        second = model(image, text)
        alone = torch.cat([model(image[i:i + 1], text[i:i + 1]) for i in range(3)])
    assert torch.equal(first, second)
    # Kernels may block a batch of 1 differently from a batch of 3: rounding only.
    assert torch.allclose(alone, first, rtol=0, atol=1e-5 * float(first.abs().max()))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_dropout_is_active_in_training():
    model = LViT(TINY).train()
    image, text = make_inputs(2, 64, 64)
    torch.manual_seed(0)
    a = model(image, text)
    torch.manual_seed(1)
    b = model(image, text)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", ["lvit", "lvit-t", "unet"])
def test_safetensors_round_trip(tiny_models, tmp_path, name):
    source = tiny_models[name]
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path))
    torch.manual_seed(123)  # a differently initialised copy
    restored = build_model(name, TINY)
    restored.load_state_dict(load_file(str(path)), strict=True)
    restored.eval()
    image, text = make_inputs(2, 64, 64)
    with torch.no_grad():
        assert torch.equal(source(image, text), restored(image, text))


@pytest.mark.parametrize(
    "shape,text_shape,message",
    [
        ((2, 1, 64, 64), (2, 10, 16), "expected 3"),  # wrong channel count
        ((2, 3, 48, 64), (2, 10, 16), "multiples of 32"),  # H not a multiple of 32
        ((2, 3, 64, 80), (2, 10, 16), "multiples of 32"),  # W not a multiple of 32
        ((3, 64, 64), (2, 10, 16), "[B, C, H, W]"),  # no batch axis
        ((2, 3, 64, 64), (2, 10, 32), "D=16"),  # wrong text dim
        ((2, 3, 64, 64), (2, 7, 16), "L=10"),  # wrong token count
        ((2, 3, 64, 64), (1, 10, 16), "B=2"),  # batch mismatch
        ((2, 3, 64, 64), None, "needs text"),  # missing text
    ],
)
def test_bad_inputs_raise_value_error_with_expected_values(tiny_models, shape, text_shape, message):
    image = torch.zeros(shape)
    text = None if text_shape is None else torch.zeros(text_shape)
    with pytest.raises(ValueError) as info:
        tiny_models["lvit"](image, text)
    assert message in str(info.value)


def test_bad_text_mask_shape(tiny_models):
    image, text = make_inputs(2, 64, 64)
    with pytest.raises(ValueError, match=r"text_mask must be \[B=2, L=10\]"):
        tiny_models["lvit"](image, text, torch.ones(2, 4, dtype=torch.bool))


def test_unet_checks_its_input(tiny_models):
    with pytest.raises(ValueError, match="expected 3"):
        tiny_models["unet"](torch.zeros(1, 4, 64, 64))


def test_config_round_trip_and_validation():
    cfg = LViTConfig(text_dim=384, use_text=False)
    assert LViTConfig.from_dict(cfg.to_dict()) == cfg
    assert LViTConfig().to_dict() == {
        "image_size": 224, "in_channels": 3, "n_classes": 1, "base_channels": 64, "text_dim": 768,
        "text_tokens": 10, "vit_depth": 1, "vit_heads": 8, "mlp_ratio": 4.0, "dropout": 0.1, "use_text": True,
        "report_dropout": 0.0, "report_prior": False}
    with pytest.raises(ConfigError, match="unknown key"):
        LViTConfig.from_dict({"image_sise": 224})
    with pytest.raises(ConfigError, match="multiple of 32"):
        LViTConfig(image_size=200)
    with pytest.raises(ConfigError, match="divisible by vit_heads"):
        LViTConfig(base_channels=12, vit_heads=8)
    with pytest.raises(ConfigError, match="dropout"):
        LViTConfig(dropout=1.5)


@pytest.mark.parametrize("field, value", [("base_channels", 1_000_000_000), ("vit_depth", 1_000_000),
                                          ("image_size", 2 ** 20), ("text_tokens", 100_000), ("text_dim", 10 ** 6),
                                          ("vit_heads", 4096), ("in_channels", 1000), ("mlp_ratio", 1e6)])
def test_absurd_sizes_are_refused_before_anything_is_allocated(field, value):
    with pytest.raises(ConfigError, match=f"model config: {field} must be at most"):
        LViTConfig(**{field: value})


def test_build_model_names():
    assert isinstance(build_model("lvit", TINY), LViT)
    assert build_model("lvit-t", TINY).config.use_text is False
    assert TINY.use_text is True  # the caller's config is not modified
    assert isinstance(build_model("unet", TINY), UNet)
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("transunet", TINY)


def test_deeper_vit_levels():
    model = LViT(dataclasses.replace(TINY, vit_depth=2)).eval()
    assert len(model.vit_down[0].blocks) == 2 and len(model.vit_up[3].blocks) == 2
    image, text = make_inputs(1, 64, 64)
    with torch.no_grad():
        assert model(image, text).shape == (1, 1, 64, 64)


def test_default_size_matches_the_official_model():
    """29,908,033 parameters and 54.2 GFLOPs (official operation order) at 224x224 with 768-d text."""
    from lvit.commands.model_info import measure

    info = measure("lvit", LViTConfig())
    assert info["parameters"] == OFFICIAL_USED_PARAMETERS
    assert sum(g["parameters"] for g in info["groups"].values()) == OFFICIAL_USED_PARAMETERS
    assert set(info["groups"]) == {"cnn encoder", "cnn decoder", "PLAM", "vit down", "vit up", "reconstruct", "text"}
    assert info["gflops_official_order"] == pytest.approx(54.2, abs=0.1)
    # Reconstruct on the patch grid saves exactly the official full-resolution 1x1 convs' cost.
    assert info["gflops"] == pytest.approx(54.24 - 1.644 + 0.136, abs=0.02)
    assert sum(g["gflops"] for g in info["groups"].values()) == pytest.approx(info["gflops"])


def _model_info(argv: list[str]) -> int:
    """Run ``lvit model-info`` through its own parser (independent of the other subcommands)."""
    import argparse

    from lvit.commands import model_info

    parser = argparse.ArgumentParser(prog="lvit")
    model_info.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["model-info", *argv])
    return args.func(args)


def test_model_info_cli(capsys):
    argv = ["--json", "--model", "lvit-t", "base_channels=8", "image_size=64", "--set", "text_dim=16"]
    assert _model_info(argv) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == count_parameters(build_model("lvit-t", TINY))
    assert info["config"]["use_text"] is False and info["input"] == [1, 3, 64, 64]
    assert "text" not in info["groups"]

    assert _model_info(["--model", "unet", "base_channels=8", "image_size=64", "--size", "64", "96"]) == 0
    out = capsys.readouterr().out
    assert "cnn decoder" in out and "total" in out and "1x3x64x96" in out

    with pytest.raises(ConfigError, match="unknown key"):
        _model_info(["nonsense=1"])


def test_model_info_reads_a_preset(tmp_path, capsys):
    preset = tmp_path / "tiny.yaml"
    preset.write_text("model_name: unet\nmodel: {base_channels: 8, image_size: 64}\n")
    assert _model_info(["--json", "--config", str(preset), "base_channels=16"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "unet" and info["config"]["base_channels"] == 16
    assert info["parameters"] == count_parameters(UNet(LViTConfig(base_channels=16, image_size=64)))
