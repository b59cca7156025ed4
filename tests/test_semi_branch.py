"""Branching semi-supervised variants from one shared warm-up gives the runs trained from scratch, bit for bit."""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch

from lvit.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.slow

OVERRIDES = ["model_name=lvit-t", "model.image_size=32", "model.base_channels=8", "data.batch_size=4",
             "data.num_workers=0", "trainer.progress=false", "trainer.patience=null", "optim.lr=1e-3",
             "trainer.max_epochs=2"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from lvit.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("branch") / "data", n_train=8, n_val=2, n_test=1, size=32,
                              seed=3, progress=False)


def _config(semi):
    from lvit.train.config import load_config

    cfg = load_config(None, list(OVERRIDES))
    cfg.semi = semi
    cfg.validate()
    return cfg


def _rows(run):
    with (run / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def test_branch_after_the_shared_warmup_equals_training_from_scratch(tiny_data, tmp_path):
    from lvit.runs import load_weights
    from lvit.train.plugins import Callbacks
    from lvit.train.runner import resume_config, train
    from lvit.train.semi.branch import BRANCH_FILE, KeepStateAfter, branch_run, kept_state_dir
    from lvit.train.semi.module import SemiConfig

    epi = SemiConfig(mode="epi", labeled_fraction=0.5, beta=0.5, warmup_epochs=1)
    direct = tmp_path / "direct"
    train(_config(epi), tiny_data, direct)

    # The shared run: labelled batches only for both epochs, its state kept after the first.
    shared = tmp_path / "shared"
    train(_config(dataclasses.replace(epi, warmup_epochs=2)), tiny_data, shared,
          plugins=[Callbacks(KeepStateAfter(shared, 1))])
    assert (kept_state_dir(shared, 1) / "last.ckpt").is_file()
    assert len(_rows(kept_state_dir(shared, 1))) == 1

    branched = branch_run(shared, 1, tmp_path / "branched", epi)
    assert (branched / BRANCH_FILE).is_file() and len(_rows(branched)) == 1
    config, _ = resume_config(branched)
    assert config.semi == epi
    train(config, tiny_data, branched, resume=True)

    assert _rows(branched) == _rows(direct)
    assert _rows(branched)[1]["pseudo_dice"] != "nan"  # pseudo labels did start after the branch point
    a = load_weights(branched / "checkpoints" / "last.safetensors")
    b = load_weights(direct / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (branched / "labelled_subset.json").read_text() == (direct / "labelled_subset.json").read_text()

    # Refused: another labelled subset, a branch that is past its warm-up, supervised-only, an existing folder,
    # an epoch with no kept state.
    with pytest.raises(ConfigError, match="labeled_fraction differs"):
        branch_run(shared, 1, tmp_path / "b1", dataclasses.replace(epi, labeled_fraction=0.25))
    with pytest.raises(ConfigError, match="warm-up ends after epoch 0"):
        branch_run(shared, 1, tmp_path / "b2", dataclasses.replace(epi, warmup_epochs=0))
    with pytest.raises(ConfigError, match="semi.mode none"):
        branch_run(shared, 1, tmp_path / "b3", dataclasses.replace(epi, mode="none"))
    with pytest.raises(CheckpointError, match="already exists"):
        branch_run(shared, 1, branched, epi)
    with pytest.raises(CheckpointError, match="no state kept after epoch 2"):
        branch_run(shared, 2, tmp_path / "b4", epi)
    assert not any((tmp_path / f"b{i}").exists() for i in range(1, 5))
