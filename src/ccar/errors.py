"""The library's own exception types.

Every user mistake (bad option, bad file, bad config) raises a subclass of :class:`CCARError`
with a message that names the offending thing and how to fix it. The CLI prints such errors on
one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class CCARError(ValueError):
    """Base class for user-facing errors (a ``ValueError``, so generic handlers still catch it)."""


class LossError(CCARError):
    """Invalid loss options or inputs (targets, class counts, pivot)."""


class DataError(CCARError):
    """A dataset file or folder is missing, corrupt, hostile or inconsistent."""


class ConfigError(CCARError):
    """An unknown key, a wrongly typed value or an invalid combination in a run configuration."""


class TrainingError(CCARError):
    """Training cannot continue (non-finite loss, unwritable output folder, ...)."""
