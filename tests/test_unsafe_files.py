"""Files from strangers: a checkpoint carrying pickled code is refused (and the code never runs); weights load
from safetensors or ``torch.load(weights_only=True)`` only; the source never unpickles or yaml-loads unsafely.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from badinputs import Tally, assert_one_line_error, run_cli

from lvit.core.errors import CheckpointError

SRC = Path(__file__).resolve().parents[1] / "src" / "lvit"


@pytest.fixture(scope="module")
def tally(request):
    t = Tally("unsafe files")
    yield t
    t.report(request)


class _Payload:
    """Unpickling this runs ``os.system('touch MARKER')``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_files(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Checkpoints that run code when unpickled: {kind: (file, marker the code would create)}."""
    out = {}
    tensors = {"model.weight": torch.zeros(2, 2)}
    for kind in ("zip", "legacy", "raw_pickle", "nested"):
        marker = folder / f"pwned_{kind}"
        path = folder / f"evil_{kind}.ckpt"
        if kind == "zip":  # torch.save's default format
            torch.save({"state_dict": tensors, "extra": _Payload(marker)}, path)
        elif kind == "legacy":  # the pre-1.6 torch.save format
            torch.save({"state_dict": tensors, "extra": _Payload(marker)}, path, _use_new_zipfile_serialization=False)
        elif kind == "raw_pickle":  # a bare pickle named .ckpt
            path.write_bytes(pickle.dumps({"state_dict": tensors, "extra": _Payload(marker)}))
        else:  # the payload hidden deep inside the state dict, as a tensor's neighbour
            torch.save({"state_dict": {"model.weight": [torch.zeros(1), {"x": _Payload(marker)}]}}, path)
        out[kind] = (path, marker)
    # Sanity: the payload really runs when unpickled unsafely (else the test could not fail).
    probe = folder / "pwned_probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()
    probe.unlink()
    return out


@pytest.fixture()
def evil(tmp_path) -> dict[str, tuple[Path, Path]]:
    return evil_files(tmp_path)


def test_training_checkpoint_loader_refuses_pickled_code(evil, tally):
    from lvit.artifacts.runs import load_state_file

    for kind, (path, marker) in evil.items():
        tally.add("pickled code, lvit checkpoint loader: tried")
        with pytest.raises(CheckpointError) as info:
            load_state_file(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, message
        assert re.search("refused|not a readable", message), message
        assert not marker.exists(), f"{kind}: the pickled code ran"
        tally.add("pickled code, lvit checkpoint loader: refused")


def test_official_checkpoint_converter_refuses_pickled_code(evil, tally):
    from lvit.models.convert import read_official_checkpoint

    for kind, (path, marker) in evil.items():
        tally.add("pickled code, official converter: tried")
        with pytest.raises(CheckpointError) as info:
            read_official_checkpoint(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value), str(info.value)
        assert not marker.exists(), f"{kind}: the pickled code ran"
        tally.add("pickled code, official converter: refused")


def test_official_converter_still_reads_plain_official_checkpoints(tmp_path):
    """The safe loader must not refuse what the official train script saves: a dict with numpy numbers."""
    import numpy as np

    from lvit.models.convert import read_official_checkpoint

    path = tmp_path / "best_model-LViT.pth.tar"
    torch.save({"epoch": 3, "best_model": "LViT", "val_loss": np.float64(0.25),
                "state_dict": {"module.inc.conv.weight": torch.ones(2)}}, path)
    state = read_official_checkpoint(path)
    assert list(state) == ["inc.conv.weight"]


def test_corrupt_and_foreign_checkpoints_are_one_line(tmp_path, tally):
    from lvit.artifacts.runs import load_state_file, load_weights
    from lvit.models.convert import read_official_checkpoint

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00garbage" * 100)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    for path in (truncated, junk, empty):
        for loader in (load_state_file, read_official_checkpoint):
            tally.add("corrupt checkpoint/weights: tried")
            with pytest.raises(CheckpointError) as info:
                loader(path)
            assert str(path) in str(info.value) and "\n" not in str(info.value), (loader, str(info.value))
            tally.add("corrupt checkpoint/weights: refused")
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\xff" * 64)
    tally.add("corrupt checkpoint/weights: tried")
    with pytest.raises(CheckpointError, match="fake.safetensors: not a readable safetensors"):
        load_weights(fake)
    tally.add("corrupt checkpoint/weights: refused")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, run folder) of a 1-epoch LViT-T run on 32 px images."""
    from lvit.data import generate_synthetic

    base = tmp_path_factory.mktemp("unsafe")
    data = generate_synthetic(base / "data", n_train=4, n_val=2, n_test=1, size=32, seed=0, progress=False)
    run = base / "run"
    code, _, err = run_cli(["train", "--config", "synth", "--data", data, "--out", run, "--model", "lvit-t",
                            "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-progress",
                            "--set", "model.image_size=32", "--set", "model.base_channels=8",
                            "--set", "model.vit_heads=2", "--set", "data.augment=false"])
    assert code == 0, err
    return data, run


def test_cli_refuses_a_poisoned_run(tiny_run, tmp_path, tally):
    """A run folder whose last.ckpt was replaced by a malicious pickle: predict and train --resume refuse it."""
    data, good_run = tiny_run
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    marker = tmp_path / "pwned"
    ckpt = run / "checkpoints/last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    state["callbacks"]["extra"] = _Payload(marker)
    torch.save(state, ckpt)
    image = next((data / "Test_Folder/img").iterdir())

    tally.add("pickled code via lvit predict / train --resume: tried")
    code, _, err = run_cli(["predict", ckpt, "--image", image, "--out", tmp_path / "mask.png"])
    assert_one_line_error(code, err, re.escape(str(ckpt)), "refused")
    assert not (tmp_path / "mask.png").exists()
    tally.add("pickled code via lvit predict / train --resume: refused")

    tally.add("pickled code via lvit predict / train --resume: tried")
    before = ckpt.read_bytes()
    code, _, err = run_cli(["train", "--resume", "--out", run, "--epochs", "2", "--no-progress"])
    assert_one_line_error(code, err, "last.ckpt", "refused")
    assert ckpt.read_bytes() == before  # refused, not overwritten
    tally.add("pickled code via lvit predict / train --resume: refused")
    assert not marker.exists()


def test_weights_files_are_safetensors(tiny_run):
    from safetensors import safe_open

    _, run = tiny_run
    for name in ("best.safetensors", "last.safetensors"):
        with safe_open(str(run / "checkpoints" / name), framework="pt") as fh:
            assert len(list(fh.keys())) > 10
    # The full training state is plain data too: loads with weights_only=True, no allow-listing needed.
    torch.load(run / "checkpoints/last.ckpt", weights_only=True)


UNSAFE_CALLS = [
    (r"\bpickle\.loads?\(", "pickle.load executes code from the file"),
    (r"\bdill\.|\bjoblib\.load\(|\bcloudpickle\.", "pickle-based loaders execute code from the file"),
    (r"\byaml\.(unsafe_)?load\(", "use yaml.safe_load"),
    (r"yaml\.(Unsafe|Full)?Loader\b", "use yaml.safe_load"),
    (r"allow_pickle\s*=\s*True", "numpy pickles execute code"),
    (r"weights_only\s*=\s*False", "torch.load must use weights_only=True"),
    (r"(?<![.\w])(eval|exec)\(", "no eval/exec of file contents"),
]


def test_source_never_loads_files_unsafely():
    """Static guard: every torch.load in lvit passes weights_only=True; no pickle/yaml.load/eval anywhere."""
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        code_lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if not line.lstrip().startswith("#")]
        for i, line in code_lines:
            for pattern, why in UNSAFE_CALLS:
                if re.search(pattern, line):
                    problems.append(f"{path.relative_to(SRC)}:{i}: {why}: {line.strip()}")
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start(): text.find(")", match.start()) + 1]
            if "weights_only=True" not in call:
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{path.relative_to(SRC)}:{line}: torch.load without weights_only=True")
    assert problems == []
