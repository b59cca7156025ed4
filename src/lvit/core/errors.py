"""Errors that reach the user as one line.

Every failure a user can cause (bad files, bad configs, untrusted checkpoints) raises a subclass of
:class:`LvitError` whose message names the file and the problem. The CLI prints ``error: <message>`` and
exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations

from pathlib import Path


def _worker_message(text: str) -> str | None:
    """The original one-line message of an error torch's DataLoader re-raised from a worker process.

    torch rebuilds it as ``Type("Caught Type in DataLoader worker process N.\\nOriginal Traceback ...")``,
    whose last line is ``module.Type: <original message>``.
    """
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return None
    last = text.rstrip().splitlines()[-1]
    return last.partition(": ")[2] or last


class LvitError(Exception):
    """Base class of every error lvit reports to the user as a single line."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (_worker_message(args[0]) or args[0],)
        super().__init__(*args)


class DataError(LvitError, ValueError):
    """A dataset file is missing, unreadable or inconsistent."""

    def __init__(self, path: str | Path | None, problem: str | None = None):
        if problem is None:  # re-raised from a DataLoader worker with a single message argument
            path, problem = None, _worker_message(str(path)) or str(path)
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


class ConfigError(LvitError, ValueError):
    """A configuration file or command-line override is invalid."""


class CheckpointError(LvitError):
    """A checkpoint is missing, corrupt, untrusted or does not fit the model."""


class OutputExistsError(LvitError):
    """An output would overwrite existing data and ``--force`` was not given."""


class TrainingDiverged(LvitError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def warn(message: str) -> None:
    """Tell the user something went differently than they may assume: ONE line ``warning: ...`` on stderr.

    For what does not stop the command (a report cut to the model's tokens, a fallback to other weights, images
    skipped in a batch). Line breaks in ``message`` are folded so the warning stays one line.
    """
    import sys

    print("warning: " + " ".join(str(message).split()), file=sys.stderr)
