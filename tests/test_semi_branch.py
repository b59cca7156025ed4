"""Branching semi-supervised variants from one shared warm-up gives the runs trained from scratch, bit for bit."""

from __future__ import annotations

import csv
import dataclasses
import shutil

import pytest
import torch

from lvit.core.errors import CheckpointError, ConfigError, LvitError

pytestmark = pytest.mark.slow

OVERRIDES = ["model_name=lvit-t", "model.image_size=32", "model.base_channels=8", "data.batch_size=4",
             "data.num_workers=0", "trainer.progress=false", "trainer.patience=null", "optim.lr=1e-3",
             "trainer.max_epochs=3"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from lvit.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("branch") / "data", n_train=8, n_val=2, n_test=1, size=32,
                              seed=3, progress=False)


def _config(semi, *extra):
    from lvit.train.config import load_config

    cfg = load_config(None, [*OVERRIDES, *extra])
    cfg.semi = semi
    cfg.validate()
    return cfg


def _rows(run):
    with (run / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def test_branch_after_the_shared_warmup_equals_training_from_scratch(tiny_data, tmp_path, monkeypatch):
    from lvit.artifacts.runs import load_weights
    from lvit.train.plugins import Callbacks
    from lvit.train.runner import resume_config, train
    from lvit.train.semi.branch import BRANCH_FILE, KeepStateAfter, branch_run, kept_state_dir
    from lvit.train.semi.module import SemiConfig

    # The variant: EPI + LV with its own beta, trained from scratch (the LV report vectors go through an encoder
    # the shared run never loads).
    variant = SemiConfig(mode="epi+lv", labeled_fraction=0.5, beta=0.5, warmup_epochs=1, lv_contrast="templates",
                         lv_encoder="minilm")
    direct = tmp_path / "direct"
    train(_config(variant), tiny_data, direct)

    # The shared run: EPI with the default beta and labelled batches only for all three epochs, its state kept
    # after the first.
    shared = tmp_path / "shared"
    steps = SemiConfig(mode="epi", labeled_fraction=0.5, warmup_epochs=3)
    train(_config(steps), tiny_data, shared, plugins=[Callbacks(KeepStateAfter(shared, 1, 3))])
    kept = kept_state_dir(shared, 1)
    assert len(_rows(kept)) == 1 and (kept / "config.yaml").is_file() and (kept / "labelled_subset.json").is_file()
    assert len(_rows(kept_state_dir(shared, 3))) == 3  # the last epoch is kept when training ends

    branched = branch_run(shared, 1, tmp_path / "branched", _config(variant))
    assert (branched / BRANCH_FILE).is_file() and len(_rows(branched)) == 1
    config, _ = resume_config(branched)
    assert config.semi == variant
    train(config, tiny_data, branched, resume=True)

    assert _rows(branched) == _rows(direct)
    # Pseudo labels did start after the branch point, and epoch 3 averaged them with the variant's beta.
    assert _rows(branched)[2]["pseudo_dice"] != "nan"
    a = load_weights(branched / "checkpoints" / "last.safetensors")
    b = load_weights(direct / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (branched / "labelled_subset.json").read_text() == (direct / "labelled_subset.json").read_text()

    # Refused in one line, nothing made: another labelled subset, another setting outside semi, a branch past its
    # warm-up, supervised-only, an existing folder, an epoch with no kept state.
    epi = SemiConfig(mode="epi", labeled_fraction=0.5, warmup_epochs=1)
    with pytest.raises(ConfigError, match="semi.labeled_fraction differs"):
        branch_run(shared, 1, tmp_path / "b1", _config(dataclasses.replace(epi, labeled_fraction=0.25)))
    with pytest.raises(ConfigError, match="optim.lr differs"):
        branch_run(shared, 1, tmp_path / "b1", _config(epi, "optim.lr=2e-3"))
    with pytest.raises(ConfigError, match="warm-up ends after epoch 0"):
        branch_run(shared, 1, tmp_path / "b2", _config(dataclasses.replace(epi, warmup_epochs=0)))
    with pytest.raises(ConfigError, match="semi.mode none"):
        branch_run(shared, 1, tmp_path / "b3", _config(dataclasses.replace(epi, mode="none")))
    with pytest.raises(CheckpointError, match="already exists"):
        branch_run(shared, 1, branched, _config(epi))
    with pytest.raises(CheckpointError, match="no state kept after epoch 2"):
        branch_run(shared, 2, tmp_path / "b4", _config(epi))
    # A copy failing half-way leaves no folder under the target's name (nor a staging folder).
    real_copy = shutil.copyfile
    calls = []

    def failing_copy(src, dst, *args, **kwargs):
        calls.append(src)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", failing_copy)
    with pytest.raises(LvitError, match="b5: branch not made .*No space left"):
        branch_run(shared, 1, tmp_path / "b5", _config(epi))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["branched", "direct", "shared"]

    # A fresh start of the shared run drops the states it kept before.
    train(_config(steps, "trainer.max_epochs=1"), tiny_data, shared, force=True,
          plugins=[Callbacks(KeepStateAfter(shared, 2))])
    assert not kept_state_dir(shared, 1).exists() and not kept_state_dir(shared, 3).exists()


def test_a_plugin_drawing_random_numbers_in_its_setup_changes_nothing(tiny_data, tmp_path):
    """Why branching holds when the variant's set-up loads an encoder: set-up draws never reach the run."""
    import random

    import numpy as np

    from lvit.artifacts.runs import load_weights
    from lvit.train.plugins import TrainingPlugin
    from lvit.train.runner import train
    from lvit.train.semi.module import SemiConfig

    class Draws(TrainingPlugin):
        def setup(self, config, data, data_root, run_dir, resume):
            torch.rand(1000), np.random.rand(10), random.random()
            return data

    semi = SemiConfig(mode="epi", labeled_fraction=0.5, warmup_epochs=1)
    train(_config(semi, "trainer.max_epochs=1"), tiny_data, tmp_path / "plain")
    train(_config(semi, "trainer.max_epochs=1"), tiny_data, tmp_path / "draws", plugins=[Draws()])
    assert _rows(tmp_path / "plain") == _rows(tmp_path / "draws")
    a = load_weights(tmp_path / "plain" / "checkpoints" / "last.safetensors")
    b = load_weights(tmp_path / "draws" / "checkpoints" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
