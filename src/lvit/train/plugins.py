"""The one extension point of training: plug-ins that :func:`lvit.train.runner.train` calls at fixed places.

    class MyPlugin(TrainingPlugin):
        def setup(self, config, data, data_root, run_dir, resume):     # change the datasets / the sampler
            return data
        def make_module(self, model, config, text_embedding=None):     # a SegmentationModule subclass, or None
            return None
        def callbacks(self):                                             # extra Lightning callbacks
            return []

    train(config, root, run_dir, plugins=[MyPlugin()])

``setup`` runs once, after the datasets are built and before the model is; plug-ins run in order, each seeing
the previous one's data. The first plug-in whose ``make_module`` returns a module provides the module trained
(default: :class:`~lvit.train.module.SegmentationModule`). Semi-supervised training is such a plug-in, added by
the runner when ``config.semi`` is active.
"""

from __future__ import annotations


class TrainingPlugin:
    """Base class: every hook does nothing by default."""

    def setup(self, config, data, data_root, run_dir, resume: bool):
        """-> the :class:`~lvit.train.datamodule.TrainData` to train on (``data`` itself, or a changed copy)."""
        return data

    def make_module(self, model, config, text_embedding=None):
        """-> the LightningModule to train, or None to leave the choice to later plug-ins / the default."""
        return None

    def callbacks(self) -> list:
        """-> extra Lightning callbacks for this run."""
        return []


class Callbacks(TrainingPlugin):
    """Extra Lightning callbacks as a plug-in: ``train(..., plugins=[Callbacks(WallClockBudget(30))])``."""

    def __init__(self, *callbacks):
        self._callbacks = list(callbacks)

    def callbacks(self) -> list:
        return list(self._callbacks)
