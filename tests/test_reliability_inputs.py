"""The bad-input corpus (tests/badinputs) through ``lvit check-data``, ``lvit train`` and ``lvit predict``.

Every broken file must give exit status 2 (1 for check-data's problem table) and ONE ``error:`` line naming
the file and the problem, never a traceback, and never leave a half-written output; every unusual but valid
file (16-bit, RGBA, soft masks, odd Unicode) must simply work. The counts (tried / handled) are printed at the
end of the module and recorded by bench/reliability.py.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from badinputs import (
    CORPUS,
    FLAGGED_BY_CHECK_DATA,
    TINY_TRAIN,
    USER_PATH,
    Tally,
    UserPathContext,
    assert_one_line_error,
    error_lines,
    half_written_files,
    make_case,
    run_cli,
)

CASES = {case.name: case for case in CORPUS}
# A tiny LViT-T (no text encoder to load) on 32 px images: the first batch is what matters here.
TINY = ["--model", "lvit-t", *TINY_TRAIN]
# Cases lvit predict meets: broken images in --images, and report tables it reads with --reports.
PREDICT_IMAGE_CASES = [c.name for c in CORPUS if c.level == "file" and not c.name.startswith("mask")]
PREDICT_TABLE_CASES = ["latin1_csv", "missing_column", "path_traversal"]


@pytest.fixture(scope="module")
def tally(request):
    t = Tally("bad inputs")
    t.add("distinct broken or odd files in the corpus", len(CORPUS))
    yield t
    t.report(request)


@pytest.fixture(scope="module")
def good_root(tmp_path_factory) -> Path:
    """A tiny clean dataset (6 train / 2 val / 2 test, 32 px): every case corrupts a copy of it."""
    from lvit.data import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("good") / "data", n_train=6, n_val=2, n_test=2, size=32,
                              seed=0, progress=False)


@pytest.fixture(scope="module")
def trained_run(good_root, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "run"
    code, _, err = run_cli(["train", "--config", "synth", "--data", good_root, "--out", run, *TINY])
    assert code == 0, err
    return run


def relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


@pytest.mark.parametrize("name", list(CASES))
def test_check_data(name, good_root, tmp_path, tally):
    case = CASES[name]
    root, culprit = make_case(case, good_root, tmp_path / "data")
    tally.add("lvit check-data: tried")
    code, out, err = run_cli(["check-data", root])
    assert "Traceback" not in err + out
    if case.valid and name not in FLAGGED_BY_CHECK_DATA:
        assert code == 0 and "OK" in out, out
    else:
        assert code == 1, (code, out, err)
        lines = [line for line in out.splitlines() if line.startswith(relative(culprit, root))]
        assert lines and re.search(case.problem, lines[0]), out
    tally.add("lvit check-data: handled")


@pytest.mark.parametrize("name", list(CASES))
def test_train_first_batch(name, good_root, tmp_path, tally):
    case = CASES[name]
    root, culprit = make_case(case, good_root, tmp_path / "data")
    run = tmp_path / "run"
    tally.add("lvit train: tried")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, _, err = run_cli(["train", "--config", "synth", "--data", root, "--out", run, *TINY])
    if case.valid:
        assert code == 0, err
        assert (run / "checkpoints/last.safetensors").is_file()
    else:
        assert_one_line_error(code, err, re.escape(culprit.name), case.problem)
        assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert half_written_files(run) == []
    tally.add("lvit train: handled")


@pytest.mark.parametrize("name", PREDICT_IMAGE_CASES + PREDICT_TABLE_CASES)
def test_predict(name, good_root, trained_run, tmp_path, tally):
    case = CASES[name]
    root, culprit = make_case(case, good_root, tmp_path / "data")
    out = tmp_path / "pred"
    argv = ["predict", trained_run, "--images", root / "Train_Folder/img", "--out", out]
    if name in PREDICT_TABLE_CASES:
        argv += ["--reports", culprit]
    tally.add("lvit predict: tried")
    code, _, err = run_cli(argv)
    if case.valid:
        assert code == 0, err
        from PIL import Image

        with Image.open(out / "masks" / Path(culprit).name) as im:
            assert im.size == (32, 32)  # a mask at the input's size
    else:
        assert_one_line_error(code, err, re.escape(culprit.name), case.problem if case.level == "file" else ".")
    assert half_written_files(out) == []  # what exists is complete; nothing half-written
    tally.add("lvit predict: handled")


def test_huge_image_is_refused_before_decoding(good_root, tmp_path, monkeypatch, tally):
    """The 100000 x 100000 header must be refused from the header: decoding would need 10 GB."""
    from PIL import Image

    from lvit.core.errors import DataError
    from lvit.data import read_image

    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: (decoded.append(self.size), real_load(self))[1])
    for name in ("huge_dimensions", "oversized_side"):
        tally.add("reader (no decode): tried")
        _, culprit = make_case(CASES[name], good_root, tmp_path / name)
        with pytest.raises(DataError, match="absurd image size"):
            read_image(culprit)
        tally.add("reader (no decode): handled")
    assert decoded == []


@pytest.mark.parametrize("yaml_text, key", [
    ("optim:\n  lr: .nan\n", "optim.lr"),
    ("optim:\n  grad_clip: .inf\n", "optim.grad_clip"),
    ("loss:\n  dice_weight: -.inf\n", "loss.dice_weight"),
])
def test_nan_in_config(yaml_text, key, good_root, tmp_path, tally):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    tally.add("lvit train (config): tried")
    code, _, err = run_cli(["train", "--config", config, "--data", good_root, "--out", tmp_path / "run"])
    assert_one_line_error(code, err, re.escape(str(config)), re.escape(key), "finite")
    code, _, err = run_cli(["train", "--data", good_root, "--out", tmp_path / "run2", "--set", f"{key}=nan"])
    assert_one_line_error(code, err, re.escape(key), "finite")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()
    tally.add("lvit train (config): handled")


class _StubEncoder:
    """A frozen 'encoder' of fixed dim (no model to load): enough to exercise the embedding cache."""

    trainable = False
    min_words = 0

    def __init__(self, dim: int, max_tokens: int = 3):
        self.name, self.dim, self.max_tokens = "stub", dim, max_tokens

    def prepare(self, texts):
        return [t.strip() for t in texts]

    def encode(self, texts):
        emb = torch.stack([torch.full((self.max_tokens, self.dim), float(len(t))) for t in texts])
        return emb, torch.ones(len(texts), self.max_tokens, dtype=torch.bool)


def test_text_cache_of_another_dimension_is_rebuilt(tmp_path, tally):
    """A cache written by an encoder of another width (e.g. a 768-d BERT cache met by 384-d MiniLM) is not
    fed to the model: it is detected, ignored with a warning, and rebuilt at the right width."""
    from lvit.text import encode_cached
    from lvit.text.cache import cache_file

    tally.add("text cache: tried")
    texts = ["left lung", "right lung opacity"]
    encode_cached(_StubEncoder(dim=7), texts, tmp_path)  # a cache of 7-d vectors under the same name
    with pytest.warns(UserWarning, match="does not fit"):
        emb, mask = encode_cached(_StubEncoder(dim=4), texts, tmp_path)
    assert emb.shape == (2, 3, 4) and mask.shape == (2, 3)
    assert torch.equal(emb[1], torch.full((3, 4), float(len(texts[1]))))
    from safetensors import safe_open

    with safe_open(str(cache_file(_StubEncoder(dim=4), tmp_path)), framework="pt") as fh:
        assert fh.get_tensor("emb").shape[-1] == 4  # rewritten at the new width
    tally.add("text cache: handled")


def test_whole_stderr_is_one_line_in_a_real_subprocess(good_root, trained_run, tmp_path, tally):
    """The in-process runs above capture stderr; this checks the real console once, end to end."""
    import subprocess
    import sys

    root, culprit = make_case(CASES["truncated_png"], good_root, tmp_path / "data")
    tally.add("lvit predict (subprocess): tried")
    done = subprocess.run([sys.executable, "-m", "lvit", "predict", str(trained_run), "--image",
                           str(culprit), "--out", str(tmp_path / "m.png")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert culprit.name in done.stderr and "truncated" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "m.png").exists()
    tally.add("lvit predict (subprocess): handled")


def test_broken_file_read_in_a_dataloader_worker_is_one_line(good_root, tmp_path, tally):
    """With data.num_workers > 0 (the presets' default) torch re-raises a worker's error as
    ``Type("Caught Type in DataLoader worker process 0. Original Traceback ...")``: still one line."""
    root, culprit = make_case(CASES["truncated_png"], good_root, tmp_path / "data")
    tally.add("lvit train (DataLoader worker): tried")
    argv = ["train", "--config", "synth", "--data", root, "--out", tmp_path / "run", *TINY, "--workers", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, _, err = run_cli(argv)
    line = assert_one_line_error(code, err, re.escape(culprit.name), "truncated")
    assert "Traceback" not in line and "worker" not in line
    tally.add("lvit train (DataLoader worker): handled")


# --------------------------------------------------------------------------------------------------
# The user-path corpus (tests/badinputs USER_PATH): outputs, reports, weights, batches, devices, flags.

USER_CASES = {case.name: case for case in USER_PATH}


@pytest.fixture(scope="module")
def user_tally(request):
    t = Tally("user path")
    yield t
    t.report(request)


@pytest.fixture(scope="module")
def text_run(good_root, tmp_path_factory) -> Path:
    """A tiny LViT that reads reports (MiniLM, 24 tokens): records its training reports' words."""
    run = tmp_path_factory.mktemp("textrun") / "run"
    code, _, err = run_cli(["train", "--config", "synth", "--data", good_root, "--out", run, "--model", "lvit",
                            *TINY_TRAIN])
    assert code == 0, err
    assert (run / "report_words.json").is_file()
    return run


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")} if folder.exists() else set()


@pytest.mark.parametrize("name", list(USER_CASES))
def test_user_path(name, good_root, trained_run, text_run, tmp_path, monkeypatch, user_tally):
    """Each case: the promised outcome, a line that names the file or flag, nothing written by a refused
    command, no temporary file left behind, and (``before_model``) no model loaded before the refusal."""
    import tempfile

    case = USER_CASES[name]
    ctx = UserPathContext(tmp=tmp_path / "case", data=good_root, text_run=text_run, t_run=trained_run)
    ctx.tmp.mkdir()
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))  # where on-the-fly ONNX exports would be left
    argv = case.argv(ctx)
    if case.before_model:
        from lvit.artifacts import runs

        def refuse(*args, **kwargs):
            raise AssertionError(f"{name}: the model was loaded before the inputs were checked")

        monkeypatch.setattr(runs, "load_run", refuse)
    before = _files(ctx.tmp)
    user_tally.add(f"{case.group}: tried")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, out, err = run_cli(argv)
    assert "Traceback" not in err
    warning_lines = [line for line in err.splitlines() if line.startswith("warning: ")]
    if case.expect in ("error", "partial"):
        line = assert_one_line_error(code, err, *case.needles)
        assert "\n" not in line
        if case.expect == "error":
            assert _files(ctx.tmp) == before, f"a refused command wrote {sorted(_files(ctx.tmp) - before)}"
    else:
        assert code == 0, err
        assert error_lines(err) == []
        if case.expect == "warning":
            assert any(all(re.search(n, line) for n in case.needles) for line in warning_lines), err
        else:
            assert warning_lines == [], err
    if case.check is not None:
        monkeypatch.undo()  # checks may load models
        case.check(ctx, out, err)
    assert list(system_tmp.iterdir()) == [], "a temporary file was left behind"
    assert [p for p in half_written_files(ctx.tmp) if p not in before] == []  # (not the case's own broken files)
    user_tally.add(f"{case.group}: handled")


def test_onnx_file_without_weights_hash_is_not_trusted(tmp_path, capsys):
    """An ONNX file of the run's model config but without the weights hash (exported by an older lvit) is passed
    over with a warning: it may hold any weights. (A file with the right hash is reused: tests/test_export.py.)"""
    import json

    import onnx
    from onnx import TensorProto, helper

    from lvit.artifacts.export import WEIGHTS_KEY, onnx_for_run
    from lvit.models import LViTConfig, build_model

    model = build_model("lvit-t", LViTConfig(image_size=32, base_channels=8, vit_heads=2, use_text=False)).eval()
    run = tmp_path / "run"
    run.mkdir()
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "old",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3, 32, 32])])
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    old.ir_version = 8
    helper.set_model_props(old, {"lvit.image_size": "32", "lvit.config": json.dumps(model.config.to_dict())})
    onnx.save(old, str(run / "model.onnx"))
    session = onnx_for_run(model, run)
    assert session.path != run / "model.onnx" and WEIGHTS_KEY in session.metadata
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.onnx records no weights hash" in err, err
