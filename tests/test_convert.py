"""Official-checkpoint conversion, against the official key/shape table and the official forward pinned on
reference weights (tests/data; no official code is needed to run these tests)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lvit.core.errors import CheckpointError
from lvit.models import LViT, LViTConfig, count_parameters
from lvit.models.convert import (
    convert_official_state_dict,
    load_official_checkpoint,
    load_official_state_dict,
    official_name,
    official_prefixes,
    read_official_checkpoint,
)
from lvit.models.reference_weights import (
    RECIPE_VERSION,
    default_dtype,
    fingerprint_difference,
    output_fingerprint,
    reference_inputs,
    reference_state_dict,
    uniform,
)

TABLE = Path(__file__).parent / "data" / "official_lvit_state_dict.txt"
FORWARD = Path(__file__).parent / "data" / "official_lvit_forward.json"
_LINE = re.compile(r"^(\S+) \(([\d, ]*)\) (used|unused|buffer)$")


def read_table() -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    for line in TABLE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = _LINE.match(line.strip())
        assert match, f"unparsable table line: {line!r}"
        shape = tuple(int(x) for x in match.group(2).split(",") if x.strip())
        rows.append((match.group(1), shape, match.group(3)))
    return rows


def synthetic_official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the official keys and shapes: used, unused, and buffers."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape, _ in read_table():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.randint(0, 1000, shape, generator=gen)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=gen) + 0.5
        else:  # small values keep a forward pass through random weights finite
            state[name] = 0.05 * torch.randn(shape, generator=gen)
    return state


@pytest.fixture(scope="module")
def official():
    return synthetic_official_state_dict()


@pytest.fixture(scope="module")
def default_model():
    return LViT(LViTConfig())  # 768-d text, 224x224: the official configuration


def test_table_matches_our_model(default_model):
    rows = read_table()
    used = {name: shape for name, shape, kind in rows if kind == "used"}
    assert sum(int(np.prod(s)) for s in used.values()) == 29_908_033 == count_parameters(default_model)
    prefixes = official_prefixes()
    ours = {official_name(k, prefixes): tuple(p.shape) for k, p in default_model.named_parameters()}
    assert ours == used  # every used official parameter has exactly one counterpart of the same shape


def test_converts_every_used_tensor_strictly(default_model, official):
    converted = convert_official_state_dict(official, default_model)
    ours = default_model.state_dict()
    assert set(converted) == set(ours)
    prefixes = official_prefixes()
    for key, tensor in converted.items():
        assert torch.equal(tensor, official[official_name(key, prefixes)]), key
    # Explicit pairs where shapes alone would not catch a wrong mapping (same shape at every level).
    pairs = {
        "stem.conv.weight": "inc.conv.weight",
        "head.bias": "outc.bias",
        "text_convs.0.weight": "text_module4.weight",  # the chain starts at the 768-d end
        "text_convs.3.bias": "text_module1.bias",
        "text_to_patches.proj.norm.running_var": "downVit.CTBN3.norm.running_var",
        "up.0.attention.mlp.0.weight": "up1.pixModule.bottleneck.0.weight",
        "up.3.attention.mlp.2.bias": "up4.pixModule.bottleneck.2.bias",
        "vit_down.0.embed.pos_embed": "downVit.embeddings.position_embeddings",
        "vit_down.3.reduce.norm.num_batches_tracked": "downVit3.CTBN.norm.num_batches_tracked",
        "vit_up.0.merge.conv.weight": "upVit.CTBN2.conv.weight",
        "vit_up.3.blocks.0.attn.qkv.bias": "upVit3.Encoder_blocks.0.attn.qkv.bias",
        "reconstruct.1.norm.running_mean": "reconstruct2.norm.running_mean",
        "down.3.convs.1.norm.weight": "down4.nConvs.1.norm.weight",
        "up.2.convs.0.conv.weight": "up3.nConvs.0.conv.weight",
    }
    for ours_key, official_key in pairs.items():
        assert torch.equal(converted[ours_key], official[official_key]), ours_key


# --- the forward pass, pinned against the official code ---------------------------------------------------
# tests/data/official_lvit_forward.json holds the official model's logits (a fingerprint: mean, RMS, 16x16 block
# means and 128 pixels) on weights from lvit.models.reference_weights, written by bench/official_forward.py from
# a checkout of HUANGLIZI/LViT. Here the same official-keyed weights go through the converter into our LViT.

def reference_official_state_dict() -> dict[str, torch.Tensor]:
    return reference_state_dict((name, shape, default_dtype(name)) for name, shape, _ in read_table())


@pytest.fixture(scope="module")
def pinned():
    expected = json.loads(FORWARD.read_text())
    config = LViTConfig(**expected["config"]["lvit"])
    inputs = expected["input"]
    image, text = reference_inputs(inputs["seed"], inputs["batch"], inputs["image_size"], inputs["in_channels"],
                                   inputs["text_tokens"], inputs["text_dim"])
    return expected, config, reference_official_state_dict(), image, text


def pinned_difference(config, official_state, image, text, expected) -> float:
    model = load_official_state_dict(LViT(config), official_state).eval()
    with torch.no_grad():
        logits = model(image, text)
    assert torch.isfinite(logits).all()
    return fingerprint_difference(output_fingerprint(logits), expected["logits"])


def test_reference_recipe_is_the_one_the_official_outputs_were_made_with(pinned):
    """A changed recipe (or numpy stream) fails here, not as an unexplained model drift."""
    expected, _, official, image, text = pinned
    assert expected["recipe_version"] == RECIPE_VERSION
    for key, values in expected["recipe_check"].items():
        if key.startswith("input."):
            actual = float((image if key == "input.image.sum" else text).double().sum())
            assert actual == pytest.approx(values, rel=1e-8), key
        elif key.startswith("uniform("):
            assert uniform("probe", 4).tolist() == pytest.approx(values, rel=1e-8), key
        else:
            assert official[key].flatten()[:4].double().tolist() == pytest.approx(values, rel=1e-8), key
    assert float(official["downVit.embeddings.position_embeddings"].abs().min()) > 0
    assert float(official["inc.norm.running_var"].min()) > 0 and official["inc.norm.running_mean"].abs().sum() > 0


def test_forward_matches_the_official_code(pinned):
    expected, config, official, image, text = pinned
    tolerance = expected["tolerance"]
    assert tolerance == 1e-5
    difference = pinned_difference(config, official, image, text, expected)
    assert difference <= tolerance, (
        f"our LViT (through the converter) differs from the official forward by {difference:.3g} "
        f"(> {tolerance}) on the reference weights; official commit {expected['official']['commit'][:12]}")


def test_pinned_forward_catches_a_wrong_mapping(pinned):
    """The comparison can fail: swapping the PLAM's average and max branches of one decoder level (same shapes,
    so no key or shape check notices) moves the output far beyond the tolerance."""
    expected, config, official, image, text = pinned
    swapped = dict(official)
    avg, top = "up1.pixModule.conv_avg.weight", "up1.pixModule.conv_max.weight"
    swapped[avg], swapped[top] = official[top], official[avg]
    assert pinned_difference(config, swapped, image, text, expected) > 100 * expected["tolerance"]


def test_dataparallel_prefix_is_accepted(default_model, official):
    wrapped = {f"module.{k}": v for k, v in official.items()}
    assert set(convert_official_state_dict(wrapped, default_model)) == set(default_model.state_dict())


def test_error_names_every_key_that_does_not_fit(default_model, official):
    broken = dict(official)
    del broken["inc.conv.weight"]
    del broken["upVit2.CTBN2.norm.running_mean"]
    broken["decoder.extra.weight"] = torch.zeros(3)
    broken["outc.weight"] = torch.zeros(2, 64, 1, 1)
    with pytest.raises(CheckpointError) as info:
        convert_official_state_dict(broken, default_model)
    message = str(info.value)
    for key in ("inc.conv.weight", "upVit2.CTBN2.norm.running_mean", "decoder.extra.weight", "outc.weight"):
        assert key in message
    assert "missing 2" in message and "unexpected 1" in message and "shape mismatch 1" in message
    assert "(2, 64, 1, 1)" in message and "(1, 64, 1, 1)" in message
    assert "\n" not in message  # one line for the CLI


def test_wrong_text_width_is_reported(official):
    model = LViT(LViTConfig(text_dim=384))
    with pytest.raises(CheckpointError, match=r"text_module4\.weight \(512, 768, 3\) vs ours"):
        convert_official_state_dict(official, model)


def test_load_checkpoint_file_as_the_official_script_saves_it(tmp_path, official):
    path = tmp_path / "best_model-LViT.pth.tar"
    torch.save({"epoch": 12, "best_model": True, "model": "LViT", "state_dict": official,
                "val_loss": np.float64(0.25), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}}, path)
    model = load_official_checkpoint(path, LViT(LViTConfig()))
    assert torch.equal(model.state_dict()["head.weight"], official["outc.weight"])
    assert set(read_official_checkpoint(path)) == set(official)


class _Payload:
    """Unpickling this would run code (create a file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"inc.conv.weight": torch.zeros(1)}, "payload": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_official_checkpoint(path)
    assert not marker.exists()


def test_unreadable_or_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_official_checkpoint(tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        read_official_checkpoint(junk)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        read_official_checkpoint(listing)
