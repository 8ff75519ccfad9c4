"""Errors that are the user's to fix: the CLI prints their message, not a traceback."""

from personalize.config import ConfigError
from personalize.data.images import DataError
from personalize.models.loading import ModelLoadError
from personalize.trainer import TrainingDiverged

USER_ERRORS = (ConfigError, DataError, ModelLoadError, TrainingDiverged)
