"""Errors prefopt raises on bad input: each names the problem and where it is."""


class PrefoptError(Exception):
    """Base class: the entry points print these as one line instead of a traceback."""


class ConfigError(PrefoptError, ValueError):
    """A config value is out of range, inconsistent, or names something that does not exist."""


class DataError(PrefoptError, ValueError):
    """A data row or file is malformed (the message names file, row and field)."""


class TrainingError(PrefoptError, RuntimeError):
    """Training cannot go on (a non-finite loss, say); the message names the step and the pairs."""


class StorageError(PrefoptError, RuntimeError):
    """A write failed (disk full, permission, read-only): the message names the path, the errno text and what
    is still intact (the last complete checkpoint). See `prefopt.io`."""
