"""Errors that are the user's to fix: the CLI prints their message (exit code 2), not a traceback.

One root, :class:`UserError`; every user-facing error of the project derives from it and names the
file or option at fault. This module imports nothing of the project, so any layer can raise them
and the CLI's handler costs no import of torch.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the file or option and what to do."""


class ConfigError(UserError, ValueError):
    """A recipe or override is invalid; the message names the key and what is wrong."""


class DataError(UserError, ValueError):
    """A problem with the training data or other input files; the message is meant for the user."""


class ModelLoadError(UserError, RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


class OutputError(UserError):
    """An output folder that cannot be used: not writable, a file, busy (locked by another run),
    holding a finished run, or holding an input of the command."""


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed: missing or damaged files, a pickle, another run's config."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; nothing was exported."""


USER_ERRORS = (UserError,)
