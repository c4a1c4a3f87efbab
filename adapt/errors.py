"""User-facing errors.

Anything a user can fix (a bad config key, a missing file, unusable data) is
raised as an `AdaptError`; the CLI prints its message without a traceback and
exits with status 2.  Messages name the culprit (file, key) and the fix.
"""
from __future__ import annotations


class AdaptError(Exception):
    """An error the user can fix; the message says what and how."""


class ConfigError(AdaptError):
    """A recipe, dataset or CLI setting is wrong."""


class DataError(AdaptError):
    """Training data is missing, empty or unusable."""


class ModelLoadError(AdaptError):
    """A base model, adapter or weight file cannot be loaded."""
